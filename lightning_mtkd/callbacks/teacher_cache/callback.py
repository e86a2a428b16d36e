"""The ``TeacherCache`` callback: stands in for the teachers' forward pass in every step it can."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_mtkd.callbacks.teacher_cache.fingerprint import _fetch, _inputs_of, cache_fingerprint
from lightning_mtkd.callbacks.teacher_cache.stores import (
    FeatureDtype,
    Split,
    _DiskStore,
    _Layout,
    _MemoryStore,
    _Store,
)
from lightning_mtkd.data.augment import BLENDS
from lightning_mtkd.data.examples import rng_preserved

if TYPE_CHECKING:
    from lightning_mtkd.strategies.base import ModelOutputs
    from lightning_mtkd.strategies.distillation import DistillationModule

_SPLIT_OF_STAGE: dict[RunningStage, Split] = {
    RunningStage.TRAINING: "train",
    RunningStage.SANITY_CHECKING: "val",
    RunningStage.VALIDATING: "val",
    RunningStage.TESTING: "test",
}


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
            outputs fit in ``max_memory_mb``, else disk. In memory, a split whose complete file is in
            ``cache_dir`` (written by ``lightning-mtkd cache`` or a disk run) is read from it, not computed.
            On a GPU prefer memory: a disk cache gathers rows on the host, so each step copies the batch's
            ``index`` to the host (a sync); a memory cache gathers on the device, with no sync.
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
        blends = batch.get(BLENDS, 0)
        if blends:  # appended mixup blends: the cache serves the batch's own samples, the teachers label the blends
            return self._with_blends(module, batch, blends, store)
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

    def _with_blends(
        self, module: DistillationModule, batch: Mapping[str, Any], blends: int, store: _Store
    ) -> dict[str, ModelOutputs]:
        own = len(batch["index"]) - blends

        def part(rows: slice) -> dict[str, Any]:
            return {**batch, "input": batch["input"][rows], "index": batch["index"][rows], BLENDS: 0}

        cached = store.layout.flatten(self.teacher_outputs(module, part(slice(None, own))))
        fresh = store.layout.flatten(module.run_teachers(part(slice(own, None))))
        joined = {key: torch.cat([cached[key], fresh[key].to(cached[key].dtype)]) for key in cached}
        return store.layout.unflatten(joined)

    # ------------------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning_mtkd.strategies.distillation import DistillationModule

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
        with rng_preserved():  # reading samples here must not shift the training run's random draws
            self._check_deterministic(dataset, collate, split)
            probe = _fetch(dataset, sorted({0, num_samples - 1}), collate)
            with trainer.precision_plugin.forward_context():
                results = module.run_teachers(move_data_to_device(probe, module.device))
            layout = _Layout.from_results(results, num_samples, self.feature_dtype)
            fingerprint = cache_fingerprint(
                split, str(trainer.precision), layout.describe(), dataset, module.teachers.modules()
            )
        storage = self.storage
        if storage == "auto":
            storage = "memory" if layout.nbytes <= self.max_memory_mb * 2**20 else "disk"
        path = os.path.join(self.cache_dir, f"{split}-{fingerprint}.bin")
        if storage == "memory":
            memory = _MemoryStore(split, layout, device=module.device)
            memory.load_file(path, fingerprint)  # a complete file of this fingerprint (`lightning-mtkd cache`)
            store: _Store = memory
        else:
            store = _DiskStore.open(split, layout, path, fingerprint, trainer.strategy)
        self.stores[split] = store
        self.counts[split] = {"cached": 0, "computed": 0}
        self.nbytes[split] = layout.nbytes
        rank_zero_info(
            f"teacher cache ({split}): {num_samples} samples × {layout.nbytes / num_samples / 1024:.1f} KiB in "
            f"{storage}{' ' + store.path if isinstance(store, _DiskStore) else ''}"
            f"{' (reused, complete: ' + path + ')' if store.complete else ''}"
        )
        if self.precompute and not store.complete:
            self._precompute(store, trainer, module, loader)

    def fill(self, trainer: L.Trainer, module: Any, loaders: Mapping[Split, DataLoader]) -> dict[str, dict[str, Any]]:
        """Compute and store every sample's teacher outputs now, for each ``{split: loader}``; what
        ``lightning-mtkd cache`` runs. ``module`` must be set up and attached to ``trainer`` (inside a loop hook).

        Returns, per split, the file (on disk), whether it was already complete, and the batches computed.
        """
        precompute, self.precompute = self.precompute, True
        try:
            for split, loader in loaders.items():
                self._open(split, trainer, module, loader)
        finally:
            self.precompute = precompute
        return {
            split: {
                "path": getattr(store, "path", None),
                "complete": store.complete,
                "computed_batches": self.counts[split].get("precomputed", 0),
                "megabytes": self.nbytes[split] / 2**20,
            }
            for split, store in self.stores.items()
            if split in loaders
        }

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
        with rng_preserved(), trainer.precision_plugin.forward_context():  # the loader draws a seed
            for batch in precompute_loader:
                batch = move_data_to_device(batch, module.device)
                store.write(batch["index"], module.run_teachers(batch))
        self.counts[store.split]["precomputed"] = len(batches)
        self._maybe_complete(store.split, trainer)

    def _maybe_complete(self, split: Split, trainer: L.Trainer) -> None:
        store = self.stores.get(split)
        if store is not None and not store.complete:
            store.try_complete(trainer.strategy)


def _tree_equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_tree_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_tree_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b
