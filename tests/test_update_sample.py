"""The update-ratio weight sample kept as views across steps: the same entries, one op per logging step."""

from __future__ import annotations

import collections

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gradwatch.evidence import UpdateTracker, _Sampler
from gradwatch.layers import discover_layers


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _reference(sampler: _Sampler) -> torch.Tensor:
    """The sample made afresh from every parameter (what ``weights()`` must equal)."""
    return sampler.take([p for _, p, _ in sampler.params])


def test_kept_views_follow_updates_and_are_remade_when_the_storage_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 100), nn.Linear(100, 7))  # a strided weight sample, exact biases
    model[1].weight.data = model[1].weight.data.t().contiguous().t()  # non-contiguous: sampled afresh
    sampler = _Sampler(discover_layers(model, "module"), 1024, torch.device("cpu"))
    first = sampler.weights()
    assert first.numel() == 1000 + 100 + 700 + 7
    assert torch.equal(first, _reference(sampler))
    with torch.no_grad():
        model[0].weight.mul_(3.0)  # in place (the optimizer's way): the kept view sees it
    assert torch.equal(sampler.weights(), _reference(sampler))
    assert not torch.equal(sampler.weights(), first)
    model[0].weight.data = torch.randn(100, 300)  # new storage: the view is remade
    assert torch.equal(sampler.weights(), _reference(sampler))
    model.double()  # new dtype: remade, still float32 out
    got = sampler.weights()
    assert got.dtype == torch.float32 and torch.equal(got, _reference(sampler))
    model.half()
    assert torch.equal(sampler.weights(), _reference(sampler))


def test_a_snapshot_is_one_copy_whatever_the_depth():
    for depth in (2, 48):
        model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(depth)])
        tracker = UpdateTracker(discover_layers(model, "module"), torch.device("cpu"))
        tracker.snapshot(step=0)  # makes the views
        tracker.measure()
        with _Ops() as counted:
            tracker.snapshot(step=10)
        assert dict(counted.ops) == {"cat": 1}, depth
        before = tracker._before
        assert before is not None
        with torch.no_grad():
            model[0].weight.add_(1.0)
        assert not torch.equal(before, _reference(tracker._sampler))  # the snapshot is a copy, not a view
