"""JSON Lines: the gradwatch run format, its writer (the :class:`JSONL` sink) and its reader (:func:`read_jsonl`).

One record per line, flushed at once so a crash loses at most the last line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import IO, Any

from gradwatch.alerts import Alert
from gradwatch.distributed import is_rank_zero
from gradwatch.errors import warn_user


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
    same sink list); the folder is created then. Every line is flushed when written, so a crash
    loses at most the line being written, and :func:`read_jsonl` reads a run whose last line was cut.
    Records::

        {"type": "meta", "version": "...", "layers": [...], ...}
        {"type": "metrics", "step": 0, "metrics": {"grad_norm/total": 1.2, ...}}
        {"type": "alert", "kind": "vanishing", "step": 3, "layer": "0", ...}

    Non-finite floats are written as the strings ``"nan"``, ``"inf"``, ``"-inf"``.

    An earlier run is never lost. If ``path`` already holds one (a non-empty file) and neither
    ``append`` nor ``overwrite`` is set, this run goes to the next free versioned name beside it,
    ``grads-1.jsonl``, ``grads-2.jsonl``, ... (as Lightning's loggers add a ``version_N`` folder),
    :attr:`path` names the file written, and a :class:`~gradwatch.GradWatchWarning` says so once.

    Args:
        path: the file to write.
        append: add this run's records at the end of an existing file (a line cut by a crash is
            closed first, so the file stays readable).
        overwrite: replace an existing file.

    Raises:
        ValueError: if ``path`` is empty or names an existing folder, or its parent cannot be a
            folder (a file is in the way), or both ``append`` and ``overwrite`` are set.

    Attributes:
        path: the file written (the versioned name once the first record chose it).
        requested_path: the ``path`` given.
    """

    def __init__(self, path: str | os.PathLike[str], append: bool = False, overwrite: bool = False) -> None:
        if not str(path):
            raise ValueError("`path` must be a file path; got ''")
        if append and overwrite:
            raise ValueError(
                "`append` and `overwrite` cannot both be True: `append` adds to the file, `overwrite` replaces it"
            )
        self.path = Path(path)
        self.requested_path = self.path
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
        self.overwrite = overwrite
        self._fh: IO[str] | None = None
        self._closed = False

    def _open(self) -> IO[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        held = self.path.is_file() and self.path.stat().st_size > 0
        if held and self.append:
            fh = open(self.path, "a", encoding="utf-8")
            if not _ends_with_newline(self.path):
                fh.write("\n")  # close a line cut by a crash: the records after it stay readable
            return fh
        if held and not self.overwrite:
            self.path = _next_free(self.path)
            warn_user(
                f"gradwatch: {str(self.requested_path)!r} already holds a run; this run is written to "
                f"{str(self.path)!r}. Set `overwrite=True` to replace the file or `append=True` to add to it."
            )
        return open(self.path, "w", encoding="utf-8")

    def log_record(self, record: dict[str, Any]) -> None:
        """Write one record of any type (e.g. the demo's ``summary``) in this file's format.

        Raises:
            ValueError: ``record`` has no string ``"type"``.
        """
        if not isinstance(record.get("type"), str):
            raise ValueError(f"`record` must have a string 'type' field; got {record.get('type')!r}")
        if self._closed or not is_rank_zero():
            return
        if self._fh is None:
            self._fh = self._open()
        try:  # the common case: every float finite, written as it is (no walk over the record)
            line = json.dumps(record, allow_nan=False)
        except ValueError:
            line = json.dumps(_clean(record), allow_nan=False)
        self._fh.write(line + "\n")
        self._fh.flush()

    def log_meta(self, meta: dict[str, Any]) -> None:
        """Write the ``meta`` record."""
        self.log_record({"type": "meta", **meta})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Write a ``metrics`` record."""
        self.log_record({"type": "metrics", "step": step, "metrics": metrics})

    def log_alert(self, alert: Alert) -> None:
        """Write an ``alert`` record."""
        self.log_record({"type": "alert", **alert.to_dict()})

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._closed = True
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __repr__(self) -> str:
        return f"JSONL({str(self.path)!r})"


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def _next_free(path: Path) -> Path:
    """``grads.jsonl`` -> the first of ``grads-1.jsonl``, ``grads-2.jsonl``, ... that does not exist."""
    n = 1
    while (candidate := path.with_name(f"{path.stem}-{n}{path.suffix}")).exists():
        n += 1
    return candidate


def _restore(v: Any) -> Any:
    if v in ("nan", "inf", "-inf"):
        return float(v)
    if isinstance(v, dict):
        return {k: _restore(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_restore(x) for x in v]
    return v


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read the records of a gradwatch JSONL file back (``"nan"``/``"inf"`` strings become floats).

    A line cut by a crash (the last line of the file, or the last line of a run that a later run
    appended to, i.e. followed by a ``meta`` record) is skipped with a
    :class:`~gradwatch.GradWatchWarning` naming the file and the line; every other record is read.

    Raises:
        ValueError: a line elsewhere is not JSON, or a record is not a JSON object (the message names
            the file and the line).
    """
    parsed: list[tuple[int, Any, str | None]] = []  # (line number, record, error)
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    parsed.append((n, json.loads(line.strip()), None))
                except json.JSONDecodeError as exc:
                    parsed.append((n, None, f"{exc.msg}: column {exc.colno}"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not a gradwatch JSONL run: it is not UTF-8 text ({exc.reason})") from None
    records: list[dict[str, Any]] = []
    for i, (n, record, error) in enumerate(parsed):
        if error is not None:
            following = parsed[i + 1][1] if i + 1 < len(parsed) else None
            if i + 1 == len(parsed) or (isinstance(following, dict) and following.get("type") == "meta"):
                warn_user(
                    f"gradwatch: {str(path)!r} line {n} was cut (the run stopped while writing it); "
                    "that line is skipped, the other records are read."
                )
                continue
            raise ValueError(f"{str(path)!r} is not a gradwatch JSONL run: line {n} is not JSON ({error})")
        if not isinstance(record, dict):
            raise ValueError(
                f"{str(path)!r} is not a gradwatch JSONL run: line {n} is not a JSON object (got {record!r:.40})"
            )
        records.append(_restore(record))
    return records
