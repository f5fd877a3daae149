"""Counting host syncs: patch the Tensor methods that read a value back to the host."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

READBACK_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")


@contextlib.contextmanager
def count_syncs(methods: tuple[str, ...] = READBACK_METHODS) -> Iterator[list[str]]:
    """Yield a list that records, in order, each of ``methods`` called on a Tensor inside the block."""
    calls: list[str] = []
    originals = {m: getattr(torch.Tensor, m) for m in methods}

    def wrap(name):
        orig = originals[name]

        def counted(self, *a, **k):
            calls.append(name)
            return orig(self, *a, **k)

        return counted

    for m in methods:
        setattr(torch.Tensor, m, wrap(m))
    try:
        yield calls
    finally:
        for m, orig in originals.items():
            setattr(torch.Tensor, m, orig)
