"""The update-ratio and carried-gradient samples: runs of whole cache lines, kept as views, against float64."""

from __future__ import annotations

import collections
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gradwatch import evidence
from gradwatch.evidence import GradCarry, UpdateTracker, _plan, _Sampler
from gradwatch.layers import discover_layers


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _stride(shape: tuple[int, ...], per_tensor: int = 1024, run: int = 16) -> int:
    """The documented rule, with the column condition checked by enumeration: the widest stride (a multiple of
    ``run`` where that is at least 16 runs) whose runs' start columns in a row are at most ``run`` apart."""
    n = math.prod(shape)
    widest = (n - run) // (per_tensor // run - 1)
    step = run if widest >= 16 * run else 1
    row = n // shape[0] if len(shape) >= 2 else n
    for s in range(widest // step * step, 0, -step):
        starts = sorted({s * j % row for j in range(row)})
        gaps = [b - a for a, b in zip(starts, [*starts[1:], starts[0] + row])]
        if row == n or max(gaps) <= run:
            return s
    raise AssertionError(shape)


def _entries(shape: tuple[int, ...], per_tensor: int = 1024) -> list[int]:
    """The flat indices a tensor of ``shape`` is sampled at: every entry, or runs of 16 at :func:`_stride`."""
    n = math.prod(shape)
    if n <= per_tensor:
        return list(range(n))
    s = _stride(shape, per_tensor)
    return [j * s + i for j in range(per_tensor // 16) for i in range(16)]


def _reference(tensors: list[torch.Tensor | None], params: list[nn.Parameter], per_tensor: int = 1024) -> torch.Tensor:
    """float64: the sampled entries of ``tensors`` (zeros for None), in the order of ``params`` (:func:`_params`)."""
    out = []
    for t, p in zip(tensors, params):
        idx = _entries(tuple(p.shape), per_tensor)
        out.append(torch.zeros(len(idx), dtype=torch.float64) if t is None else t.detach().reshape(-1).double()[idx])
    return torch.cat(out)


def _params(model: nn.Module, per_tensor: int = 1024, groups: int = 4, width: int = 64) -> list[nn.Parameter]:
    """Parameters in the samples' order: the grid first (those sampled by runs, then those sampled whole whose size is
    a multiple of ``width``); then the other ones sampled whole, the ``groups`` sizes with the most entries first (the
    smaller size first on a tie), one size after the other, then the rest; each in parameter order."""
    ps = list(model.parameters())
    runs = [p for p in ps if p.numel() > per_tensor]
    grid = runs + [p for p in ps if p.numel() <= per_tensor and p.numel() % width == 0]
    flat = [p for p in ps if not (p.numel() > per_tensor or p.numel() % width == 0)]
    entries = collections.Counter()
    for p in flat:
        entries[p.numel()] += p.numel()
    sizes = sorted(entries, key=lambda n: (-entries[n], n))[:groups]
    ordered = [p for n in sizes for p in flat if p.numel() == n] + [p for p in flat if p.numel() not in sizes]
    return grid + ordered


def test_runs_are_spread_over_the_tensor_and_start_in_every_part_of_a_row():
    assert _plan(0, (512, 512), 1024).stride == 4144 == _stride((512, 512))  # 259 lines: odd, so every block
    assert _plan(0, (100, 300), 1024).stride == 464 == _stride((100, 300))
    assert _plan(0, (64, 64, 3, 3), 1024).stride == 560 == _stride((64, 64, 3, 3))  # 35 lines: prime to 36
    assert _plan(0, (10, 512), 1024).stride == 81 == _stride((10, 512))  # < 16 runs: the full spread
    assert _plan(0, (4096,), 1024).stride == 64 == _stride((4096,))
    assert _plan(0, (2000, 7), 1024).stride == 221 == _stride((2000, 7))
    assert _plan(3, (512,), 1024) == _plan(3, (16, 32), 1024)  # at most 1024 entries: every one
    piece = _plan(0, (512, 512), 1024)
    assert (piece.runs, piece.run, piece.size) == (64, 16, 1024)
    starts = [j * piece.stride for j in range(piece.runs)]
    assert starts[-1] + 16 <= 512 * 512 and 512 * 512 - starts[-1] < 512 * 512 / 16  # the span, bar < 1/16
    blocks = collections.Counter(s % 512 // 16 for s in starts)
    assert sorted(blocks) == list(range(32)) and set(blocks.values()) == {2}  # every column block, twice
    assert len({s // 512 for s in starts}) == 64  # 64 rows, 8 apart
    assert piece.stride % 16 == 0  # runs of whole 64-byte lines
    small = _plan(0, (8, 1000), 256)
    assert (small.runs, small.run, small.stride) == (16, 16, 528) and _stride((8, 1000), 256) == 528
    tiny = _plan(0, (40,), 8)  # fewer entries than a run: one run of them
    assert (tiny.runs, tiny.run, tiny.stride, tiny.size) == (1, 8, 8, 8)


def test_kept_views_follow_updates_and_are_remade_when_the_storage_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 100), nn.Linear(100, 7), nn.Linear(7, 2000))  # runs, whole, runs
    model[1].weight.data = model[1].weight.data.t().contiguous().t()  # non-contiguous: sampled afresh
    sampler = _Sampler(discover_layers(model, "module"), 1024, torch.device("cpu"))
    params = _params(model)
    assert sampler.params == params
    first = sampler.weights()
    assert first.numel() == sampler.entries == 3 * 1024 + 100 + 700 + 7
    assert sampler.index.tolist() == [0] * 1024 + [2] * 2048 + [1] * 700 + [0] * 100 + [1] * 7  # whole: by size
    assert torch.equal(first.double(), _reference(params, params))
    with torch.no_grad():
        model[0].weight.mul_(3.0)  # in place (the optimizer's way): the kept view sees it
    assert torch.equal(sampler.weights().double(), _reference(params, params))
    assert not torch.equal(sampler.weights(), first)
    model[0].weight.data = torch.randn(100, 300)  # new storage: the view is remade
    assert torch.equal(sampler.weights().double(), _reference(params, params))
    model.double()  # new dtype: remade, still float32 out
    got = sampler.weights()
    assert got.dtype == torch.float32 and torch.equal(got, _reference(params, params).float())
    model.half()
    assert torch.equal(sampler.weights().double(), _reference(params, params))


def _expected(after: torch.Tensor, before: torch.Tensor, owner: torch.Tensor, n: int) -> list[float]:
    """float64 ratios ``||after - before|| / ||before||`` per layer over the sampled entries (NaN: zero weights)."""
    out = []
    for i in range(n):
        w2 = float(before[owner == i].square().sum())
        out.append(math.sqrt(float((after - before)[owner == i].square().sum()) / w2) if w2 else math.nan)
    return out


@pytest.mark.parametrize("groups", [4, 1], ids=["blocks", "blocks_and_rest"])
@pytest.mark.parametrize("segmented", [True, False], ids=["segment_reduce", "index_add"])
def test_update_ratio_matches_a_float64_reference_of_the_sampled_entries(segmented, groups, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(300, 100),
        nn.Tanh(),
        nn.Linear(100, 48),
        nn.Unflatten(1, (16, 3)),
        nn.Conv1d(16, 512, 3),
        nn.Flatten(),
        nn.LayerNorm(512),
    )
    monkeypatch.setattr(evidence, "SIZE_GROUPS", groups)
    tracker = UpdateTracker(discover_layers(model, "module"), torch.device("cpu"))
    tracker._sampler.segmented = segmented
    sampler = tracker._sampler
    params = _params(model, groups=groups)
    assert sampler.params == params
    layer = {id(p): i for i, m in enumerate((model[0], model[2], model[4], model[6])) for p in m.parameters()}
    owner = torch.tensor([layer[id(p)] for p in params for _ in _entries(tuple(p.shape))])
    assert torch.equal(sampler.index, owner)
    # the grid: 3 weights by runs and the 3 tensors of 512, in rows of 512 (the widest dividing both sizes); off it,
    # 100 and 48 as blocks of their own, or 48 in the rest
    assert (sampler.grid_entries, sampler.rows, sampler.width) == (3 * 1024 + 3 * 512, 9, 512)
    blocks = [(1, 100), (1, 48)] if groups > 1 else [(1, 100)]
    assert [(b.count, b.size) for b in sampler.blocks] == blocks
    assert sampler.rest == ((sampler.entries, 11) if groups > 1 else (4608 + 100, 10))
    assert sampler.columns == 11
    assert sampler.column_layer.tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3] + [0, 1]
    before = _reference(params, params)
    tracker.snapshot(step=7)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    model(torch.randn(32, 300)).square().mean().backward()
    opt.step()
    step, ratio = tracker.measure()
    assert step == 7 and ratio.dtype == torch.float32
    assert ratio.tolist() == pytest.approx(_expected(_reference(params, params), before, owner, 4), rel=1e-5)
    assert tracker.measure() is None  # one measure per snapshot
    rest = 0 if segmented or groups > 1 else 8 * 48  # the rest's piece of each entry, without segment_reduce
    assert tracker.memory_bytes == (3 * 1024 + 100 + 48 + 512 + 512 + 512) * 8 + rest


def test_a_snapshot_of_the_weights_the_measure_just_sampled_keeps_that_sample():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 100), nn.Tanh(), nn.Linear(100, 10), nn.LayerNorm(10))
    tracker = UpdateTracker(discover_layers(model, "module"), torch.device("cpu"))
    params = _params(model)
    layer = {id(p): i for i, m in enumerate((model[0], model[2], model[3])) for p in m.parameters()}
    owner = torch.tensor([layer[id(p)] for p in params for _ in _entries(tuple(p.shape))])
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    tracker.snapshot(step=0)
    for step in range(1, 5):  # log_every=1: a measure, then at once the snapshot of the same weights
        before = _reference(params, params)
        model(torch.randn(16, 300)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        with _Ops() as ops:
            measured, ratio = tracker.measure()
        assert measured == step - 1
        assert ratio.tolist() == pytest.approx(_expected(_reference(params, params), before, owner, 3), rel=1e-5)
        with _Ops() as snap:
            tracker.snapshot(step, same_weights=True)
        # the measure's sample and sums, as they are; 0 / ||w||^2 made here after a fresh snapshot, then by the measure
        assert dict(snap.ops) == ({"div": 1} if step == 1 else {})
        assert ops.ops["div"] == (0 if step == 1 else 1)
        assert ops.ops["cat"] == 2
    tracker.snapshot(9, same_weights=True)  # no measure since: sampled afresh
    assert tracker._after is None
    before = _reference(params, params)
    with torch.no_grad():
        model[0].weight.mul_(1.1)
    _, ratio = tracker.measure()
    assert ratio.tolist() == pytest.approx(_expected(_reference(params, params), before, owner, 3), rel=1e-5)


def test_a_half_precision_model_is_sampled_into_float32_and_moved_weights_are_followed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 100), nn.Linear(100, 4)).half()
    tracker = UpdateTracker(discover_layers(model, "module"), torch.device("cpu"))
    params = _params(model)
    before = _reference(params, params)
    tracker.snapshot(step=3)
    with torch.no_grad():
        model[0].weight.add_(torch.randn(100, 300).half())
    model[1].weight.data = model[1].weight.data * 2  # new storage between the snapshot and the measure
    step, ratio = tracker.measure()
    after = _reference(params, params)
    first = {id(p) for p in model[0].parameters()}
    owner = torch.tensor([0 if id(p) in first else 1 for p in params for _ in _entries(tuple(p.shape))])
    expected = [
        math.sqrt(float((after - before)[owner == i].square().sum()) / float(before[owner == i].square().sum()))
        for i in (0, 1)
    ]
    assert step == 3 and ratio.tolist() == pytest.approx(expected, rel=1e-5)
    assert tracker.measure() is None
    assert UpdateTracker([], torch.device("cpu")).measure() is None
    empty = UpdateTracker([], torch.device("cpu"))
    empty.snapshot(step=0)
    step, ratio = empty.measure()
    assert step == 0 and ratio.shape == (0,)


def test_a_zero_initialised_layer_has_no_ratio():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))  # every entry sampled
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)
    tracker = UpdateTracker(discover_layers(model, "module"), torch.device("cpu"))
    tracker.snapshot(step=0)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
        model[1].weight.add_(0.1)
    _, ratio = tracker.measure()
    w = model[0].weight.detach().double() / 1.5
    b = model[0].bias.detach().double()
    expected = math.sqrt(float((0.5 * w).square().sum()) / float(w.square().sum() + b.square().sum()))
    assert ratio[0].item() == pytest.approx(expected, rel=1e-5)
    assert math.isnan(ratio[1].item())


def test_a_snapshot_and_a_measure_dispatch_the_same_ops_whatever_the_depth():
    seen = []
    for depth in (2, 48):
        model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(depth)], nn.Linear(64, 10))  # a bias off the grid
        tracker = UpdateTracker(discover_layers(model, "module"), torch.device("cpu"))
        tracker.snapshot(step=0)  # makes the views
        tracker.measure()
        with _Ops() as snap:
            tracker.snapshot(step=10)
        # the grid (weights by runs, biases of 64) and the tensors off it into the kept buffer; a norm of the grid's
        # rows and one per block off it (the bias of 10), squared, summed per layer; 0 / ||w||^2 (NaN where zero)
        assert dict(snap.ops) == {"cat": 2, "linalg_vector_norm": 2, "pow_": 1, "index_add": 1, "div": 1}, depth
        assert tracker._buf is not None and tracker.pending
        before = tracker._buf.rows[tracker._before].clone()
        with torch.no_grad():
            model[0].weight.add_(1.0)
        assert not torch.equal(before.double(), _reference(_params(model), _params(model)))  # a copy, not a view
        assert torch.equal(tracker._buf.rows[tracker._before], before)
        with _Ops() as meas:
            tracker.measure()
        seen.append(dict(meas.ops))
    assert (
        seen[0]
        == seen[1]
        == {
            "cat": 2,
            "sub_": 1,
            "linalg_vector_norm": 2,
            "pow_": 1,
            "index_add": 1,  # into a kept output: no new tensor to unbind
            "addcdiv": 1,  # 0 / ||w||^2 + ||dw||^2 / ||w||^2: NaN where the weights were zero
            "sqrt_": 1,
        }
    )


def test_the_sizes_beyond_the_blocks_take_one_segment_reduction_whatever_their_number():
    seen = []
    for depth in (8, 40):
        widths = [40 + i for i in range(depth + 1)]  # weights by runs (the grid); a bias size per layer (off it)
        model = nn.Sequential(*[nn.Linear(widths[i], widths[i + 1]) for i in range(depth)])
        tracker = UpdateTracker(discover_layers(model, "module"), torch.device("cpu"))
        assert len(tracker._sampler.blocks) == 4  # off the grid: the 4 sizes with the most entries
        params = _params(model)
        layer = {id(p): i for i, m in enumerate(model) for p in m.parameters()}
        owner = torch.tensor([layer[id(p)] for p in params for _ in _entries(tuple(p.shape))])
        tracker.snapshot(step=0)
        tracker.measure()
        before = _reference(params, params)
        tracker.snapshot(step=1)
        with torch.no_grad():
            for i, m in enumerate(model):
                m.bias.mul_(1 + 0.01 * i)
                m.weight.add_(0.001 * i)
        with _Ops() as meas:
            _, ratio = tracker.measure()
        assert ratio.tolist() == pytest.approx(_expected(_reference(params, params), before, owner, depth), rel=1e-5)
        seen.append(dict(meas.ops))
    assert seen[0] == seen[1]
    assert seen[0]["linalg_vector_norm"] == 5 and seen[0]["segment_reduce"] == 1


def test_carried_gradients_are_sampled_by_runs_from_kept_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8), nn.Linear(8, 8))  # 4096 weights: runs
    carry = GradCarry(discover_layers(model, "module"), torch.device("cpu"))
    params = _params(model, 256)
    x = torch.randn(5, 64)
    model[:2](x).sum().backward()  # the last layer has no gradient
    assert carry.observe() is None  # first look: nothing to compare
    model[:2](x).sum().backward()  # accumulated into the same tensors
    sample = carry.observe()
    assert sample is not None and sample.carried.tolist() == [True, True, False]
    grads = [p.grad for p in params]
    assert [p is model[2].weight or p is model[2].bias for p in params] == [False] * 3 + [True, False, True]
    assert grads[-1] is None and grads[-3] is None
    assert torch.equal(sample.values.double(), _reference(grads, params, 256))
    assert sample.layer.tolist() == [0] * 256 + [1] * 256 + [0] * 64 + [2] * 64 + [1] * 8 + [2] * 8
    model[:2](x).sum().backward()
    again = carry.observe()  # the kept views follow the accumulation
    assert again is not None and torch.equal(again.values.double(), _reference([p.grad for p in params], params, 256))
    assert carry._kept.ptrs == [0 if g is None else g.data_ptr() for g in grads]  # the views were kept
    assert not torch.equal(again.values, sample.values)
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    assert carry.observe() is None  # new tensors: nothing carried


def test_carried_gradients_are_found_from_the_gradients_the_caller_read():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8), nn.Linear(8, 8))
    carry = GradCarry(discover_layers(model, "module"), torch.device("cpu"))
    assert carry.params == list(model.parameters())  # layer order: what the caller hands over
    x = torch.randn(5, 64)

    def grads() -> list[torch.Tensor | None]:
        return [p.grad for p in model.parameters()]

    model[:2](x).sum().backward()  # the last layer has no gradient, at every step
    assert carry.observe(grads()) is None  # first look
    model.zero_grad(set_to_none=True)
    model[:2](x).sum().backward()
    with _Ops() as ops:
        assert carry.observe(grads()) is None  # new tensors; two steps without a gradient are not alike
    assert not ops.ops
    model[0].zero_grad(set_to_none=True)  # layer 0 zeroed, layer 1 carried
    model[:2](x).sum().backward()
    sample = carry.observe(grads())
    assert sample is not None and sample.carried.tolist() == [False, True, False]
    params = _params(model, 256)
    assert torch.equal(sample.values.double(), _reference([p.grad for p in params], params, 256))
    model[2](torch.randn(3, 8)).sum().backward()  # a gradient appears: new, not carried
    model[0].zero_grad(set_to_none=True)
    model[:2](x).sum().backward()
    sample = carry.observe(grads())
    assert sample is not None and sample.carried.tolist() == [False, True, False]
    assert carry.observe(grads()[:-1]) is not None  # a list of another length is not taken: .grad read here
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    assert carry.observe(grads()) is None


def test_evidence_at_every_step_measures_each_update_and_caches_the_optimizer_masks():
    from gradwatch.evidence import Evidence

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 100), nn.Tanh(), nn.Linear(100, 10))
    layers = discover_layers(model, "module")
    ev = Evidence(model, layers, lambda: False)
    ev.bind(layers, torch.device("cpu"))
    opt = torch.optim.SGD([model[0].weight, model[0].bias], lr=0.1)
    params = _params(model)
    first = {id(p) for p in model[0].parameters()}
    owner = torch.tensor([0 if id(p) in first else 1 for p in params for _ in _entries(tuple(p.shape))])
    before = None
    for step in range(4):  # log_every=1: begin measures the last update, end keeps the sample begin took
        model(torch.randn(8, 300)).square().mean().backward()
        grads = [p.grad for p in model.parameters()]
        with _Ops() as ops:
            out = ev.begin(step, None, opt, grads)
        if before is None:
            assert out["update_ratio"] is None and dict(ops.ops) == {"lift_fresh": 1}  # the mask, made once
        else:
            expected = _expected(_reference(params, params), before, owner, 2)
            assert expected[1] == 0.0  # the second layer is not the optimizer's
            assert out["update_ratio"].tolist() == pytest.approx(expected, rel=1e-5)
        assert out["optimized"].tolist() == [True, False] and out["optimizer_inert"] is False
        assert out["carried"] is None and out["unreached"] is None
        with _Ops() as ops:
            ev.end(step, logging=True)
        # after a measure: its sample and sums; 0 / ||w||^2 made here once, then by the measures (a run of them)
        assert dict(ops.ops) == ({"div": 1} if step == 1 else {}) or before is None
        before = _reference(params, params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
    mask = out["optimized"]
    assert ev.begin(4, None, opt)["update_ratio"] is not None
    ev.end(4, logging=False)
    with _Ops() as ops:  # a non-logging step with nothing to measure: host work only
        out = ev.begin(5, None, opt, [p.grad for p in model.parameters()])
    assert not ops.ops and out["optimized"] is mask and out["update_ratio"] is None  # kept while the groups stay
    opt.add_param_group({"params": [model[2].weight]})
    assert ev.begin(6, None, opt)["optimized"].tolist() == [True, True]
    assert ev.begin(7, None, None)["optimized"].tolist() == [True, True]  # the last optimizer seen


def test_the_grid_takes_the_widest_rows_common_to_its_tensors():
    def sampler(*modules: nn.Module, per_tensor: int = 1024) -> _Sampler:
        return _Sampler(discover_layers(nn.Sequential(*modules), "module"), per_tensor, torch.device("cpu"))

    # weights by runs (1024), biases of 128 and 384, a LayerNorm of 512: rows of 128; the classifier's 1000 off it
    s = sampler(nn.Linear(512, 128), nn.Linear(128, 384), nn.LayerNorm(512), nn.Linear(128, 1000))
    assert (s.width, s.rows, s.grid_entries) == (128, 3 * 8 + 1 + 3 + 4 + 4, 3 * 1024 + 128 + 384 + 512 + 512)
    assert [(b.count, b.size) for b in s.blocks] == [(1, 1000)] and s.columns == s.rows + 1
    s = sampler(nn.Linear(64, 64), nn.Linear(64, 10))  # 64 divides every grid tensor; 640 is a multiple of it
    assert (s.width, s.rows) == (64, 16 + 1 + 10) and [b.size for b in s.blocks] == [10]
    s = sampler(nn.Linear(5, 7), nn.LayerNorm(7))  # nothing of a multiple of 64: no grid, blocks only
    assert (s.rows, s.grid_entries) == (0, 0) and [(b.count, b.size) for b in s.blocks] == [(1, 35), (3, 7)]
    tracker = UpdateTracker(discover_layers(nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7)), "module"), s.device)
    tracker.snapshot(0)
    assert tracker.measure()[1].tolist() == [0.0, 0.0]  # nothing moved: a zero update, measured without a grid
    s = sampler(nn.Linear(64, 64), per_tensor=256)  # the carried-gradient sample: runs of 256, rows of 64
    assert (s.width, s.rows, s.columns) == (64, 5, 5)


def test_every_measure_of_a_log_every_1_run_matches_the_reference_and_keeps_its_ratio():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10))
    tracker = UpdateTracker(discover_layers(model, "module"), torch.device("cpu"))
    params = _params(model)
    layer = {id(p): i for i, m in enumerate(model) for p in m.parameters()}
    owner = torch.tensor([layer[id(p)] for p in params for _ in _entries(tuple(p.shape))])
    tracker.snapshot(0)
    ratios, expected = [], []
    for step in range(1, 4):  # log_every=1
        before = _reference(params, params)
        with torch.no_grad():
            model[0].weight.mul_(1 + 0.1 * step)
            model[1].bias.add_(0.01)
        _, ratio = tracker.measure()
        tracker.snapshot(step, same_weights=True)
        ratios.append(ratio)
        expected.append(_expected(_reference(params, params), before, owner, 2))
        assert ratios[-1].tolist() == pytest.approx(expected[-1], rel=1e-5)
        if step >= 2:  # the last measure's ratio, untouched by this one
            assert ratios[-2].tolist() == pytest.approx(expected[-2], rel=1e-5)
    with torch.no_grad():  # the run ends (log_every=2 from here): a measure, then a fresh snapshot of other weights
        model[0].weight.mul_(0.5)
    tracker.measure()
    with torch.no_grad():
        nn.init.zeros_(model[1].weight)
        nn.init.zeros_(model[1].bias)
    tracker.snapshot(4)
    before = _reference(params, params)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
        model[1].bias.add_(0.01)
    _, ratio = tracker.measure()
    got = _expected(_reference(params, params), before, owner, 2)
    assert math.isnan(got[1]) and ratio[0].item() == pytest.approx(got[0], rel=1e-5) and math.isnan(ratio[1].item())


def test_evidence_at_a_logging_step_dispatches_a_fixed_number_of_ops_whatever_the_depth():
    from gradwatch.evidence import Evidence

    seen = []
    for depth in (2, 24):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(depth)], nn.Linear(64, 10))
        layers = discover_layers(model, "module")
        ev = Evidence(model, layers, lambda: True)
        ev.bind(layers, torch.device("cpu"))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(3):  # log_every=1
            loss = model(torch.randn(4, 64)).square().mean()
            loss.backward()
            loss = loss.detach()
            with _Ops() as ops:
                ev.begin(step, loss, opt, [p.grad for p in model.parameters()])
                ev.end(step, logging=True)
                out = ev.readout()
            values = {k: v.reshape(-1).tolist() for k, v in out.items()}  # as the monitor's one transfer flattens
            ev.absorb(values, grad_norm=[1.0] * (depth + 1), param_norm=[2.0] * (depth + 1))
            opt.step()
            model.zero_grad(set_to_none=True)
        seen.append(dict(ops.ops))
    # the measure: the grid and the classifier's bias into the kept row, the update, a norm of the grid's rows and
    # one of the bias, squared, summed per layer into a kept output, the ratio; the snapshot keeps its sample and
    # sums (0 / ||w||^2, one op); the readout hands the one loss recorded by reference and its tensors as they are
    assert seen[0] == seen[1]
    measure = {"cat": 2, "sub_": 1, "linalg_vector_norm": 2, "pow_": 1, "index_add": 1, "addcdiv": 1, "sqrt_": 1}
    assert seen[0] == {**measure, "div": 1}, seen[0]


def _logging_step(ev, model, opt, step, grad_norm=None, param_norm=None):  # noqa: ANN001, ANN202
    """One log_every=1 step of the evidence alone: begin, end, the transfer, absorb; then the optimizer steps."""
    model(torch.randn(4, 64)).square().mean().backward()
    ev.begin(step, None, opt, [p.grad for p in model.parameters()])
    ev.end(step, logging=True)
    ev.absorb({k: v.reshape(-1).tolist() for k, v in ev.readout().items()}, grad_norm=grad_norm, param_norm=param_norm)
    opt.step()
    model.zero_grad(set_to_none=True)
    return ev.snapshot()


def test_a_logging_step_without_weight_norms_relates_its_gradients_to_the_last_weight_norms_read():
    from gradwatch.evidence import Evidence

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10))
    layers = discover_layers(model, "module")
    ev = Evidence(model, layers, lambda: False)
    ev.bind(layers, torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    a, b = (x.name for x in layers)
    _logging_step(ev, model, opt, 0, [1.0, 3.0], None)  # no weight norms read yet: nothing to relate the gradients to
    snap = _logging_step(ev, model, opt, 1, [1.0, 3.0], None)
    assert snap.update_step == 0 and snap.update_grad_ratio == {} and snap.peak_update is None
    snap = _logging_step(ev, model, opt, 2, [1.0, 200.0], [2.0, 2.0])
    assert snap.update_step == 1 and snap.update_grad_ratio == {}
    snap = _logging_step(ev, model, opt, 3, [4.0, 300.0], None)  # this step's gradients over step 2's weight norms
    assert snap.update_step == 2 and snap.update_grad_ratio == {a: 0.5, b: 100.0}
    assert snap.peak_update is not None and snap.peak_update[0] == a and snap.peak_update[2] == 2  # b: exploding
    snap = _logging_step(ev, model, opt, 4, [1.0, 1.0], [0.0, 4.0])  # zero weights: no ratio for that layer
    assert snap.update_step == 3 and snap.update_grad_ratio == {a: 2.0, b: 150.0}
    snap = _logging_step(ev, model, opt, 5, [1.0, 1.0], None)
    assert snap.update_step == 4 and snap.update_grad_ratio == {b: 0.25}
    assert set(snap.update_ratio) == {a, b} and snap.update_ratio[a] > 0


def test_the_optimizer_evidence_reads_the_hyper_parameters_afresh_and_the_holdings_while_the_groups_stay():
    from gradwatch.evidence import Evidence

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10))
    layers = discover_layers(model, "module")
    ev = Evidence(model, layers, lambda: False)
    ev.bind(layers, torch.device("cpu"))
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    a, b = (x.name for x in layers)
    info = _logging_step(ev, model, opt, 0).optimizer
    assert info is not None and info.describe() == "SGD lr 0.1 momentum 0.9" and info.groups[0].layers == (a,)
    opt.param_groups[0]["lr"] = 0.05  # a scheduler's change: read at the next logging step
    info = _logging_step(ev, model, opt, 1).optimizer
    assert info.lr_of(a) == 0.05 and info.trainable_held == 2
    opt.add_param_group({"params": list(model[1].parameters()), "lr": 0.2})
    info = _logging_step(ev, model, opt, 2).optimizer
    assert [g.layers for g in info.groups] == [(a,), (b,)] and info.lr_of(b) == 0.2 and info.trainable_held == 4
    assert info == evidence.describe_optimizer(opt, layers, model)


def test_the_evidence_snapshot_follows_the_loss_and_the_input_at_every_logging_step():
    from gradwatch.evidence import Evidence

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10))
    layers = discover_layers(model, "module")
    ev = Evidence(model, layers, lambda: True)
    ev.bind(layers, torch.device("cpu"))
    assert ev.snapshot() == evidence.EvidenceSnapshot()  # nothing absorbed yet
    losses = [2.0, 1.5, 3.0, 1.0, None, 4.0]
    ema = best = start = None
    since, jump = 0, None
    for step, loss in enumerate(losses):
        x = torch.randn(8, 64) * (step + 1)
        model(x).square().mean().backward()
        ev.begin(step, None if loss is None else torch.tensor(loss), None, [p.grad for p in model.parameters()])
        ev.end(step, logging=True)
        ev.absorb({k: v.reshape(-1).tolist() for k, v in ev.readout().items()})
        model.zero_grad(set_to_none=True)
        jump = None
        if loss is not None and ema is None:
            ema = best = start = loss
        elif loss is not None:  # the documented recursion: EMA 0.9, improved below 99% of the best
            jump = (loss / ema, step)
            ema = 0.9 * ema + 0.1 * loss
            best, since = (ema, 0) if ema < 0.99 * best else (best, since + 1)
        snap = ev.snapshot()
        assert (snap.loss_start, snap.loss_best, snap.loss_stalled) == (start, pytest.approx(best), since), step
        assert snap.loss_last == [v for v in losses[: step + 1] if v is not None][-1]
        assert (snap.loss_jump, snap.loss_jump_step) == ((pytest.approx(jump[0]), jump[1]) if jump else (None, None))
        assert snap.input_rms == pytest.approx(float(x.double().square().mean().sqrt()), rel=1e-6)
        assert snap.batch_size == 8 and snap.input_layer == ""
        assert ev.snapshot() is snap  # made once per logging step
        assert ev.snapshot((("ratio", 2.0),)).finding == {"ratio": 2.0}
