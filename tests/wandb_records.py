"""Read back what an offline W&B run recorded: its ``run-<id>.wandb`` transaction log.

The log is LevelDB's log format (32 KiB blocks of CRC-checked chunks) after a 7-byte W&B header,
each record a ``wandb_internal_pb2.Record`` — the same protobufs ``wandb sync`` uploads. wandb
0.2x dropped its Python reader (the Go core reads the file now), so this is the few lines needed.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
from typing import Any

HEADER = struct.Struct("<4sHB")  # b":W&B", magic 0xBEE1, version
CHUNK = struct.Struct("<IHB")  # crc32c, length, type
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str) -> list[Any]:
    """Every protobuf ``Record`` in a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as handle:
        data = handle.read()
    ident, magic, _ = HEADER.unpack_from(data)
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B transaction log"
    offset, pending, out = HEADER.size, b"", []
    while offset + CHUNK.size <= len(data):
        if BLOCK - offset % BLOCK < CHUNK.size:  # the block's tail is padding
            offset += BLOCK - offset % BLOCK
            continue
        _, length, kind = CHUNK.unpack_from(data, offset)
        if kind == 0 and length == 0:  # zero padding at the end of a block
            offset += BLOCK - offset % BLOCK
            continue
        payload = data[offset + CHUNK.size : offset + CHUNK.size + length]
        offset += CHUNK.size + length
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _items(items: Any) -> dict[str, Any]:
    """``{key: value}`` of history/summary/config items; a nested key (``["report/val/table", "path"]``) nests."""
    out: dict[str, Any] = {}
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        target = out
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = json.loads(item.value_json)
    return out


class OfflineRun:
    """History rows, summary and config of the one offline run under ``save_dir``."""

    def __init__(self, save_dir: str, timeout: float = 30.0) -> None:
        (self.dir,) = glob.glob(os.path.join(save_dir, "wandb", "offline-run-*"))
        # wandb-core writes the log from its own process and may still be creating or flushing it when
        # finish() returns (seen on a loaded CI machine): wait for the file, then for its closing "exit" record.
        deadline = time.monotonic() + timeout
        while not (logs := glob.glob(os.path.join(self.dir, "run-*.wandb"))) and time.monotonic() < deadline:
            time.sleep(0.2)
        (log,) = logs
        while not any(r.WhichOneof("record_type") == "exit" for r in records(log)) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.history: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self.config: dict[str, Any] = {}
        self.artifacts: list[Any] = []
        for record in records(log):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                self.history.append(_items(record.history.item))
            elif kind == "summary":
                self.summary.update(_items(record.summary.update))
            elif kind == "config":
                self.config.update(_items(record.config.update))
            elif kind == "artifact":
                self.artifacts.append(record.artifact)

    def logged_keys(self) -> set[str]:
        return {key for row in self.history for key in row}

    def last(self, key: str) -> Any:
        return [row[key] for row in self.history if key in row][-1]

    def file(self, relative: str) -> str:
        return os.path.join(self.dir, "files", relative)
