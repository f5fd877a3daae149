"""Read a W&B run's ``.wandb`` transaction log back (wandb 0.31 ships no Python reader).

The file is a LevelDB-style log: a 7-byte header (``b":W&B"``, magic ``0xBEE1`` little-endian,
version ``0``), then 32 KiB blocks of chunks, each with a 7-byte header ``<IHB`` (masked CRC-32C
of type byte + data, data length, chunk type: 1 full, 2 first, 3 middle, 4 last). A record that
does not fit in a block is split into first/middle/last chunks; fewer than 7 bytes left at the
end of a block are zero padding. Each reassembled record is a serialized
``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

HEADER = b":W&B" + struct.pack("<H", 0xBEE1) + bytes([0])
BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[pb.Record]:
    """Every record of a ``.wandb`` file, in write order.

    Raises:
        ValueError: the header is not a W&B log header, or a chunk is malformed.
    """
    data = Path(path).read_bytes()
    if data[: len(HEADER)] != HEADER:
        raise ValueError(f"{path}: not a W&B transaction log (header {data[:7]!r})")
    records: list[pb.Record] = []
    pos = len(HEADER)
    pending: bytearray | None = None
    while pos < len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:
            pos += left_in_block  # zero padding at the end of a block
            continue
        if pos + CHUNK_HEADER > len(data):
            break
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if kind == 0 and length == 0:  # zero padding written before a block was full
            pos += left_in_block
            continue
        start = pos + CHUNK_HEADER
        chunk = data[start : start + length]
        if len(chunk) != length:
            break  # truncated tail (file still being written)
        pos = start + length
        if kind == FULL:
            pending = None
            records.append(_parse(chunk))
        elif kind == FIRST:
            pending = bytearray(chunk)
        elif kind == MIDDLE:
            if pending is None:
                raise ValueError(f"{path}: middle chunk without a first chunk at byte {start}")
            pending += chunk
        elif kind == LAST:
            if pending is None:
                raise ValueError(f"{path}: last chunk without a first chunk at byte {start}")
            pending += chunk
            records.append(_parse(bytes(pending)))
            pending = None
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos - length - CHUNK_HEADER}")
    return records


def _parse(raw: bytes) -> pb.Record:
    rec = pb.Record()
    rec.ParseFromString(raw)
    return rec


def _put(row: dict[str, Any], item: Any) -> None:
    # Nested values (tables, images) arrive as one item per leaf with ``nested_key`` set.
    keys = list(item.nested_key) if item.nested_key else [item.key]
    for k in keys[:-1]:
        row = row.setdefault(k, {})
    row[keys[-1]] = json.loads(item.value_json)


@dataclass
class WandbRun:
    """What a run wrote: history rows (JSON-decoded), alerts, config and summary."""

    history: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    exit_code: int | None = None


def read_run(path: str | Path, wait: float = 20.0) -> WandbRun:
    """Decode the history, alerts, summary and config records of a ``.wandb`` file.

    ``run.finish()`` can return a moment before wandb's writer has appended the last records:
    wait up to ``wait`` seconds for the ``exit`` record.
    """
    deadline = time.monotonic() + wait
    records = read_records(path)
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.1)
        records = read_records(path)
    run = WandbRun()
    for rec in records:
        which = rec.WhichOneof("record_type")
        if which == "history":
            row: dict[str, Any] = {}
            for it in rec.history.item:
                _put(row, it)
            run.history.append(row)
        elif which == "alert":
            a = rec.alert
            run.alerts.append({"title": a.title, "text": a.text, "level": a.level, "wait_duration": a.wait_duration})
        elif which == "summary":
            for it in rec.summary.update:
                _put(run.summary, it)
        elif which == "config":
            for it in rec.config.update:
                _put(run.config, it)
        elif which == "files":
            run.files.extend(f.path for f in rec.files.files)
        elif which == "exit":
            run.exit_code = rec.exit.exit_code
    return run


def find_run_file(root: str | Path) -> Path:
    """The single ``.wandb`` file under ``root`` (raises if there is not exactly one)."""
    found = sorted(Path(root).rglob("*.wandb"))
    if len(found) != 1:
        raise AssertionError(f"expected exactly one .wandb file under {root}, found {[str(f) for f in found]}")
    return found[0]
