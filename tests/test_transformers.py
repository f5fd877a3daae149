"""GradWatchTrainerCallback in a real Hugging Face ``Trainer`` with a tiny randomly initialised
GPT-2 built from a config in code (no downloads)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the transformers extra is installed in CI (dev extra)")

import gradwatch as gw  # noqa: E402
from gradwatch.errors import GradWatchWarning  # noqa: E402
from gradwatch.integrations.transformers import GradWatchTrainerCallback  # noqa: E402
from gradwatch.sinks.jsonl import read_jsonl  # noqa: E402

VOCAB, SEQ, N = 50, 8, 48  # 12 batches of 4: whole accumulation windows


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (N, SEQ), generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> Any:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


class Reference(transformers.TrainerCallback):
    """Runs before gradwatch in on_pre_optimizer_step: float64 norms of the gradients, from autograd's
    ``.grad`` directly; and the weights after each optimizer step. Optionally poisons one step."""

    def __init__(self, names: list[str] | None = None, nan_step: int | None = None) -> None:
        self.names = names
        self.nan_step = nan_step
        self.norms: dict[int, dict[str, float]] = {}
        self.weights: dict[int, torch.Tensor] = {}
        self.micro_batches = 0

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        step = state.global_step
        if step == self.nan_step:
            p = next(model.parameters())
            p.grad[0, 0] = float("nan")
        norms: dict[str, float] = {}
        total = 0.0
        for name in self.names or []:
            grads = [p.grad.double().reshape(-1) for p in model.get_submodule(name).parameters(recurse=False)
                     if p.grad is not None]
            sq = sum(float(g.pow(2).sum()) for g in grads)
            norms[name] = math.sqrt(sq)
            total += sq
        norms["total"] = math.sqrt(total)
        self.norms[step] = norms

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.weights[state.global_step] = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])

    def on_substep_end(self, *a: Any, **kw: Any) -> None:
        self.micro_batches += 1

    def on_step_end(self, *a: Any, **kw: Any) -> None:
        self.micro_batches += 1


def train(tmp_path: Path, callback: GradWatchTrainerCallback, *, steps: int = 4, accumulate: int = 1,
          max_grad_norm: float = 0.0, reference: Reference | None = None) -> Any:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulate,
        max_steps=steps,
        learning_rate=1e-2,
        max_grad_norm=max_grad_norm,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    callbacks = ([reference] if reference is not None else []) + [callback]
    trainer = transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens(), callbacks=callbacks)
    trainer.train()
    return trainer


def grad_norms_from_hf_log(trainer: Any) -> dict[int, float]:
    # The Trainer logs its own pre-clip total norm once per optimizer step (logging_steps=1).
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]
    return {int(h["step"]) - 1: float(h["grad_norm"]) for h in logs}


@pytest.mark.parametrize("accumulate", [1, 3], ids=["no-accumulation", "accumulate-3"])
def test_one_record_per_optimizer_step_equal_to_the_reference(tmp_path: Path, accumulate: int) -> None:
    path = tmp_path / "grads.jsonl"
    cb = GradWatchTrainerCallback(sinks=[gw.sinks.JSONL(path)], log_every=1, on_alert="ignore")
    ref = Reference()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradWatchWarning)  # max_grad_norm=0: no clipping warning
        trainer = train(tmp_path, cb, steps=4, accumulate=accumulate, reference=ref)
    records = read_jsonl(path)
    meta, metrics = records[0], [r for r in records if r["type"] == "metrics"]
    assert meta["type"] == "meta"
    assert [r["step"] for r in metrics] == [0, 1, 2, 3]  # one per optimizer step, never per micro-batch
    assert ref.micro_batches == 4 * accumulate
    assert cb.monitor is not None and cb.monitor.step_count == 4
    layers = meta["layers"]
    assert layers[:3] == ["transformer.wte", "transformer.wpe", "transformer.h.0.ln_1"]  # forward order
    # Per-layer reference: recompute with the layer names gradwatch reports.
    hf = grad_norms_from_hf_log(trainer)
    for r in metrics:
        assert r["metrics"]["grad_norm/total"] == pytest.approx(hf[r["step"]], rel=1e-5)


def test_per_layer_norms_equal_a_float64_reference(tmp_path: Path) -> None:
    path = tmp_path / "grads.jsonl"
    cb = GradWatchTrainerCallback(sinks=[gw.sinks.JSONL(path)], log_every=1, on_alert="ignore")
    names = ["transformer.wte", "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj", "transformer.ln_f"]
    ref = Reference(names=names)
    train(tmp_path, cb, steps=3, reference=ref)
    metrics = [r for r in read_jsonl(path) if r["type"] == "metrics"]
    assert len(metrics) == 3
    for r in metrics:
        for name in names:
            assert r["metrics"][f"grad_norm/{name}"] == pytest.approx(ref.norms[r["step"]][name], rel=1e-5)


def test_gradwatch_clipping_with_max_grad_norm_0_matches_the_trainers_clipping(tmp_path: Path) -> None:
    hf_ref = Reference()
    with pytest.warns(GradWatchWarning, match="max_grad_norm=0.05 makes the Trainer clip"):
        plain = GradWatchTrainerCallback(sinks=[], on_alert="ignore")
        train(tmp_path / "a", plain, max_grad_norm=0.05, reference=hf_ref)
    gw_ref = Reference()
    path = tmp_path / "clip.jsonl"
    cb = GradWatchTrainerCallback(sinks=[gw.sinks.JSONL(path)], log_every=1, clip=gw.clip.Norm(0.05), on_alert="ignore")
    trainer = train(tmp_path / "b", cb, max_grad_norm=0.0, reference=gw_ref)
    for step in range(4):
        torch.testing.assert_close(gw_ref.weights[step], hf_ref.weights[step], rtol=1e-5, atol=1e-6)
    hf = grad_norms_from_hf_log(trainer)
    for r in (r for r in read_jsonl(path) if r["type"] == "metrics"):
        assert r["metrics"]["grad_norm/total"] == pytest.approx(hf[r["step"]], rel=1e-5)  # pre-clip
        assert r["metrics"]["grad_norm/total"] > 0.05
        assert r["metrics"]["grad_norm_clipped/total"] == pytest.approx(0.05, rel=1e-4)


def test_warns_once_when_the_trainer_clips_first(tmp_path: Path) -> None:
    path = tmp_path / "grads.jsonl"
    cb = GradWatchTrainerCallback(sinks=[gw.sinks.JSONL(path)], log_every=1, on_alert="ignore")
    with pytest.warns(GradWatchWarning) as caught:
        train(tmp_path, cb, steps=2, max_grad_norm=0.05)
    ours = [str(w.message) for w in caught if "max_grad_norm" in str(w.message)]
    assert ours == [
        "gradwatch: TrainingArguments.max_grad_norm=0.05 makes the Trainer clip before on_pre_optimizer_step, "
        "so gradwatch records clipped gradients (their total norm never exceeds 0.05). To record the pre-clip "
        "statistics, set max_grad_norm=0 and pass clip=gw.clip.Norm(0.05) to GradWatchTrainerCallback."
    ]
    # What the warning says: the recorded norms are the clipped ones.
    for r in (r for r in read_jsonl(path) if r["type"] == "metrics"):
        assert r["metrics"]["grad_norm/total"] <= 0.05 * (1 + 1e-5)


def test_warning_names_double_clipping_when_clip_is_set(tmp_path: Path) -> None:
    cb = GradWatchTrainerCallback(sinks=[], clip=gw.clip.Norm(1.0), on_alert="ignore")
    with pytest.warns(GradWatchWarning, match=r"clips them again with Norm\(max_norm=1, norm_type=2\)\. Set "
                      r"max_grad_norm=0 to let gradwatch alone clip"):
        train(tmp_path, cb, steps=1, max_grad_norm=1.0)


def test_nonfinite_step_is_skipped_inside_the_trainer(tmp_path: Path) -> None:
    path = tmp_path / "grads.jsonl"
    cb = GradWatchTrainerCallback(sinks=[gw.sinks.JSONL(path)], log_every=10, on_alert="ignore")
    ref = Reference(nan_step=2)
    train(tmp_path, cb, steps=4, reference=ref)
    assert torch.equal(ref.weights[2], ref.weights[1])  # the poisoned step changed nothing
    assert not torch.equal(ref.weights[3], ref.weights[2])
    assert all(bool(torch.isfinite(w).all()) for w in ref.weights.values())
    records = read_jsonl(path)
    # The Trainer's default optimizer is fused AdamW: the skip is taken on the device (found_inf),
    # without a read, and the alert comes with its own step at the end of training (no logging step).
    assert cb.monitor is not None and cb.monitor.skip_mode == "device"
    assert [(r["type"], r.get("step")) for r in records] == [("meta", None), ("metrics", 0), ("alert", 2)]
    assert cb.monitor.skipped_steps == 1
    assert records[2]["kind"] == "nonfinite" and records[2]["layer"] == "transformer.wte"


def test_bad_options_are_rejected_with_gradwatchs_messages() -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) 'bogus'"):
        GradWatchTrainerCallback(bogus=1)
    with pytest.raises(TypeError, match="takes the AMP scaler from the Trainer"):
        GradWatchTrainerCallback(scaler=None)
    with pytest.raises(ValueError, match="on_nonfinite"):
        GradWatchTrainerCallback(on_nonfinite="sometimes")
