"""Read an offline W&B run (``run-<id>.wandb``) without a W&B server.

wandb 0.31 has no public reader for offline runs (its old ``wandb.sdk.internal.datastore`` is
gone), so this is our own, from the file's layout::

    header   7 bytes: b":W&B", uint16 LE magic 0xBEE1, uint8 version 0
    records  LevelDB log format, in 32 KiB blocks counted from the start of the file
             (the header sits in block 0). Each record: crc32 uint32 LE, length uint16 LE,
             type uint8 (FULL=1, FIRST=2, MIDDLE=3, LAST=4), then `length` bytes. A record
             never crosses a block; fewer than 7 bytes left in a block are zero padding.
             crc32 = zlib.crc32(type byte + data), unmasked (LevelDB proper masks a crc32c).
    payload  FULL, or FIRST + MIDDLE* + LAST joined: one ``wandb_internal_pb2.Record``.

Only the protobuf schema comes from wandb (``wandb.proto.wandb_internal_pb2``).

Example::

    [f] = run_files("outputs/runs/x/wandb")
    history(f)["awake/fc1.weight@1e-05"], summary(f)["test/acc"], run(f)["exit_code"]
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

IDENT = b":W&B"
MAGIC = 0xBEE1
VERSION = 0
FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version: 7 bytes
RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, type: 7 bytes
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """The file is not a W&B run file, or it is corrupt (bad CRC, broken fragment chain)."""


def _payloads(data: bytes, path: str) -> Iterator[bytes]:
    if len(data) < FILE_HEADER.size:
        raise WandbFileError(f"{path}: {len(data)} bytes, too short for a W&B run file")
    ident, magic, version = FILE_HEADER.unpack_from(data)
    if ident != IDENT or magic != MAGIC or version != VERSION:
        raise WandbFileError(
            f"{path}: header {data[:7]!r} is not a W&B run file header "
            f"({IDENT!r}, magic {MAGIC:#06x}, version {VERSION}); pass a run-<id>.wandb file"
        )
    pos = FILE_HEADER.size
    pending: bytearray | None = None
    while True:
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < RECORD_HEADER.size:  # trailer padding
            pos += left_in_block
        if pos + RECORD_HEADER.size > len(data):
            break
        crc, length, kind = RECORD_HEADER.unpack_from(data, pos)
        if crc == length == kind == 0:  # zero fill at the end of a preallocated block
            break
        start = pos + RECORD_HEADER.size
        body = data[start : start + length]
        if len(body) < length:  # a record being written while we read
            break
        if zlib.crc32(bytes([kind]) + body) != crc:
            raise WandbFileError(f"{path}: CRC mismatch in the record at byte {pos}")
        pos = start + length
        if kind == FULL:
            if pending is not None:
                raise WandbFileError(f"{path}: FULL record at byte {start} inside a fragment chain")
            yield body
        elif kind == FIRST:
            pending = bytearray(body)
        elif kind in (MIDDLE, LAST):
            if pending is None:
                raise WandbFileError(f"{path}: continuation record at byte {start} without FIRST")
            pending += body
            if kind == LAST:
                yield bytes(pending)
                pending = None
        else:
            raise WandbFileError(f"{path}: unknown record type {kind} at byte {start}")


def read_records(path: str | os.PathLike) -> Iterator[Any]:
    """Every record of a ``.wandb`` file, in order, as ``wandb_internal_pb2.Record`` messages.

    Args:
        path: A ``run-<id>.wandb`` file (in ``wandb/offline-run-<time>-<id>/``).

    Raises:
        WandbFileError: Not a W&B run file, or corrupt.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    path = str(path)
    for payload in _payloads(Path(path).read_bytes(), path):
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def _value(item: Any) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    for field, value in item.ListFields():  # typed values, if a writer sets them instead
        if field.name in ("integer", "number", "boolean", "text"):
            return value
        if field.name == "json":
            return json.loads(value)
        if field.name == "none":
            return None
    return None


def _key(item: Any) -> list[str]:
    return list(item.nested_key) if item.nested_key else [item.key]


def history(path: str | os.PathLike) -> pd.DataFrame:
    """One row per logged step: columns are the logged keys (``_step`` included).

    Rich values (histograms, tables), which W&B stores as nested keys, are reassembled into
    dicts, e.g. ``{"_type": "histogram", "bins": [...], "values": [...]}``.
    """
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _apply(row, _key(item), _value(item))
            rows.append(row)
    return pd.DataFrame(rows)


def _apply(target: dict[str, Any], key: list[str], value: Any) -> None:
    for part in key[:-1]:
        target = target.setdefault(part, {})
    target[key[-1]] = value


def _remove(target: dict[str, Any], key: list[str]) -> None:
    for part in key[:-1]:
        target = target.get(part, {})
    target.pop(key[-1], None)


def summary(path: str | os.PathLike) -> dict[str, Any]:
    """The run summary after every update and removal (nested dicts for nested keys)."""
    out: dict[str, Any] = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                _apply(out, _key(item), _value(item))
            for item in record.summary.remove:
                _remove(out, _key(item))
    return out


def config(path: str | os.PathLike) -> dict[str, Any]:
    """The run config (W&B's own ``_wandb`` entry left out)."""
    out: dict[str, Any] = {}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        cfg = record.run.config if kind == "run" else record.config if kind == "config" else None
        if cfg is None:
            continue
        for item in cfg.update:
            _apply(out, _key(item), _value(item))
        for item in cfg.remove:
            _remove(out, _key(item))
    out.pop("_wandb", None)
    return out


def run(path: str | os.PathLike) -> dict[str, Any]:
    """The run's identity and outcome: ``run_id``, ``project``, ``group``, ``tags``, ``name``,
    ``exit_code`` (``None`` if the run never finished)."""
    out: dict[str, Any] = {"exit_code": None}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out.update(
                run_id=r.run_id,
                project=r.project,
                group=r.run_group,
                tags=list(r.tags),
                name=r.display_name,
            )
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def wait_for_exit(path: str | os.PathLike, timeout: float = 30.0) -> int:
    """Wait until the run file holds its exit record; return the exit code.

    ``wandb.finish()`` can return before wandb-core has flushed the run file, so a file read
    right after it may lack its last records (or all of them).

    Raises:
        TimeoutError: No exit record after ``timeout`` seconds (the run crashed hard or is
            still running).
    """
    deadline = time.monotonic() + timeout
    while True:
        code = run(path)["exit_code"] if Path(path).stat().st_size else None
        if code is not None:
            return code
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{path}: no exit record after {timeout:g} s; is the run still going?"
            )
        time.sleep(0.1)


def run_files(wandb_dir: str | os.PathLike) -> list[Path]:
    """The ``run-<id>.wandb`` files below a ``wandb/`` directory, oldest run first."""
    return sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)


__all__ = [
    "WandbFileError",
    "config",
    "history",
    "read_records",
    "run",
    "run_files",
    "summary",
    "wait_for_exit",
]
