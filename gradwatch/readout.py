"""The logging-step readout: named device tensors brought to the host in one transfer.

Every value that crosses from the device to the host at a logging step is registered here under
a name, and decoded by that name. Adding a metric is one ``add`` where it is computed and one
lookup where it is used; nothing depends on the order in which entries were added.

Example::

    out = Readout()
    out.add("grad_norm", stats.grad_norm)
    out.add("det/vanishing/fired_step", fired_step)
    values = out.read()            # one torch.cat(...).cpu()
    values["grad_norm"]            # list[float]
    values.scope("det/vanishing/") # {"fired_step": [...]}
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor


class Values(Mapping[str, list[float]]):
    """Host values of a :class:`Readout`, by name."""

    def __init__(self, values: dict[str, list[float]]) -> None:
        self._values = values
        self._heads: dict[str, dict[str, list[float]]] | None = None  # first segment -> its entries

    def __getitem__(self, name: str) -> list[float]:
        try:
            return self._values[name]
        except KeyError:
            raise KeyError(f"readout has no entry {name!r}; entries: {sorted(self._values)}") from None

    def __contains__(self, name: object) -> bool:  # Mapping's would raise (and format) a KeyError per miss
        return name in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def scalar(self, name: str) -> float:
        """The single value of a one-element entry."""
        v = self[name]
        if len(v) != 1:
            raise ValueError(f"readout entry {name!r} has {len(v)} values, not 1")
        return v[0]

    def scope(self, prefix: str) -> dict[str, list[float]]:
        """The entries under ``prefix``, with the prefix removed from their names."""
        head, sep, rest = prefix.partition("/")
        if sep and not rest:  # a first-segment prefix ("d3/", "ev/"): grouped once, looked up after
            if self._heads is None:
                self._heads = {}
                for k, v in self._values.items():
                    h, s, r = k.partition("/")
                    if s:
                        self._heads.setdefault(h, {})[r] = v
            return dict(self._heads.get(head, {}))
        n = len(prefix)
        return {k[n:]: v for k, v in self._values.items() if k.startswith(prefix)}


class Readout:
    """Named 1-D tensors to bring to the host together.

    Args:
        device: where the entries are concatenated (the statistics' device).
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self._entries: dict[str, Tensor] = {}

    def add(self, name: str, tensor: Tensor) -> None:
        """Register ``tensor`` (any shape, flattened) under ``name``; a name is added once."""
        if name in self._entries:
            raise ValueError(f"readout entry {name!r} is added twice")
        self._entries[name] = tensor

    def add_all(self, prefix: str, tensors: Mapping[str, Tensor]) -> None:
        """Register every ``name -> tensor`` of ``tensors`` as ``prefix + name``."""
        for name, t in tensors.items():
            self.add(prefix + name, t)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def read(self) -> Values:
        """One device-to-host transfer of every entry (float32); ``{}`` when empty (no transfer)."""
        if not self._entries:
            return Values({})
        dev = self.device if self.device is not None else next(iter(self._entries.values())).device
        f32 = torch.float32
        # Vectors go into the cat as they are (flattened and converted only when they must be); the
        # one-element entries are stacked into one vector first (one op, not a view per scalar), and a
        # cat of float32 alone (mixed dtypes make a CPU cat ~8x slower).
        vectors: list[tuple[str, Tensor]] = []
        scalars: list[tuple[str, Tensor]] = []
        with torch.no_grad():
            for name, t in self._entries.items():
                if t.device != dev or t.dtype != f32:
                    t = t.to(dev, f32)
                if t.dim() == 0:
                    scalars.append((name, t))
                else:
                    vectors.append((name, t if t.dim() == 1 else t.reshape(-1)))
            parts = [t for _, t in vectors]
            if scalars:
                parts.append(torch.stack([t for _, t in scalars]))
            host = (torch.cat(parts) if len(parts) > 1 else parts[0]).cpu().tolist()
        out: dict[str, list[float]] = {}
        i = 0
        for name, t in vectors:
            n = t.numel()
            out[name] = host[i : i + n]
            i += n
        for name, _ in scalars:
            out[name] = host[i : i + 1]
            i += 1
        return Values(out)
