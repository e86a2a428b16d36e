"""The teacher-output cache: each sample's teacher outputs computed once, then gathered by ``batch["index"]``.

A frozen teacher gives the same outputs for the same input every epoch, yet its forward pass
usually costs more than the student's whole step. :class:`TeacherCache` stores, per split, one
contiguous array per teacher output (task logits and every tapped feature the strategy asked for)
with ``num_samples`` rows, and a ``filled`` mask; a batch whose rows are all filled is gathered
from those arrays by index instead of running the teachers. A cache of one small file per sample
costs as much as the forward it replaces (``shared/MEASUREMENTS.md``), so there is none of that.

Where the arrays live: in memory (on the module's device) when they fit in ``max_memory_mb``,
else in one memory-mapped file per split under ``cache_dir``. A file is named after a fingerprint
of everything its numbers depend on — every teacher's weights and buffers, the data set (its
inputs and its transform), the split, the outputs and features requested, their storage dtype and
the trainer's precision — so a change to any of them makes a new file; nothing stale is ever
reused. A file carries a header (magic, layout, fingerprint, size) and a CRC-32 of its data,
written once every row is filled; a file that is truncated, corrupted or was left half-filled is
detected when opened, reported, and rebuilt, never read as numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_mtkd.config import class_path
from lightning_mtkd.data.base import MultiTaskDataset, fetch_samples, unwrap_dataset

if TYPE_CHECKING:
    from lightning_mtkd.strategies.base import DistillationModule, ModelOutputs

Split = Literal["train", "val", "test"]
FeatureDtype = Literal["same", "float16", "bfloat16"]

#: Bumped whenever the file layout or what goes into the fingerprint changes.
FORMAT_VERSION = 1
MAGIC = b"lightning-mtkd cache v1\n"
HEADER_BYTES = 1 << 16  # fixed: the header is rewritten in place when the file is completed
ALIGN = 64

_SPLIT_OF_STAGE: dict[RunningStage, Split] = {
    RunningStage.TRAINING: "train",
    RunningStage.SANITY_CHECKING: "val",
    RunningStage.VALIDATING: "val",
    RunningStage.TESTING: "test",
}
_FEATURE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class TeacherCache(L.Callback):
    """Compute each sample's teacher outputs once and reuse them, keyed by ``batch["index"]``.

    Works for every strategy (it stands in for :meth:`DistillationModule.run_teachers`: every
    teacher's task outputs and the features the strategy taps) and under DDP: each rank reads and
    writes the samples its sampler gives it. In memory, each rank holds the whole split (a rank
    computes what it has not seen yet); on disk, all ranks of a machine share one file.

    A batch with any sample not yet cached runs the teachers on the whole batch and stores it, so
    the first epoch gives exactly the uncached numbers and later epochs reuse them; once every row
    is filled, a step only gathers rows (no host sync, no check).

    Args:
        storage: ``memory`` (on the module's device), ``disk`` (a memory-mapped file in ``cache_dir``,
            shareable by later runs with the same fingerprint), or ``auto``: memory if the split's
            outputs fit in ``max_memory_mb``, else disk.
        cache_dir: Folder of the cache files (one per split and fingerprint; delete it to reclaim space).
        max_memory_mb: The most a split may take in memory under ``auto``.
        feature_dtype: Store tapped features as ``float16``/``bfloat16`` to halve their size (task
            outputs are always kept exactly); ``same`` keeps them as computed.
        splits: Which splits to cache. Validation and test samples are keyed apart from training ones.
        precompute: Fill the cache for the whole split before training (rather than during the first epoch),
            in index order with the loader's batch size and workers. Under DDP each rank fills its share of a
            file on disk; in memory each rank fills its own copy of the whole split.
        allow_random_transforms: The cache refuses a data set whose samples change from one read to
            the next (random augmentation), since the teacher's output then depends on the draw. Set
            this to say that reusing the output for one draw (the first seen, or the precomputed one)
            in every epoch is what you want.

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_mtkd.callbacks.TeacherCache
              init_args: {storage: auto, precompute: true}
    """

    def __init__(
        self,
        storage: Literal["auto", "memory", "disk"] = "auto",
        cache_dir: str = ".cache/teacher_outputs",
        max_memory_mb: float = 2048.0,
        feature_dtype: FeatureDtype = "same",
        splits: Sequence[Split] = ("train", "val"),
        precompute: bool = False,
        allow_random_transforms: bool = False,
    ) -> None:
        if max_memory_mb < 0:
            raise ValueError(f"max_memory_mb must be >= 0, got {max_memory_mb}.")
        unknown = [s for s in splits if s not in ("train", "val", "test")]
        if unknown:
            raise ValueError(f"splits must be among 'train', 'val', 'test'; got {unknown}.")
        self.storage = storage
        self.cache_dir = cache_dir
        self.max_memory_mb = max_memory_mb
        self.feature_dtype: FeatureDtype = feature_dtype
        self.splits = tuple(dict.fromkeys(splits))
        self.precompute = precompute
        self.allow_random_transforms = allow_random_transforms
        self.stores: dict[Split, _Store] = {}
        #: Batches served from the cache and batches for which the teachers ran, per split (plain ints: no sync).
        self.counts: dict[str, dict[str, int]] = {}
        #: Bytes each opened split takes (arrays and mask), whether in memory or on disk.
        self.nbytes: dict[str, int] = {}
        self._trainer: L.Trainer | None = None

    # ------------------------------------------------------------------------------ the hot path
    def teacher_outputs(self, module: DistillationModule, batch: Mapping[str, Any]) -> dict[str, ModelOutputs]:
        """The teachers' outputs for ``batch``: gathered by index, or computed (and stored) if any row is missing."""
        stage = self._trainer.state.stage if self._trainer is not None else None
        store = self.stores.get(_SPLIT_OF_STAGE[stage]) if stage in _SPLIT_OF_STAGE else None
        if store is None:  # a split not cached, or a dry run outside the loops (adaptor sizing)
            return module.run_teachers(batch)
        index = batch.get("index")
        if not isinstance(index, Tensor):
            raise KeyError(
                "the teacher cache keys outputs by batch['index'] (each sample's position in its dataset), but this "
                "batch has no 'index' tensor. Use lightning_mtkd.data.MultiTaskDataset or add 'index' to your "
                "batches, or remove the TeacherCache callback."
            )
        counts = self.counts[store.split]
        if store.complete:
            counts["cached"] += 1
            return store.gather(index)
        if not store.index_checked:
            store.check_index(index)
        if store.all_filled(index):
            counts["cached"] += 1
            return store.gather(index)
        counts["computed"] += 1
        results = module.run_teachers(batch)
        store.write(index, results)
        return results

    # ------------------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning_mtkd.strategies.base import DistillationModule

        if not isinstance(pl_module, DistillationModule):
            raise TypeError(
                f"TeacherCache caches the outputs of a distillation module's teachers, but the module is a "
                f"{type(pl_module).__name__}. Remove the callback, or use a DistillationModule strategy."
            )
        self._trainer = trainer
        pl_module.teacher_cache = self

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if getattr(pl_module, "teacher_cache", None) is self:
            setattr(pl_module, "teacher_cache", None)  # noqa: B010 - any LightningModule here
        for store in self.stores.values():
            store.close()
        self.stores = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open("train", trainer, pl_module, trainer.train_dataloader)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open("val", trainer, pl_module, trainer.val_dataloaders)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open("test", trainer, pl_module, trainer.test_dataloaders)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_complete("train", trainer)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._maybe_complete("val", trainer)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_complete("test", trainer)

    # ------------------------------------------------------------------------------ opening a split
    def _open(self, split: Split, trainer: L.Trainer, module: Any, loader: Any) -> None:
        if split not in self.splits or split in self.stores or not module.teachers.active:
            return
        if not isinstance(loader, DataLoader):
            warnings.warn(
                f"teacher cache: the {split!r} split is not one DataLoader ({type(loader).__name__}); its teacher "
                "outputs are computed every step. Give one DataLoader per split to cache them.",
                stacklevel=2,
            )
            return
        dataset, collate = loader.dataset, loader.collate_fn
        num_samples = len(dataset)  # type: ignore[arg-type]
        with _rng_preserved():  # reading samples here must not shift the training run's random draws
            self._check_deterministic(dataset, collate, split)
            probe = _fetch(dataset, sorted({0, num_samples - 1}), collate)
            with trainer.precision_plugin.forward_context():
                results = module.run_teachers(move_data_to_device(probe, module.device))
            layout = _Layout.from_results(results, num_samples, self.feature_dtype)
            fingerprint = self._fingerprint(split, trainer, module, dataset, layout)
        storage = self.storage
        if storage == "auto":
            storage = "memory" if layout.nbytes <= self.max_memory_mb * 2**20 else "disk"
        if storage == "memory":
            store: _Store = _MemoryStore(split, layout, device=module.device)
        else:
            path = os.path.join(self.cache_dir, f"{split}-{fingerprint}.bin")
            store = _DiskStore.open(split, layout, path, fingerprint, trainer.strategy)
        self.stores[split] = store
        self.counts[split] = {"cached": 0, "computed": 0}
        self.nbytes[split] = layout.nbytes
        rank_zero_info(
            f"teacher cache ({split}): {num_samples} samples × {layout.nbytes / num_samples / 1024:.1f} KiB in "
            f"{storage}{' ' + store.path if isinstance(store, _DiskStore) else ''}"
            f"{' (reused, complete)' if store.complete else ''}"
        )
        if self.precompute and not store.complete:
            self._precompute(store, trainer, module, loader)

    def _check_deterministic(self, dataset: Dataset, collate: Any, split: str) -> None:
        """Refuse random transforms: read a few samples twice and compare."""
        if self.allow_random_transforms:
            return
        n = len(dataset)  # type: ignore[arg-type]
        indices = sorted({int(i) for i in np.linspace(0, n - 1, num=min(n, 8))})
        first, second = _fetch(dataset, indices, collate), _fetch(dataset, indices, collate)
        if not _tree_equal(_inputs_of(first), _inputs_of(second)):
            raise RuntimeError(
                f"teacher cache: the {split!r} data set gives different inputs each time the same samples are read "
                f"({type(dataset).__name__} applies a random transform), so the teacher's output depends on the "
                "draw and cannot be cached. Remove the random augmentation from this split, drop the TeacherCache "
                "callback, or pass `allow_random_transforms=True` to reuse one draw's teacher outputs in every epoch."
            )

    def _fingerprint(self, split: str, trainer: L.Trainer, module: Any, dataset: Dataset, layout: _Layout) -> str:
        digest = hashlib.blake2b(digest_size=16)
        described = {
            "version": FORMAT_VERSION,
            "split": split,
            "precision": str(trainer.precision),
            "layout": layout.describe(),
            "data": dataset_fingerprint(dataset),
            "teachers": sorted(module.teachers.names),
        }
        digest.update(json.dumps(described, sort_keys=True).encode())
        for name, teacher in sorted(module.teachers.modules().items()):
            digest.update(f"{name}:{class_path(teacher)}".encode())
            for key, value in teacher.state_dict().items():
                digest.update(key.encode())
                _update_with_tensor(digest, value)
        return digest.hexdigest()

    # ------------------------------------------------------------------------------ filling
    def _precompute(self, store: _Store, trainer: L.Trainer, module: Any, loader: DataLoader) -> None:
        """Fill every missing row in index order, in the loader's batch size and workers (on disk: sharded by rank)."""
        missing = torch.nonzero(~store.filled_mask().cpu()).flatten()
        if isinstance(store, _DiskStore):
            missing = missing[trainer.global_rank :: trainer.world_size]
        batch_size = loader.batch_size or 64
        batches = [missing[i : i + batch_size].tolist() for i in range(0, len(missing), batch_size)]
        precompute_loader = DataLoader(
            loader.dataset, batch_sampler=batches, collate_fn=loader.collate_fn, num_workers=loader.num_workers
        )
        with _rng_preserved(), trainer.precision_plugin.forward_context():  # the loader draws a seed
            for batch in precompute_loader:
                batch = move_data_to_device(batch, module.device)
                store.write(batch["index"], module.run_teachers(batch))
        self.counts[store.split]["precomputed"] = len(batches)
        self._maybe_complete(store.split, trainer)

    def _maybe_complete(self, split: Split, trainer: L.Trainer) -> None:
        store = self.stores.get(split)
        if store is not None and not store.complete:
            store.try_complete(trainer.strategy)


# ---------------------------------------------------------------------------------- layout and stores
class _Layout:
    """Which arrays a split's cache holds, how teacher outputs map onto them, and where they sit in a file."""

    def __init__(self, num_samples: int, structure: dict[str, Any], arrays: dict[str, dict[str, Any]]) -> None:
        self.num_samples = num_samples
        self.structure = structure  # {teacher: {"outputs": {task: key}, "features": {path: spec}}}
        self.arrays = arrays  # key -> {"shape": per-sample shape, "dtype": stored, "as": returned dtype, "offset"}
        offset = 0
        for key in sorted(self.arrays):  # in key order: the header is written with sorted keys and read back
            spec = self.arrays[key]
            spec["offset"] = offset
            offset += _aligned(self.row_bytes(spec) * num_samples)
        self.mask_offset = offset
        self.data_bytes = offset + num_samples

    @classmethod
    def from_results(
        cls, results: Mapping[str, ModelOutputs], num_samples: int, feature_dtype: FeatureDtype
    ) -> _Layout:
        structure: dict[str, Any] = {}
        tensors: dict[str, Tensor] = {}
        for name, result in results.items():
            outputs = {task: _flatten(out, f"{name}/outputs/{task}", tensors) for task, out in result.outputs.items()}
            features = {path: _flatten(f, f"{name}/features/{path}", tensors) for path, f in result.features.items()}
            structure[name] = {"outputs": outputs, "features": features}
        arrays = {}
        for key, tensor in tensors.items():
            stored = tensor.dtype
            if "/features/" in key and feature_dtype != "same" and tensor.is_floating_point():
                stored = _FEATURE_DTYPES[feature_dtype]
            arrays[key] = {
                "shape": list(tensor.shape[1:]), "dtype": _dtype_name(stored), "as": _dtype_name(tensor.dtype)
            }
        return cls(num_samples, structure, arrays)

    @property
    def nbytes(self) -> int:
        return self.data_bytes

    @staticmethod
    def row_bytes(spec: Mapping[str, Any]) -> int:
        return math.prod(spec["shape"]) * _dtype(spec["dtype"]).itemsize

    def describe(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "structure": self.structure, "arrays": self.arrays}

    def unflatten(self, arrays: Mapping[str, Tensor]) -> dict[str, ModelOutputs]:
        from lightning_mtkd.strategies.base import ModelOutputs

        return {
            name: ModelOutputs(
                {task: _unflatten(spec, arrays) for task, spec in parts["outputs"].items()},
                {path: _unflatten(spec, arrays) for path, spec in parts["features"].items()},
            )
            for name, parts in self.structure.items()
        }

    def flatten(self, results: Mapping[str, ModelOutputs]) -> dict[str, Tensor]:
        tensors: dict[str, Tensor] = {}
        for name, result in results.items():
            for task, value in result.outputs.items():
                _flatten(value, f"{name}/outputs/{task}", tensors)
            for path, value in result.features.items():
                _flatten(value, f"{name}/features/{path}", tensors)
        if tensors.keys() != self.arrays.keys():
            raise RuntimeError(
                f"teacher cache: the teachers' outputs changed shape between batches (cached {sorted(self.arrays)}, "
                f"now {sorted(tensors)}); outputs must be the same for every batch to be cached."
            )
        return tensors


class _Store:
    """One split's arrays (``num_samples`` rows each) and its ``filled`` mask."""

    split: Split
    layout: _Layout
    arrays: dict[str, Tensor]
    filled: Tensor
    complete: bool = False
    index_checked: bool = False

    def gather(self, index: Tensor) -> dict[str, ModelOutputs]:
        rows = {key: self._rows(array, index, self.layout.arrays[key]["as"]) for key, array in self.arrays.items()}
        return self.layout.unflatten(rows)

    def _rows(self, array: Tensor, index: Tensor, as_dtype: str) -> Tensor:
        return array.index_select(0, index).to(_dtype(as_dtype))

    def all_filled(self, index: Tensor) -> bool:
        return bool(self.filled[index.to(self.filled.device)].all())  # a sync, but only while filling

    def filled_mask(self) -> Tensor:
        return self.filled.bool()

    def check_index(self, index: Tensor) -> None:
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= self.layout.num_samples:
            raise IndexError(
                f"teacher cache ({self.split}): batch['index'] holds {low}..{high}, but the data set has "
                f"{self.layout.num_samples} samples. 'index' must be each sample's position in its own dataset."
            )
        self.index_checked = True

    def write(self, index: Tensor, results: Mapping[str, ModelOutputs]) -> None:
        index = index.to(self.filled.device)
        for key, tensor in self.layout.flatten(results).items():
            array = self.arrays[key]
            array[index] = tensor.detach().to(device=array.device, dtype=array.dtype)
        self.filled[index] = True  # after the rows: a row marked filled is always whole

    def try_complete(self, strategy: Any) -> None:
        self.complete = bool(self.filled.all())

    def close(self) -> None:
        self.arrays = {}


class _MemoryStore(_Store):
    def __init__(self, split: Split, layout: _Layout, device: torch.device) -> None:
        self.split, self.layout = split, layout
        n = layout.num_samples
        self.arrays = {
            key: torch.empty((n, *spec["shape"]), dtype=_dtype(spec["dtype"]), device=device)
            for key, spec in layout.arrays.items()
        }
        self.filled = torch.zeros(n, dtype=torch.bool, device=device)


class _DiskStore(_Store):
    """The arrays as views of one memory-mapped file: ``[header | array | array | … | filled mask]``."""

    def __init__(self, split: Split, layout: _Layout, path: str, writable: bool) -> None:
        self.split, self.layout, self.path = split, layout, path
        self._map: Any = np.memmap(path, dtype=np.uint8, mode="r+" if writable else "r")
        with warnings.catch_warnings():  # a read-only map is never written: complete caches are only gathered
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(self._map[HEADER_BYTES:])
        n = layout.num_samples
        self.arrays = {}
        for key, spec in layout.arrays.items():
            size = _Layout.row_bytes(spec) * n
            region = raw[spec["offset"] : spec["offset"] + size]
            self.arrays[key] = region.view(_dtype(spec["dtype"])).view(n, *spec["shape"])
        self.filled = raw[layout.mask_offset : layout.mask_offset + n]

    @classmethod
    def open(cls, split: Split, layout: _Layout, path: str, fingerprint: str, strategy: Any) -> _DiskStore:
        """Open (rank 0: validate, else rebuild) the file of this fingerprint; all ranks then map it."""
        if strategy.is_global_zero:
            problem = _file_problem(path, fingerprint, layout)
            if problem is not None:
                if problem != "missing":
                    warnings.warn(f"teacher cache {path}: {problem}; rebuilding it.", stacklevel=3)
                _create_file(path, fingerprint, layout)
        strategy.barrier("teacher_cache_open")
        complete = _read_header(path)["complete"]
        store = cls(split, layout, path, writable=not complete)
        store.complete = complete
        return store

    def _rows(self, array: Tensor, index: Tensor, as_dtype: str) -> Tensor:
        return array.index_select(0, index.cpu()).to(device=index.device, dtype=_dtype(as_dtype), non_blocking=True)

    def write(self, index: Tensor, results: Mapping[str, ModelOutputs]) -> None:
        super().write(index.cpu(), results)

    def all_filled(self, index: Tensor) -> bool:
        return bool(self.filled[index.cpu()].all())

    def try_complete(self, strategy: Any) -> None:
        """Every rank's rows flushed; if all are filled, rank 0 writes the checksum and marks the file complete."""
        self._map.flush()
        strategy.barrier("teacher_cache_flush")
        if strategy.is_global_zero and bool(self.filled.all()):
            header = _read_header(self.path)
            header.update(complete=True, checksum=_checksum(self._map))
            _write_header(self.path, header)
        strategy.barrier("teacher_cache_complete")
        self.complete = bool(_read_header(self.path)["complete"])

    def close(self) -> None:
        super().close()
        self.filled = torch.empty(0)
        if self._map is not None and self._map.mode == "r+":
            self._map.flush()
        self._map = None


# ---------------------------------------------------------------------------------- the file
def read_cache_file(path: str) -> dict[str, Tensor]:
    """The arrays of a complete, undamaged cache file, by key (``"<teacher>/outputs/<task>"``,
    ``"<teacher>/features/<path>"``), one row per sample in index order: for inspection and tests."""
    header = _read_header(path)
    spec = header["layout"]
    layout = _Layout(spec["num_samples"], spec["structure"], spec["arrays"])
    problem = _file_problem(path, header["fingerprint"], layout)
    if problem is not None:
        raise ValueError(f"teacher cache {path}: {problem}.")
    store = _DiskStore("train", layout, path, writable=False)
    arrays = {key: array.clone() for key, array in store.arrays.items()}
    store.close()
    return arrays


def _create_file(path: str, fingerprint: str, layout: _Layout) -> None:
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
    _write_header(tmp, header)
    os.replace(tmp, path)


def _write_header(path: str, header: Mapping[str, Any]) -> None:
    text = json.dumps(header, sort_keys=True).encode()
    if len(MAGIC) + 8 + len(text) > HEADER_BYTES:
        count = len(header["layout"]["arrays"])
        raise ValueError(f"teacher cache: the layout of {count} arrays is too large to record in the header.")
    with open(path, "r+b") as f:
        f.write(MAGIC + len(text).to_bytes(8, "little") + text)
        f.flush()
        os.fsync(f.fileno())


def _read_header(path: str) -> dict[str, Any]:
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


def _file_problem(path: str, fingerprint: str, layout: _Layout) -> str | None:
    """Why the file at ``path`` cannot be used as is (``"missing"`` if absent), or ``None`` if it is whole."""
    if not os.path.exists(path):
        return "missing"
    try:
        header = _read_header(path)
    except ValueError as error:
        return str(error)
    size = os.path.getsize(path)
    if header.get("fingerprint") != fingerprint or header.get("layout") != layout.describe():
        return "its header does not match its name (corrupted)"
    if size != header.get("total_bytes"):
        return f"truncated or extended: {size} bytes, the header says {header.get('total_bytes')}"
    if not header.get("complete"):
        return "incomplete (a run stopped before filling it)"
    actual = _checksum(np.memmap(path, dtype=np.uint8, mode="r"))
    if actual != header.get("checksum"):
        return f"checksum mismatch (data corrupted: CRC-32 {actual} != {header.get('checksum')})"
    return None


def _checksum(mapped: np.ndarray, chunk: int = 1 << 26) -> int:
    crc = 0
    for start in range(HEADER_BYTES, len(mapped), chunk):
        crc = zlib.crc32(mapped[start : start + chunk].data, crc)
    return crc


# ---------------------------------------------------------------------------------- fingerprints and helpers
def dataset_fingerprint(dataset: Dataset) -> str:
    """A digest of what a data set feeds the teachers: its inputs (and transform), not its labels.

    A data set may define ``cache_fingerprint() -> str`` itself. A :class:`MultiTaskDataset` is
    hashed whole; any other data set by its type, length, ``transform`` and the inputs of up to
    256 evenly spaced samples (define ``cache_fingerprint`` where that could miss a change).
    """
    dataset = unwrap_dataset(dataset)
    custom = getattr(dataset, "cache_fingerprint", None)
    if callable(custom):
        return str(custom())
    digest = hashlib.blake2b(digest_size=16)
    n = len(dataset)  # type: ignore[arg-type]
    digest.update(f"{class_path(dataset)}:{n}:{getattr(dataset, 'transform', None)!r}".encode())
    if isinstance(dataset, MultiTaskDataset):
        for tensor in _tensors(dataset.inputs):  # every leaf of a dict of inputs
            _update_with_tensor(digest, tensor)
    else:
        indices = sorted({int(i) for i in np.linspace(0, n - 1, num=min(n, 256))})
        for tensor in _tensors(_inputs_of(_fetch(dataset, indices, None))):
            _update_with_tensor(digest, tensor)
    return digest.hexdigest()


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """Restore the global torch, NumPy and Python random states on exit."""
    states = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.random.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def _update_with_tensor(digest: Any, tensor: Tensor) -> None:
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _fetch(dataset: Dataset, indices: list[int], collate: Any) -> Any:
    """Samples ``indices`` as the DataLoader would fetch them, without its sampler."""
    return fetch_samples(dataset, indices, collate)


def _inputs_of(batch: Any) -> Any:
    return batch["input"] if isinstance(batch, Mapping) and "input" in batch else batch


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _tree_equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_tree_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _flatten(value: Any, key: str, out: dict[str, Tensor]) -> Any:
    """Record the tensors of one output (a Tensor, or a tuple/list with ``None``s) under keys; return its spec."""
    if isinstance(value, Tensor):
        out[key] = value
        return key
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        items = [_flatten(v, f"{key}#{i}", out) for i, v in enumerate(value)]
        return {"items": items, "tuple": isinstance(value, tuple)}
    raise TypeError(
        f"teacher cache: cannot store {key!r}, a {type(value).__name__}; teacher outputs and tapped features must be "
        "tensors (or tuples of them)."
    )


def _unflatten(spec: Any, arrays: Mapping[str, Tensor]) -> Any:
    if isinstance(spec, str):
        return arrays[spec]
    if spec is None:
        return None
    items = [_unflatten(s, arrays) for s in spec["items"]]
    return tuple(items) if spec["tuple"] else items


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"teacher cache: unknown dtype {name!r} in the layout")
    return dtype
