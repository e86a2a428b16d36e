"""The cache file: ``[header | array | array | … | filled mask]``, its header and its checksum.

The header (fixed size, rewritten in place when the file is completed) holds the magic number,
the format version, the fingerprint, the total size, the layout, whether every row is filled, and
a CRC-32 of the data written once it is. A file that is truncated, corrupted or was left half
filled is detected by :func:`file_problem` and rebuilt by the stores, never read as numbers.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

#: Bumped whenever the file layout or what goes into the fingerprint changes.
FORMAT_VERSION = 1
MAGIC = b"lightning-mtkd cache v1\n"
HEADER_BYTES = 1 << 16  # fixed: the header is rewritten in place when the file is completed
ALIGN = 64


def create_file(path: str, fingerprint: str, layout: Any) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    total_bytes = HEADER_BYTES + layout.data_bytes
    header = {
        "version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "total_bytes": total_bytes,
        "layout": layout.describe(),
        "complete": False,
        "checksum": None,
    }
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.truncate(total_bytes)  # sparse zeros: every row unfilled
    write_header(tmp, header)
    os.replace(tmp, path)


def write_header(path: str, header: Mapping[str, Any]) -> None:
    text = json.dumps(header, sort_keys=True).encode()
    if len(MAGIC) + 8 + len(text) > HEADER_BYTES:
        count = len(header["layout"]["arrays"])
        raise ValueError(f"teacher cache: the layout of {count} arrays is too large to record in the header.")
    with open(path, "r+b") as f:
        f.write(MAGIC + len(text).to_bytes(8, "little") + text)
        f.flush()
        os.fsync(f.fileno())


def read_header(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if head[: len(MAGIC)] != MAGIC:
        raise ValueError("not a teacher-cache file (bad magic number)")
    length = int.from_bytes(head[len(MAGIC) : len(MAGIC) + 8], "little")
    if length > HEADER_BYTES - len(MAGIC) - 8:
        raise ValueError("unreadable header (length out of range)")
    try:
        return json.loads(head[len(MAGIC) + 8 : len(MAGIC) + 8 + length])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("unreadable header (corrupted)") from None


def file_problem(path: str, fingerprint: str, layout: Any) -> str | None:
    """Why the file at ``path`` cannot be used as is (``"missing"`` if absent), or ``None`` if it is whole."""
    if not os.path.exists(path):
        return "missing"
    try:
        header = read_header(path)
    except ValueError as error:
        return str(error)
    size = os.path.getsize(path)
    if header.get("fingerprint") != fingerprint or header.get("layout") != layout.describe():
        return "its header does not match its name (corrupted)"
    if size != header.get("total_bytes"):
        return f"truncated or extended: {size} bytes, the header says {header.get('total_bytes')}"
    if not header.get("complete"):
        return "incomplete (a run stopped before filling it)"
    actual = checksum(np.memmap(path, dtype=np.uint8, mode="r"))
    if actual != header.get("checksum"):
        return f"checksum mismatch (data corrupted: CRC-32 {actual} != {header.get('checksum')})"
    return None


def checksum(mapped: np.ndarray, chunk: int = 1 << 26) -> int:
    crc = 0
    for start in range(HEADER_BYTES, len(mapped), chunk):
        crc = zlib.crc32(mapped[start : start + chunk].data, crc)
    return crc
