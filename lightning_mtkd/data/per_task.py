"""One data set per task (as in BAM! and MT-DNN), fed through Lightning's ``CombinedLoader``.

Each step draws a batch from every task's data set, so the combined batch is a dict of per-task
batches ``{source: {"input", "targets", "index"}}``. :func:`merge_task_batches` normalises it to the
ordinary batch the shared step reads: the inputs concatenated, and every task's targets present for
the samples of its own data set and missing (``-100`` / ``NaN``) for the others, so each task's loss
and metrics are the masked means over its own samples — no special case in the shared step.
``MultiTaskDataModule.on_before_batch_transfer`` applies it before any callback or the step sees the batch
(with a ``CombinedLoader`` of your own, call it in your DataModule's hook the same way).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from lightning_mtkd.data.augment import BatchAugment
from lightning_mtkd.data.base import (
    BatchGathering,
    EpochShuffleSampler,
    GatheringDataset,
    MultiTaskDataModule,
    collate_batch,
    fetch_samples,
)


def source_shares(sizes: Mapping[str, int], tau: float) -> dict[str, float]:
    r"""Sampling shares :math:`p_t = |D_t|^\tau / \sum_u |D_u|^\tau`.

    ``tau = 1`` samples in proportion to the data sets' sizes, ``tau = 0`` uniformly over tasks, and
    values between temper the big data sets' dominance (MT-DNN, Liu et al., ACL 2019; the
    "temperature" sampling of multilingual models, Arivazhagan et al., 2019).

    Example:
        >>> source_shares({"a": 100, "b": 25}, tau=0.5)
        {'a': 0.6666666666666666, 'b': 0.3333333333333333}
    """
    weights = {name: float(size) ** tau for name, size in sizes.items()}
    total = sum(weights.values())
    return {name: weight / total for name, weight in weights.items()}


class _OwnTask(GatheringDataset):
    """A source data set seen through its place in the combined split: only some targets, offset indices."""

    def __init__(self, dataset: Dataset, keep: Sequence[str] | None, offset: int) -> None:
        self.dataset, self.keep, self.offset = dataset, keep, offset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def gather(self, indices: Sequence[int]) -> dict[str, Any]:
        batch = fetch_samples(self.dataset, indices)
        targets = batch["targets"] if self.keep is None else {k: batch["targets"][k] for k in self.keep}
        # Indices stay unique across the sources of a split (they key the teacher-output cache).
        return {"input": batch["input"], "targets": targets, "index": batch["index"] + self.offset}


class PerTaskDataModule(MultiTaskDataModule):
    """Several data sets, one per task, combined with Lightning's ``CombinedLoader``.

    Every training step draws from every source; source ``t`` gives ``round(batch_size · p_t)`` samples
    (at least one), with shares :math:`p_t \\propto |D_t|^\\tau` (:func:`source_shares`):

    - ``sampling="proportional"`` (:math:`\\tau = 1`): as if the data sets were pooled;
    - ``sampling="uniform"`` (:math:`\\tau = 0`): the same share for every task;
    - ``sampling="temperature"``: :math:`\\tau` = ``tau``, in between.

    The epoch ends with the longest source (``mode="max_size_cycle"``, the shorter ones restart) or
    the shortest (``"min_size"``). Validation and test read every source's split once
    (``CombinedLoader`` mode ``"max_size"``).

    Args:
        sources: ``{task: DataModule}``; by default source ``t`` contributes only the targets of task ``t``.
        batch_size: Samples per training step, over all sources; also each source's evaluation batch size.
        sampling: How the training batch is shared out; see above.
        tau: The exponent of ``sampling="temperature"``.
        mode: When a training epoch ends.
        own_task_only: Keep only the target named after each source (``False``: keep all its targets).
        num_workers, pin_memory, seed, augment: As in :class:`MultiTaskDataModule` (``augment`` acts on the
            merged training batch, after the sources' batches are joined).

    YAML::

        data:
          class_path: lightning_mtkd.data.PerTaskDataModule
          init_args:
            sources:
              left: {class_path: lightning_mtkd.data.MultiMNISTDataModule, init_args: {num_train: 5000}}
              right: {class_path: lightning_mtkd.data.MultiMNISTDataModule, init_args: {num_train: 500}}
            sampling: temperature
            tau: 0.5
    """

    def __init__(
        self,
        sources: dict[str, MultiTaskDataModule],
        batch_size: int = 128,
        sampling: Literal["proportional", "uniform", "temperature"] = "proportional",
        tau: float = 0.5,
        mode: Literal["max_size_cycle", "min_size"] = "max_size_cycle",
        own_task_only: bool = True,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        augment: BatchAugment | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, seed=seed, augment=augment
        )
        if len(sources) < 1:
            raise ValueError("sources is empty; give one DataModule per task, e.g. {left: ..., right: ...}.")
        if sampling not in ("proportional", "uniform", "temperature"):
            raise ValueError(f"sampling {sampling!r} must be 'proportional', 'uniform' or 'temperature'.")
        if mode not in ("max_size_cycle", "min_size"):
            raise ValueError(f"mode {mode!r} must be 'max_size_cycle' or 'min_size'.")
        if not (math.isfinite(tau) and tau >= 0):
            raise ValueError(f"tau must be a finite number >= 0, got {tau}.")
        if batch_size < len(sources):
            raise ValueError(f"batch_size={batch_size} is below the {len(sources)} sources; each needs a sample.")
        self.sources = dict(sources)
        self.tau = {"proportional": 1.0, "uniform": 0.0, "temperature": tau}[sampling]
        self.mode = mode
        self.own_task_only = own_task_only

    def build_splits(self) -> dict[str, Dataset]:
        raise NotImplementedError  # splits are per source; see setup()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        per_split: dict[str, dict[str, Dataset]] = {}
        for name, source in self.sources.items():
            source.setup(stage)
            for split, dataset in source.splits.items():
                per_split.setdefault(split, {})[name] = dataset
        self.source_splits: dict[str, dict[str, Dataset]] = {}
        for split, datasets in per_split.items():
            offset = 0
            wrapped: dict[str, Dataset] = {}
            for name, dataset in datasets.items():
                keep = [name] if self.own_task_only else None
                if keep is not None:
                    probe = fetch_samples(dataset, [0])
                    if name not in probe["targets"]:
                        raise KeyError(
                            f"source {name!r} has no target named {name!r} (it has {list(probe['targets'])}); name "
                            "each source after its task, or set own_task_only: false to keep all its targets."
                        )
                wrapped[name] = _OwnTask(dataset, keep, offset)
                offset += len(dataset)  # type: ignore[arg-type]
            self.source_splits[split] = wrapped
        self.splits = {split: ConcatDataset(list(d.values())) for split, d in self.source_splits.items()}

    def batch_sizes(self) -> dict[str, int]:
        """Training samples per step from each source."""
        if not self.splits:
            self.setup()
        sizes = {name: len(d) for name, d in self.source_splits["train"].items()}  # type: ignore[arg-type]
        shares = source_shares(sizes, self.tau)
        return {name: max(1, round(self.batch_size * share)) for name, share in shares.items()}

    def _combined(self, split: str, shuffle: bool) -> CombinedLoader:
        if not self.splits:
            self.setup()
        if split not in self.source_splits:
            raise ValueError(f"the sources have no {split!r} split (they have {list(self.source_splits)}).")
        sizes = self.batch_sizes() if shuffle else dict.fromkeys(self.source_splits[split], self.batch_size)
        loaders = {}
        for offset, (name, dataset) in enumerate(self.source_splits[split].items()):
            loaders[name] = DataLoader(
                BatchGathering(dataset),
                batch_size=sizes[name],
                # a pure function of (seed, epoch), as in MultiTaskDataModule: a resumed run sees the same order
                sampler=EpochShuffleSampler(len(dataset), self.seed + offset) if shuffle else None,  # type: ignore[arg-type]
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                collate_fn=collate_batch,
                persistent_workers=self.num_workers > 0,
            )
        return CombinedLoader(loaders, mode=self.mode if shuffle else "max_size")

    def train_dataloader(self) -> CombinedLoader:  # type: ignore[override]
        return self._combined("train", shuffle=True)

    def val_dataloader(self) -> CombinedLoader:  # type: ignore[override]
        return self._combined("val", shuffle=False)

    def test_dataloader(self) -> CombinedLoader:  # type: ignore[override]
        return self._combined("test", shuffle=False)

    def predict_dataloader(self) -> CombinedLoader:  # type: ignore[override]
        return self._combined("test", shuffle=False)
