"""The healthy controls: trainings that work, which must raise no alert at all.

Chosen where a naive detector goes wrong: zero-initialised parameters (ViT tokens, a LoRA update),
frozen parameters, real gradient accumulation, ``zero_grad(set_to_none=False)``, a loss trained to
~1e-6, recurrent and attention models, plus the remedies of gradwatch's reference scenarios.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gradwatch.bench import data
from gradwatch.bench.faulty import _attention_task, _EncoderHead, _reference
from gradwatch.bench.loop import adam, monitor_for, seeded, sgd, train, trial_from, watch_step
from gradwatch.bench.models import (
    VAE,
    Attention,
    LoRALinear,
    SequenceClassifier,
    TinyTransformerLM,
    TinyViT,
    cnn,
    init_,
    mlp,
)
from gradwatch.bench.registry import Case, Trial, register

ce = F.cross_entropy


def _control(name: str, source: str, summary: str, **kw: object):
    def deco(fn):  # type: ignore[no-untyped-def]
        register(Case(name=name, source=source, summary=summary, run=fn, **kw))  # type: ignore[arg-type]
        return fn

    return deco


@_control("control_mlp_adam", "gradwatch", "3-layer ReLU MLP (width 128), Adam lr 1e-3")
def _mlp_adam() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    return train(mlp([20, 128, 128, 5]), data.Sampler(x, y, 64), ce, steps=150, optimizer=adam(1e-3))


@_control("control_mlp_sgd_momentum", "gradwatch", "3-layer ReLU MLP, SGD lr 0.1 momentum 0.9")
def _mlp_sgd() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    return train(mlp([20, 128, 128, 5]), data.Sampler(x, y, 64), ce, steps=150, optimizer=sgd(0.1, momentum=0.9))


@_control("control_cnn_batchnorm", "gradwatch", "2-block CNN with BatchNorm on noisy 8-class images, SGD lr 0.02 "
          "momentum 0.9")
def _cnn_bn() -> Trial:
    # Noisy enough not to be solved to ~1e-8 within the budget (the converged case is control_trained_to_1e-6).
    # Measured: loss 2.18 -> 0.3-0.5, no dead channel (at lr 0.1 see lr_too_high_bn_cnn_dead_channels).
    x, y = data.images(classes=8, noise=1.0)
    seeded(0)
    return train(cnn(batchnorm=True, classes=8), data.Sampler(x, y, 32), ce, steps=80,
                 optimizer=sgd(0.02, momentum=0.9))


@_control("control_inputs_normalised", "gradwatch",
          "the raw-pixel MLP with its inputs standardised (its remedy), SGD lr 0.05")
def _inputs_normalised() -> Trial:
    x, y = data.images()
    x = x.flatten(1)
    x = (x - x.mean(0)) / x.std(0)
    seeded(0)
    return train(mlp([256, 128, 64, 4]), data.Sampler(x, y, 32), ce, steps=60, optimizer=sgd(0.05))


def _lm_loss(out: Tensor, y: Tensor) -> Tensor:
    return ce(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class _LSTMLM(nn.Module):
    def __init__(self, vocab: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 32)
        self.lstm = nn.LSTM(32, 64, 2, batch_first=True)
        self.head = nn.Linear(64, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(self.emb(x))[0])


@_control("control_lstm_lm", "gradwatch", "2-layer LSTM language model on a Markov chain, Adam lr 3e-3")
def _lstm_lm() -> Trial:
    x, y = data.markov_tokens()
    seeded(0)
    return train(_LSTMLM(), data.Sampler(x, y, 16), _lm_loss, steps=60, optimizer=adam(3e-3))


@_control("control_gru_short_sequences", "gradwatch", "GRU copying the first token across 10 steps (it learns)")
def _gru_short() -> Trial:
    x, y = data.copy_first_token(length=10)
    seeded(0)
    return train(SequenceClassifier("gru", 8, 32, 8), data.Sampler(x, y, 32), ce, steps=80, optimizer=adam(3e-3))


@_control("control_transformer_lm", "gradwatch", "2-block causal pre-LN transformer LM, AdamW lr 1e-3")
def _transformer_lm() -> Trial:
    x, y = data.markov_tokens()
    seeded(0)
    return train(TinyTransformerLM(), data.Sampler(x, y, 16), _lm_loss, steps=60,
                 optimizer=lambda ps: torch.optim.AdamW(list(ps), lr=1e-3))


@_control("control_vit_zero_tokens", "gradwatch", "ViT with zero-initialised class token and position embeddings")
def _vit() -> Trial:
    x, y = data.images()
    seeded(0)
    return train(TinyViT(), data.Sampler(x, y, 32), ce, steps=50,
                 optimizer=lambda ps: torch.optim.AdamW(list(ps), lr=1e-3))


@_control("control_attention_scaled", "gradwatch",
          "the attention case with the 1/sqrt(d) scale and PyTorch's init, Adam lr 3e-3")
def _attention_scaled() -> Trial:
    seeded(0)
    return train(Attention(), _attention_task(), ce, steps=100, optimizer=adam(3e-3))


def _vae_loss(out: tuple[Tensor, Tensor, Tensor], x: Tensor) -> Tensor:
    rec, mu, logvar = out
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1).mean()
    return F.binary_cross_entropy_with_logits(rec, x.flatten(1), reduction="none").sum(1).mean() + kl


@_control("control_vae", "gradwatch", "MLP VAE on 16x16 images (reparameterisation, KL term), Adam lr 3e-3")
def _vae() -> Trial:
    x, _ = data.images()
    seeded(0)
    return train(VAE(), data.Sampler(x, x, 32), _vae_loss, steps=100, optimizer=adam(3e-3))


@_control("control_vae_kl_warmup", "gradwatch",
          "the VAE with its KL weight ramped 0 -> 1 over 60 steps: the objective changes under the optimizer")
def _vae_kl_warmup() -> Trial:
    x, _ = data.images()
    seeded(0)
    model = VAE()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches = data.Sampler(x, x, 32)
    monitor = monitor_for(model)
    steps = 100
    for step in range(steps):
        xb, _ = batches(step)
        rec, mu, logvar = model(xb)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1).mean()
        nll = F.binary_cross_entropy_with_logits(rec, xb.flatten(1), reduction="none").sum(1).mean()
        loss = nll + min(1.0, step / 60) * kl
        loss.backward()
        watch_step(monitor, loss, opt)
        opt.step()
        opt.zero_grad()
    return trial_from(monitor, steps)


@_control("control_logistic_regression", "gradwatch", "logistic regression (one Linear), SGD lr 0.5")
def _logreg() -> Trial:
    x, y = data.teacher_classes(classes=2)
    seeded(0)
    return train(nn.Linear(20, 2), data.Sampler(x, y, 64), ce, steps=100, optimizer=sgd(0.5))


@_control("control_trained_to_1e-6", "gradwatch", "small MLP fitting 32 samples until the loss is ~1e-6, Adam")
def _to_1e6() -> Trial:
    x, y = data.teacher_regression(n=32)
    seeded(0)
    model = mlp([32, 128, 8], nn.Tanh)
    # Measured: loss 6e-3 at step 50, 8e-5 at 100, 1.5e-6 at 150 (total gradient norm 3e-4).
    return train(model, lambda i: (x, y), F.mse_loss, steps=150, optimizer=adam(3e-3))


@_control("control_frozen_backbone", "gradwatch",
          "frozen encoder (requires_grad=False), head fine-tuned with Adam lr 1e-2")
def _frozen_backbone() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    model = _EncoderHead()
    model.encoder.requires_grad_(False)
    model.aux_head.requires_grad_(False)
    return train(model, data.Sampler(x, y, 64), ce, steps=80, optimizer=adam(1e-2))


@_control("control_unused_module_not_optimised", "gradwatch",
          "an auxiliary head never used in forward and left out of the optimizer (kept for later)")
def _unused_not_optimised() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    return train(_EncoderHead(), data.Sampler(x, y, 64), ce, steps=60, optimizer=adam(1e-3),
                 params=lambda m: [*m.encoder.parameters(), *m.head.parameters()])


class _LoRAMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = LoRALinear(20, 64)
        self.fc2 = LoRALinear(64, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


@_control("control_lora_zero_init", "gradwatch",
          "LoRA-style adapters on a frozen MLP: B starts at zero, so A's first gradient is exactly zero")
def _lora() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    return train(_LoRAMLP(), data.Sampler(x, y, 64), ce, steps=80, optimizer=adam(1e-2))


@_control("control_gradient_accumulation", "gradwatch",
          "real gradient accumulation: 4 backward passes (loss / 4) per optimizer step, then zero_grad")
def _accumulation() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    return train(mlp([20, 64, 64, 5]), data.Sampler(x, y, 16), ce, steps=50, optimizer=adam(1e-3), micro_batches=4)


@_control("control_zero_grad_set_to_none_false", "gradwatch", "zero_grad(set_to_none=False): gradients zeroed in place")
def _set_to_none_false() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    return train(mlp([20, 64, 64, 5]), data.Sampler(x, y, 64), ce, steps=80, optimizer=sgd(0.05, momentum=0.9),
                 set_to_none=False)


@_control("control_he_relu20", "gradwatch", "the 3x-He case at 1x He (its remedy), SGD lr 0.01")
def _he_relu20() -> Trial:
    x, y = data.teacher_regression()
    seeded(0)
    model = init_(mlp([32] + [64] * 20 + [8]), "he")
    return train(model, data.Sampler(x, y, 64), F.mse_loss, steps=60, optimizer=sgd(0.01))


@_control("control_bf16_autocast", "gradwatch", "ReLU MLP under torch.autocast(bfloat16) on the CPU, Adam")
def _bf16() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)

    def forward(m: nn.Module, xb: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(xb).float()

    return train(mlp([20, 128, 128, 5]), data.Sampler(x, y, 64), ce, steps=80, optimizer=adam(1e-3),
                 forward=forward)


@_control("control_lr_warmup_cosine", "gradwatch",
          "ReLU MLP, SGD momentum 0.9 with a 20-step linear warm-up to lr 0.1, then cosine decay to 0")
def _warmup_cosine() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    model = mlp([20, 128, 128, 5])
    steps = 150
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    batches = data.Sampler(x, y, 64)
    monitor = monitor_for(model)
    for step in range(steps):
        xb, yb = batches(step)
        loss = ce(model(xb), yb)
        loss.backward()
        watch_step(monitor, loss, opt)
        opt.step()
        opt.zero_grad()
        sched.step()
    return trial_from(monitor, steps)


@_control("control_vanilla_rnn_short", "gradwatch",
          "vanilla tanh RNN copying the first token across 5 steps (it learns)")
def _rnn_short() -> Trial:
    x, y = data.copy_first_token(length=5)
    seeded(0)
    return train(SequenceClassifier("rnn", 8, 32, 8), data.Sampler(x, y, 32), ce, steps=80, optimizer=adam(3e-3))


class _TiedLM(nn.Module):
    """Embedding and output layer share one weight (weight tying); token 0 is padding."""

    def __init__(self, vocab: int = 32, dim: int = 48) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.mix = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.mix(self.emb(x)))


@_control("control_tied_embeddings", "gradwatch",
          "bigram LM with the output layer tied to the embedding (one Parameter in two modules), padding_idx=0")
def _tied() -> Trial:
    x, y = data.markov_tokens()
    seeded(0)
    return train(_TiedLM(), data.Sampler(x, y, 16), _lm_loss, steps=80, optimizer=adam(3e-3))


@_control("control_alternating_heads", "gradwatch",
          "multi-task model: two heads trained on alternate steps (each head idle every other step)")
def _alternating() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    model = _EncoderHead()
    steps = 100
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = data.Sampler(x, y, 64)
    monitor = monitor_for(model)
    for step in range(steps):
        xb, yb = batches(step)
        head = model.head if step % 2 == 0 else model.aux_head
        loss = ce(head(model.encoder(xb)), yb)
        loss.backward()
        watch_step(monitor, loss, opt)
        opt.step()
        opt.zero_grad()
    return trial_from(monitor, steps)


@_control("control_dropout_mlp", "gradwatch", "ReLU MLP with dropout 0.5 after each hidden layer, AdamW")
def _dropout() -> Trial:
    x, y = data.teacher_classes()
    seeded(0)
    model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 128), nn.ReLU(),
                          nn.Dropout(0.5), nn.Linear(128, 5))
    return train(model, data.Sampler(x, y, 64), ce, steps=100,
                 optimizer=lambda ps: torch.optim.AdamW(list(ps), lr=1e-3, weight_decay=0.01))


@_control("control_batch_size_1_sgd", "gradwatch", "ReLU MLP trained one sample per step, SGD lr 0.03 (it learns)")
def _bs1() -> Trial:
    # Measured: 50-step means of the loss 1.56 -> 1.11, full-data loss 0.95 after 400 steps (chance 1.61).
    x, y = data.teacher_classes()
    seeded(0)
    return train(mlp([20, 64, 64, 5]), data.Sampler(x, y, 1), ce, steps=400, optimizer=sgd(0.03))


class _Retriever(nn.Module):
    """One scaled attention head reading position 0's query against every position, then a linear head."""

    def __init__(self, dim: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        scores = self.q(x[:, :1]) @ self.k(x).transpose(1, 2) / math.sqrt(x.shape[-1])
        return self.head((torch.softmax(scores, -1) @ self.v(x))[:, 0])


@_control("control_attention_sharpens", "gradwatch",
          "key retrieval with one scaled attention head: attention sharpens because the task asks for it")
def _attention_sharpens() -> Trial:
    # Measured: loss 1.41 -> 0.04 by step 200; mean max attention probability 0.10 -> 0.71.
    x, y = data.key_retrieval()
    seeded(0)
    return train(_Retriever(), data.Sampler(x, y, 32), ce, steps=200, optimizer=adam(3e-3))


@_control("control_deep_relu_he", "gradwatch", "34 ReLU layers of width 32 with He init, Adam lr 3e-3 (it learns)")
def _deep_relu_he() -> Trial:
    # Measured: 25-step means of the loss 1.55 -> 1.20 over 150 steps; the width-8 twin dies for 7 seeds in 12.
    x, y = data.teacher_classes()
    seeded(0)
    model = init_(mlp([20] + [32] * 34 + [5]), "he")
    return train(model, data.Sampler(x, y, 64), ce, steps=150, optimizer=adam(3e-3))


_REFERENCE_REMEDIES = (
    ("activation", "relu+he", "20-layer ReLU MLP, He init"),
    ("activation", "leakyrelu+he", "20-layer LeakyReLU MLP, He init"),
    ("recurrence", "lstm", "LSTM (forget-gate bias 3) copying the first token across 50 steps"),
    ("residual", "residual", "32-layer tanh stack with x + f(x) skips"),
    ("initialisation", "he", "20-layer ReLU MLP, He init"),
    ("initialisation", "xavier", "20-layer tanh MLP, Xavier init"),
    ("normalisation", "batchnorm", "20-layer sigmoid MLP with BatchNorm"),
    ("clipping", "norm", "SGD lr 0.6 with gw.clip.Norm(1.0)"),
    ("clipping", "agc", "SGD lr 0.6 with gw.clip.AGC(0.01)"),
    ("clipping", "zscore", "SGD lr 0.6 with gw.clip.ZScore(max_norm=1.0)"),
)

for _sc, _v, _summary in _REFERENCE_REMEDIES:
    register(Case(f"control_reference_{_sc}_{_v.replace('+', '_')}", "reference", _summary,
                  (lambda s=_sc, v=_v: _reference(s, v))))
