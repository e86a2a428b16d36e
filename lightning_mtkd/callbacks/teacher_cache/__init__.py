"""The teacher-output cache: each sample's teacher outputs computed once, then gathered by ``batch["index"]``.

A frozen teacher gives the same outputs for the same input every epoch, yet its forward pass
usually costs more than the student's whole step. :class:`TeacherCache` stores, per split, one
contiguous array per teacher output (task logits and every tapped feature the strategy asked for)
with ``num_samples`` rows, and a ``filled`` mask; a batch whose rows are all filled is gathered
from those arrays by index instead of running the teachers. A cache of one small file per sample
costs as much as the forward it replaces (measured with torchdistill's), so there is none of that.

Where the arrays live: in memory (on the module's device) when they fit in ``max_memory_mb``,
else in one memory-mapped file per split under ``cache_dir``. A file is named after a fingerprint
of everything its numbers depend on — every teacher's weights and buffers, the data set (its
inputs and its transform), the split, the outputs and features requested, their storage dtype and
the trainer's precision — so a change to any of them makes a new file; nothing stale is ever
reused. A file carries a header (magic, layout, fingerprint, size) and a CRC-32 of its data,
written once every row is filled; a file that is truncated, corrupted or was left half-filled is
detected when opened, reported, and rebuilt, never read as numbers.

The package has one layer per file: :mod:`.callback` (the Lightning callback and its hot path),
:mod:`.stores` (the layout of a split's arrays, the memory and disk stores), :mod:`.file_format`
(the file's header and checksum) and :mod:`.fingerprint` (what a file's numbers depend on).
"""

from lightning_mtkd.callbacks.teacher_cache.callback import TeacherCache
from lightning_mtkd.callbacks.teacher_cache.file_format import (
    FORMAT_VERSION,
    HEADER_BYTES,
    MAGIC,
    file_problem,
    read_header,
    write_header,
)
from lightning_mtkd.callbacks.teacher_cache.fingerprint import cache_fingerprint, dataset_fingerprint
from lightning_mtkd.callbacks.teacher_cache.stores import read_cache_file

# The names the single-module version had (tests and notebooks read and damage headers through them).
_read_header = read_header
_write_header = write_header

__all__ = [
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "MAGIC",
    "TeacherCache",
    "cache_fingerprint",
    "dataset_fingerprint",
    "file_problem",
    "read_cache_file",
    "read_header",
    "write_header",
]
