"""The ``desync`` check: replicas that drift apart across data-parallel ranks.

Single-process tests check the fingerprint against float64 arithmetic and the comparison on
hand-built gathers. The distributed tests run ``tests/scripts/dist_desync.py`` (DDP, FSDP2) and
``dist_desync_lightning.py`` (Lightning ``strategy="ddp"``) as real 2-process gloo jobs through
``subprocess`` with a time-out, started together; the alerts they record are checked against a
float64 simulation of what each rank computed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gradwatch import desync as D
from gradwatch.layers import discover_layers
from gradwatch.remedies import inspect_model, remedies_for

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import dist_common as C  # noqa: E402
import dist_desync as S  # noqa: E402

TIMEOUT_S = 240
K = D.PROJECTIONS


# ---------------------------------------------------------------- single process
def _check(model: nn.Module) -> D.DesyncCheck:
    return D.DesyncCheck(discover_layers(model, "module"))


def test_off_without_a_process_group() -> None:
    assert D.DesyncCheck.for_layers(discover_layers(nn.Linear(3, 2), "module")) is None


def test_projection_vectors_leave_the_global_rng_alone_and_cost_k_rows_plus_cols() -> None:
    model = C.make_model()  # seeds the global RNG itself
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    check = _check(model)
    assert torch.equal(torch.random.get_rng_state(), before)
    # weights (7, 16), (64, 7), (1, 64); biases (7,), (64,), (1,) seen as 1 x n
    assert check.projection_floats == K * ((7 + 16) + (1 + 7) + (64 + 7) + (1 + 64) + (1 + 64) + (1 + 1))
    again = _check(C.make_model())
    assert all(torch.equal(a.u, b.u) and torch.equal(a.v, b.v) for a, b in zip(check.tracked, again.tracked))


def test_layout_is_the_same_whatever_the_forward_order() -> None:
    model = C.make_model()
    layers = discover_layers(model, "module")
    a, b = D.DesyncCheck(layers), D.DesyncCheck(list(reversed(layers)))  # another rank's first forward
    torch.testing.assert_close(a.fingerprint(0), b.fingerprint(0), rtol=0, atol=0, equal_nan=True)  # NaN: no grads
    assert [b.layer_names[t.layer] for t in b.tracked] == ["0", "0", "2", "2", "4", "4"]


def _fingerprint64(t: torch.Tensor, index: int) -> list[float]:
    rows, cols = D._matrix_shape(t)
    u, v = D._projection_vectors(index, rows, cols, K, torch.device("cpu"))
    m = t.detach().double().reshape(rows, cols)
    return [m.norm().item(), *((m @ v.double()) * u.double()).sum(0).tolist()]


def test_fingerprint_equals_float64_arithmetic() -> None:
    model = C.make_model()
    x, y = C.batch(0)
    C.loss_fn(model(x), y).backward()
    model[4].bias.grad = None  # a parameter without gradient: NaN, never compared
    got = _check(model).fingerprint(7)
    assert got.dtype == torch.float64 and got[0].item() == 7.0
    rows = got[1:].reshape(6, 2, 1 + K)
    for i, p in enumerate(model.parameters()):
        torch.testing.assert_close(rows[i, 0], torch.tensor(_fingerprint64(p, i), dtype=torch.float64),
                                   rtol=1e-6, atol=1e-7)
        if p.grad is not None:
            torch.testing.assert_close(rows[i, 1], torch.tensor(_fingerprint64(p.grad, i), dtype=torch.float64),
                                       rtol=1e-6, atol=1e-7)
    assert torch.isnan(rows[5, 1]).all()


def test_float32_fingerprint_rounding_is_far_below_the_tolerance() -> None:
    # A 2^22-element weight: the float32 fingerprint against float64 sums of the same values.
    w = (torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0)) * 0.02)
    check = D.DesyncCheck([])
    u, v = D._projection_vectors(0, 2048, 2048, K, torch.device("cpu"))
    f32 = check._sketch(w, D._Tracked(0, w, (0,), u, v)).double()
    w64 = w.double()
    f64 = torch.cat([w64.norm().reshape(1), ((w64 @ v.double()) * u.double()).sum(0)])
    assert ((f32 - f64).abs().max() / f64[0]).item() < D.REL_TOL / 10


def _gather(world: int, n_params: int, step: int = 3, seed: int = 0) -> torch.Tensor:
    """Identical fingerprints on every rank: norms in [1, 2], projections of that size."""
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(n_params, 2, 1 + K, generator=g, dtype=torch.float64) + 1.0
    row = torch.cat([torch.tensor([float(step)], dtype=torch.float64), f.reshape(-1)])
    return row.repeat(world, 1)


def _at(gathered: torch.Tensor, rank: int, param: int, which: int, comp: int) -> tuple[int, int]:
    n = (gathered.shape[1] - 1) // (2 * (1 + K))
    assert 0 <= param < n
    return rank, 1 + (param * 2 + which) * (1 + K) + comp


def test_compare_names_the_minority_rank_and_the_relative_difference() -> None:
    g = _gather(4, 3)  # params 0, 1 in layer 0; param 2 in layer 1
    g[_at(g, 2, 1, 0, 2)] += 1e-3  # rank 2, layer 0's second parameter, its 2nd component
    cmp = D.compare(g, [(0, 0, 0, 0)] * 3, [0, 0, 1], 2, D.REL_TOL)
    f = g[0, 1:].reshape(3, 2, 1 + K)
    layer_norm = math.sqrt(f[0, 0, 0].item() ** 2 + f[1, 0, 0].item() ** 2)
    assert cmp.param_rel == [pytest.approx(1e-3 / layer_norm, rel=1e-9), 0.0]
    assert cmp.param_ranks == (2,)
    assert cmp.grad_rel == [0.0, 0.0] and cmp.grad_ranks == ()
    assert cmp.steps == (3, 3, 3, 3)


def test_compare_two_ranks_involves_both_and_tolerates_rounding() -> None:
    g = _gather(2, 2)
    g[_at(g, 1, 0, 1, 0)] *= 1 + 1e-6  # a float32-rounding-sized change: silent
    cmp = D.compare(g, [(0, 0)] * 2, [0, 1], 2, D.REL_TOL)
    assert 0 < cmp.grad_rel[0] < D.REL_TOL and cmp.grad_ranks == ()
    g[_at(g, 1, 1, 1, 3)] += 0.5
    cmp = D.compare(g, [(0, 0)] * 2, [0, 1], 2, D.REL_TOL)
    assert cmp.grad_ranks == (0, 1)
    assert cmp.grad_rel[1] == pytest.approx(0.5 / g[0, 1:].reshape(2, 2, 1 + K)[1, 1, 0].item(), rel=1e-9)


def test_compare_non_finite_on_one_rank_differs_and_nowhere_is_skipped() -> None:
    g = _gather(3, 1)
    for r in range(3):  # no rank has a gradient: nothing to compare
        g[r, 1 + (1 + K) : 1 + 2 * (1 + K)] = float("nan")
    g[_at(g, 0, 0, 0, 1)] = float("inf")
    cmp = D.compare(g, [(0, 0, 0)], [0], 1, D.REL_TOL)
    assert cmp.param_rel == [math.inf] and cmp.param_ranks == (0,)
    assert cmp.grad_rel == [0.0]


def test_compare_only_within_replica_groups() -> None:
    # HSDP-like: ranks {0, 2} and {1, 3} hold different shards; -1 holds nothing.
    g = _gather(4, 1)
    g[1, 1:] += 5.0
    g[3, 1:] += 5.0  # the other group: different values, consistent within the group
    assert D.compare(g, [(0, 1, 0, 1)], [0], 1, D.REL_TOL).param_ranks == ()
    g[3, 1:] += 1.0
    cmp = D.compare(g, [(0, 1, 0, -1)], [0], 1, D.REL_TOL)  # rank 3 holds no replica
    assert cmp.param_ranks == () and cmp.param_rel == [0.0]


def _finding(gathered: torch.Tensor, names: list[str], layer_of: list[int], world: int, checks: int = 5) -> list[Any]:
    check = D.DesyncCheck([])
    check.layer_names, check.world, check.checks = names, world, checks
    cmp = D.compare(gathered, [(0,) * world] * len(layer_of), layer_of, len(names), check.rtol)
    return check.findings(cmp, 40)


def test_finding_names_layers_worst_first_with_the_ranks_and_the_cause() -> None:
    names = [f"blocks.{i}" for i in range(10)]
    g = _gather(3, 10, step=40)
    for i in range(10):
        g[_at(g, 1, i, 0, 1)] += 0.01 * (i + 1)  # rank 1's parameters, layer 9 the most
    (f,) = _finding(g, names, list(range(10)), 3)
    rel = [0.01 * (i + 1) / g[0, 1:].reshape(10, 2, 1 + K)[i, 0, 0].item() for i in range(10)]
    order = sorted(range(10), key=lambda i: -rel[i])
    assert (f.kind, f.source, f.step, f.layer, f.severity) == ("desync", "param", 40, None, "error")
    assert f.layers == tuple(names[i] for i in order)
    assert f.value == pytest.approx(max(rel), rel=1e-9) and f.threshold == D.REL_TOL
    assert f.evidence == (("grad_rel", 0.0), ("param_rel", f.value))
    shown = ", ".join(names[i] for i in order[:8])
    assert f.message == (
        f"gradwatch: data-parallel replicas differ at step 40: the parameters of 10 of 10 layers ({shown} and 2 "
        f"more) differ on rank 1 (the other ranks agree); largest relative difference {f.value:.2e} in layer "
        f"{names[order[0]]} (float32 tolerance 1.5e-05). Their gradients agree, so the updates differed: a rank "
        "skipped or repeated an optimizer step, or the weights were changed on one rank only (initialisation "
        "without a broadcast, a load on one rank); every rank now trains its own copy of the model."
    )
    assert remedies_for("desync", inspect_model(nn.Linear(2, 2)), source=f.source) == D.remedies("param")
    assert D.remedies("param")[0].startswith("Make every rank take every optimizer step")


def test_parameters_apart_at_the_first_comparison_point_at_the_start() -> None:
    g = _gather(2, 1, step=0)
    g[_at(g, 1, 0, 0, 0)] += 0.5
    (f,) = _finding(g, ["fc"], [0], 2, checks=1)
    assert f.source == "param_start"
    assert f.message.endswith(
        "Their gradients agree and this is the first comparison, before any update the monitor saw: the ranks "
        "started from different weights (initialisation without a broadcast, a checkpoint loaded on one rank "
        "only); every rank trains its own copy of the model."
    )
    assert D.remedies("param_start")[0].startswith("Start every rank from the same weights")


def test_finding_for_ranks_at_different_steps() -> None:
    g = _gather(2, 1, step=40)
    g[1, 0] = 39.0
    (f,) = _finding(g, ["fc"], [0], 2)
    assert (f.source, f.value, f.threshold) == ("step", 1.0, 0.0)
    assert f.message == (
        "gradwatch: the ranks compared their replicas at different steps (rank 0 at step 40, rank 1 at step 39): "
        "their monitors were not stepped the same number of times, so their collectives no longer pair up."
    )


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rtol": 0.0}, "`rtol` must be a positive finite number; got 0.0"),
    ({"rtol": float("inf")}, "`rtol` must be a positive finite number; got inf"),
    ({"projections": 0}, "`projections` must be an int >= 1; got 0"),
])
def test_bad_options_are_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message.replace('(', '[(]').replace(')', '[)]')}$"):
        D.DesyncCheck([], **kwargs)


# ---------------------------------------------------------------- 2-process jobs
@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run both scripts at once; return their output folders."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("desync", "desync_lightning")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(SCRIPTS / f"dist_{name}.py"), str(d)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for name, d in dirs.items()
    }
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            pytest.fail(f"dist_{name}.py timed out after {TIMEOUT_S}s:\n{out.decode()[-3000:]}")
        assert proc.returncode == 0, f"dist_{name}.py failed:\n{out.decode()[-3000:]}"
    return dirs


def ranks(d: Path) -> list[dict[str, Any]]:
    return [json.loads((d / f"rank{r}.json").read_text()) for r in range(C.WORLD)]


def simulate(steps: int, bug_from: int | None = None, skip: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """Both ranks in one process, in float64: per step, each rank's fingerprints before its update.

    Before ``bug_from`` the gradients are averaged over the ranks (DDP); from it on each rank keeps its
    own. ``skip = (rank, step)``: that rank does not update at that step.
    """
    models = [C.make_model().double() for _ in range(C.WORLD)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    out = []
    for step in range(steps):
        x, y = C.batch(step)
        for r, m in enumerate(models):
            C.loss_fn(m(C.shard(x, r).double()), C.shard(y, r).double()).backward()
        if bug_from is None or step < bug_from:
            for ps in zip(*(m.parameters() for m in models)):
                mean = sum(p.grad for p in ps) / C.WORLD
                for p in ps:
                    p.grad = mean.clone()
        out.append({
            which: [[_fingerprint64(p if which == "param" else p.grad, i) for i, p in enumerate(m.parameters())]
                    for m in models]
            for which in ("param", "grad")
        })
        for r, opt in enumerate(opts):
            if skip != (r, step):
                opt.step()
            opt.zero_grad(set_to_none=True)
    return out


def expected_rel(fp: list[list[list[float]]]) -> dict[str, float]:
    """Per layer: the largest |rank 0 - rank 1| over its parameters' fingerprint values, relative to the
    layer norm (the root of the sum of the smaller of the two norms squared: the median of two)."""
    out = {}
    for li, name in enumerate(C.LAYERS):
        params = [2 * li, 2 * li + 1]  # weight, bias
        scale = math.sqrt(sum(min(fp[0][i][0], fp[1][i][0]) ** 2 for i in params))
        diff = max(abs(a - b) for i in params for a, b in zip(fp[0][i], fp[1][i]))
        out[name] = diff / scale
    return out


def _message(step: int, what: str, rel: dict[str, float], value: float, tail: str) -> str:
    names = sorted(rel, key=lambda n: -rel[n])
    return (
        f"gradwatch: data-parallel replicas differ at step {step}: the {what} of 3 of 3 layers ({', '.join(names)}) "
        f"differ between ranks 0 and 1; largest relative difference {value:.2e} in layer {names[0]} (float32 "
        f"tolerance 1.5e-05). {tail}"
    )


def test_ddp_module_bug_raises_desync_at_the_next_logging_step_naming_every_layer(jobs: dict[str, Path]) -> None:
    first = -(-S.BUG_STEP // S.LOG_EVERY) * S.LOG_EVERY  # the first logging step from the bug on
    assert first == 8 and first - S.BUG_STEP < 2 * S.LOG_EVERY
    sim = simulate(first + 1, bug_from=S.BUG_STEP)
    for step in range(0, first, S.LOG_EVERY):
        assert max(expected_rel(sim[step]["grad"]).values()) == 0.0  # the reference agrees: no desync before
    grad = expected_rel(sim[first]["grad"])
    for r in ranks(jobs["desync"]):
        run = r["module_bug"]
        (alert,) = run["alerts"]
        assert (alert["kind"], alert["step"], alert["layer"], alert["severity"]) == ("desync", first, None, "error")
        assert alert["value"] == pytest.approx(max(grad.values()), rel=1e-4)
        assert alert["message"] == _message(
            first, "gradients", grad, alert["value"],
            "The gradients were not reduced across ranks before the step (a forward through ddp.module instead of "
            "the DDP wrapper, or a no_sync() left on), so every rank trains its own copy of the model.",
        )
        assert alert["remedies"] == list(D.remedies("grad"))
        assert alert["remedies"][0].startswith("Run the forward pass through the DistributedDataParallel wrapper")
        # The monitor's one collective per logging step, none on the others; the non-finite
        # agreement (on_nonfinite="skip") stays the one all-reduce of every step.
        assert run["all_gather"] == [int(s % S.LOG_EVERY == 0) for s in range(S.BUG_STEPS)]
        assert run["all_reduce"] == [1] * S.BUG_STEPS
        assert run["largest"][first] == [pytest.approx(max(expected_rel(sim[first]["param"]).values()), rel=1e-4),
                                          pytest.approx(max(grad.values()), rel=1e-4)]


def test_ddp_one_rank_skipping_a_step_raises_desync_naming_the_parameters(jobs: dict[str, Path]) -> None:
    first = -(-(S.SKIP_STEP + 1) // S.LOG_EVERY) * S.LOG_EVERY  # the parameters differ from SKIP_STEP + 1
    assert first == 8 and first - S.SKIP_STEP <= 2 * S.LOG_EVERY
    sim = simulate(first + 1, skip=(1, S.SKIP_STEP))
    param = expected_rel(sim[first]["param"])
    assert max(expected_rel(sim[first]["grad"]).values()) == 0.0  # DDP still averages the gradients
    for r in ranks(jobs["desync"]):
        run = r["skip_step"]
        (alert,) = run["alerts"]
        assert (alert["kind"], alert["step"]) == ("desync", first)
        assert alert["value"] == pytest.approx(max(param.values()), rel=1e-4)
        assert alert["message"] == _message(
            first, "parameters", param, alert["value"],
            "Their gradients agree, so the updates differed: a rank skipped or repeated an optimizer step, or the "
            "weights were changed on one rank only (initialisation without a broadcast, a load on one rank); every "
            "rank now trains its own copy of the model.",
        )
        assert alert["remedies"] == list(D.remedies("param"))
        assert run["all_gather"] == [int(s % S.LOG_EVERY == 0) for s in range(S.SKIP_STEPS)]


@pytest.mark.parametrize("run", ["healthy", "hsdp"])
def test_healthy_ddp_and_hsdp_replicas_are_bit_identical_and_silent(jobs: dict[str, Path], run: str) -> None:
    for r in ranks(jobs["desync"]):
        got = r[run]
        assert got["alerts"] == [] and "desync" not in got["kinds"]
        assert got["active"] is True and got["tracked"] == 6  # every parameter is a replica (DTensors under HSDP)
        assert got["checks"] == S.HEALTHY_STEPS
        assert got["largest"] == [[0.0, 0.0]] * S.HEALTHY_STEPS  # exactly: the same bits on both ranks
        assert got["all_gather"] == [1] * S.HEALTHY_STEPS  # log_every=1: one per step


def test_fsdp2_fully_sharded_has_nothing_to_compare(jobs: dict[str, Path]) -> None:
    for r in ranks(jobs["desync"]):
        got = r["fsdp_full"]
        assert (got["active"], got["checks"], got["alerts"]) == (False, 0, [])
        assert got["all_gather"] == [0] * S.PARTIAL_STEPS


def test_fsdp2_layer_outside_fully_shard_is_named_alone(jobs: dict[str, Path]) -> None:
    for r in ranks(jobs["desync"]):
        got = r["fsdp_partial"]
        assert got["tracked"] == 2  # the head's weight and bias: the sharded layers have no replica
        (alert,) = got["alerts"]
        assert (alert["step"], alert["layer"]) == (0, None)
        assert alert["message"].startswith(
            "gradwatch: data-parallel replicas differ at step 0: the gradients of 1 of 3 layers (4) differ between "
            "ranks 0 and 1; "
        )
        assert alert["message"].endswith(
            "These layers are outside every fully_shard call, so FSDP2 never reduces their gradients: every rank "
            "trains its own copy of them."
        )
        assert alert["remedies"] == list(D.remedies("grad_unsharded"))


def test_lightning_ddp_stays_silent_with_one_gather_per_logging_step(jobs: dict[str, Path]) -> None:
    import dist_desync_lightning as L

    for r in ranks(jobs["desync_lightning"]):
        assert r["world_size"] == 2 and r["steps"] == L.STEPS
        assert "desync" not in r["kinds"]
        assert (r["active"], r["tracked"], r["checks"], r["largest"]) == (True, 6, L.STEPS, 0.0)
        assert r["all_gather"] == L.STEPS  # during the whole fit: the monitor's, one per logging step
