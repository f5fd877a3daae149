"""JSON Lines sink: one record per line, flushed at once so a crash loses at most the last line."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import IO, Any

from gradwatch.alerts import Alert
from gradwatch.distributed import is_rank_zero


def _clean(v: Any) -> Any:
    # Strict JSON has no NaN/Infinity: non-finite floats are written as the strings "nan", "inf", "-inf".
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


class JSONL:
    """Write ``meta``, ``metrics`` and ``alert`` records to a JSON Lines file.

    The file is opened lazily, on rank 0 only, at the first record (so every rank may build the
    same sink list); the folder is created then. Records::

        {"type": "meta", "version": "...", "layers": [...], ...}
        {"type": "metrics", "step": 0, "metrics": {"grad_norm/total": 1.2, ...}}
        {"type": "alert", "kind": "vanishing", "step": 3, "layer": "0", ...}

    Non-finite floats are written as the strings ``"nan"``, ``"inf"``, ``"-inf"``.

    Args:
        path: the file to write (truncated when opened).
        append: append instead of truncating.

    Raises:
        ValueError: if ``path`` is empty or names an existing folder, or its parent cannot be a
            folder (a file is in the way).
    """

    def __init__(self, path: str | os.PathLike[str], append: bool = False) -> None:
        if not str(path):
            raise ValueError("`path` must be a file path; got ''")
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"`path` must be a file, but {str(self.path)!r} is a folder")
        for parent in self.path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ValueError(
                        f"`path` {str(self.path)!r} cannot be created: {str(parent)!r} exists and is not a folder"
                    )
                if not os.access(parent, os.W_OK | os.X_OK):
                    raise ValueError(f"`path` {str(self.path)!r} cannot be created: {str(parent)!r} is not writable")
                break
        self.append = append
        self._fh: IO[str] | None = None
        self._closed = False

    def _write(self, record: dict[str, Any]) -> None:
        if self._closed or not is_rank_zero():
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a" if self.append else "w", encoding="utf-8")
        self._fh.write(json.dumps(_clean(record), allow_nan=False) + "\n")
        self._fh.flush()

    def log_meta(self, meta: dict[str, Any]) -> None:
        """Write the ``meta`` record."""
        self._write({"type": "meta", **meta})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Write a ``metrics`` record."""
        self._write({"type": "metrics", "step": step, "metrics": metrics})

    def log_alert(self, alert: Alert) -> None:
        """Write an ``alert`` record."""
        self._write({"type": "alert", **alert.to_dict()})

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._closed = True
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __repr__(self) -> str:
        return f"JSONL({str(self.path)!r})"


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read the records of a gradwatch JSONL file back (``"nan"``/``"inf"`` strings become floats)."""

    def fix(v: Any) -> Any:
        if v in ("nan", "inf", "-inf"):
            return float(v)
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    with open(path, encoding="utf-8") as fh:
        return [fix(json.loads(line)) for line in fh if line.strip()]
