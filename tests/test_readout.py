"""The logging step's one transfer: named entries in, the same names out, whatever the dtypes."""

from __future__ import annotations

import pytest
import torch

from gradwatch.readout import Readout


def test_entries_come_back_by_name_as_float32_values():
    out = Readout(torch.device("cpu"))
    out.add("m/grad_norm", torch.tensor([1.5, 2.25]))
    out.add("d0/fired", torch.tensor([True, False, True]))
    out.add("d0/step", torch.tensor(7, dtype=torch.int64))
    out.add("d1/x", torch.tensor([[0.1]], dtype=torch.float64, requires_grad=True))
    out.add("m/amp/scale", torch.tensor(65536.0))
    values = out.read()
    assert dict(values) == {
        "m/grad_norm": [1.5, 2.25],
        "d0/fired": [1.0, 0.0, 1.0],
        "d0/step": [7.0],
        "d1/x": [float(torch.tensor(0.1, dtype=torch.float32))],  # converted to float32 like every entry
        "m/amp/scale": [65536.0],
    }
    assert values.scalar("d0/step") == 7.0
    # A first-segment scope and a deeper one give the same entries, prefix removed.
    assert values.scope("d0/") == {"fired": [1.0, 0.0, 1.0], "step": [7.0]}
    assert values.scope("m/") == {"grad_norm": [1.5, 2.25], "amp/scale": [65536.0]}
    assert values.scope("m/amp/") == {"scale": [65536.0]}
    assert values.scope("d2/") == {}
    # A scope is a copy: changing it leaves the values as read.
    values.scope("d0/").clear()
    assert values.scope("d0/") == {"fired": [1.0, 0.0, 1.0], "step": [7.0]}


def test_misuse_is_named():
    out = Readout()
    out.add("a", torch.zeros(1))
    with pytest.raises(ValueError, match="readout entry 'a' is added twice"):
        out.add("a", torch.zeros(1))
    values = out.read()
    with pytest.raises(KeyError, match=r"readout has no entry 'b'; entries: \['a'\]"):
        values["b"]
    assert dict(Readout().read()) == {}
