"""Multi-task datasets and the DataModule that feeds them.

A batch is ``{"input": Tensor, "targets": {task: Tensor}, "index": LongTensor}``; ``index`` is each
sample's position in its dataset (it keys the teacher-output cache).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from lightning_mtkd.data.augment import BatchAugment, check_teacher_cache
from lightning_mtkd.inputs import tensor_leaves
from lightning_mtkd.tasks import IGNORE_INDEX, Task


class GatheringDataset(Dataset):
    """A data set that reads a whole batch at once: :meth:`gather` ``(indices) → batch dict``.

    Indexing gives one sample (``dataset[i]``: ``{"input", "targets", "index"}`` without a batch
    dimension), so a plain ``DataLoader(dataset, batch_size=...)`` with PyTorch's default collate
    works as for any data set. The data modules here load through :class:`BatchGathering`, which
    gathers each batch with one indexing operation per tensor instead (no Python loop over samples).
    """

    def gather(self, indices: Sequence[int]) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        return apply_to_collection(self.gather([index]), Tensor, lambda tensor: tensor[0])


class MultiTaskDataset(GatheringDataset):
    """In-memory tensors: inputs and one target tensor per task, gathered a whole batch at a time.

    ``inputs`` is a Tensor or a pytree of Tensors with the samples on their first axis (a dict such as
    a tokenizer's ``{"input_ids", "attention_mask"}``, padded to one length).

    Example:
        >>> ds = MultiTaskDataset(torch.zeros(5, 3), {"a": torch.arange(5)})
        >>> batch = ds.gather([4, 1])
        >>> batch["targets"]["a"].tolist(), batch["index"].tolist()
        ([4, 1], [4, 1])
        >>> ds[4]["targets"]["a"], tuple(ds[4]["input"].shape)  # one sample, as a plain DataLoader expects
        (tensor(4), (3,))
    """

    def __init__(self, inputs: Any, targets: Mapping[str, Tensor]) -> None:
        leaves = tensor_leaves(inputs)
        if not leaves:
            raise TypeError(f"inputs must be a Tensor or a dict/tuple of Tensors, got {type(inputs).__name__}.")
        lengths = {len(leaf) for leaf in leaves}
        if len(lengths) > 1:
            raise ValueError(
                f"the input tensors hold different numbers of samples {sorted(lengths)}; give one per sample."
            )
        count = lengths.pop()
        for name, target in targets.items():
            if len(target) != count:
                raise ValueError(
                    f"task {name!r} has {len(target)} targets for {count} inputs; every task needs one target "
                    "per input (mark missing labels with the ignore value)."
                )
        self.inputs = inputs
        self.targets = dict(targets)
        self._length = count

    def __len__(self) -> int:
        return self._length

    def gather(self, indices: Sequence[int]) -> dict[str, Any]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return {
            "input": apply_to_collection(self.inputs, Tensor, lambda tensor: tensor[index]),
            "targets": {name: target[index] for name, target in self.targets.items()},
            "index": index,
        }


class BatchGathering(Dataset):
    """Makes a ``DataLoader`` fetch whole batches from a :class:`GatheringDataset` (its ``gather``).

    PyTorch's fetcher calls ``__getitems__`` with a batch's indices when a data set has it; the loader's
    ``collate_fn`` must then be :func:`collate_batch`, which passes the ready batch through.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        return self.dataset.gather(indices)  # type: ignore[attr-defined]


def unwrap_dataset(dataset: Dataset) -> Dataset:
    """The data set behind a :class:`BatchGathering` wrapper."""
    return dataset.dataset if isinstance(dataset, BatchGathering) else dataset


def fetch_samples(dataset: Dataset, indices: Sequence[int], collate: Any = None) -> Any:
    """Samples ``indices`` as one batch, as a DataLoader would fetch them (without its sampler or workers)."""
    dataset = unwrap_dataset(dataset)
    if isinstance(dataset, GatheringDataset):
        return dataset.gather(list(indices))
    items = dataset.__getitems__(list(indices)) if hasattr(dataset, "__getitems__") else [dataset[i] for i in indices]
    return (collate or default_collate)(items)


class EpochShuffleSampler(Sampler[int]):
    """A shuffle that is a pure function of ``(seed, epoch)``.

    Lightning calls ``set_epoch`` before every epoch, so a run resumed from a checkpoint sees exactly
    the order an uninterrupted run would have seen (a ``RandomSampler``'s generator state is lost).
    """

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):  # noqa: ANN204 - an iterator of ints
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


def collate_batch(batch: Any) -> Any:
    """Collate for :class:`BatchGathering` loaders: a gathered batch passes through; a list of samples is
    collated by PyTorch's ``default_collate``."""
    if isinstance(batch, Mapping):
        return batch
    return default_collate(batch)


def is_task_batch_dict(batch: Any) -> bool:
    """True for a ``CombinedLoader`` batch: a dict of per-source batches (``None`` for an exhausted source)."""
    return (
        isinstance(batch, Mapping)
        and "input" not in batch
        and any(isinstance(b, Mapping) and "input" in b for b in batch.values())
        and all(b is None or (isinstance(b, Mapping) and "input" in b) for b in batch.values())
    )


def merge_task_batches(batch: Any, tasks: Mapping[str, Task] | None = None) -> Any:
    """One batch from a dict of per-source batches; any other batch is returned unchanged.

    A task's targets come from the sources whose batches carry them; the other sources' samples get
    the task's missing label (``Task.missing_targets``, or ``-100`` / ``NaN`` by dtype without ``tasks``).
    Inputs may be any pytree of tensors (a dict of token ids and masks): each leaf is concatenated.

    Example:
        >>> a = {"input": torch.ones(2, 3), "targets": {"a": torch.tensor([1, 0])}, "index": torch.tensor([0, 1])}
        >>> b = {"input": torch.zeros(1, 3), "targets": {"b": torch.tensor([2.5])}, "index": torch.tensor([7])}
        >>> merged = merge_task_batches({"a": a, "b": b})
        >>> merged["targets"]["a"].tolist(), merged["targets"]["b"].tolist(), merged["index"].tolist()
        ([1, 0, -100], [nan, nan, 2.5], [0, 1, 7])
    """
    if not is_task_batch_dict(batch):
        return batch
    parts = [b for b in batch.values() if b is not None]
    inputs = _concatenate([p["input"] for p in parts], "input")
    names = list(dict.fromkeys([*(tasks or {}), *(name for p in parts for name in p["targets"])]))
    first_leaf = tensor_leaves(parts[0]["input"])[0]
    spatial = tuple(first_leaf.shape[2:])
    targets: dict[str, Tensor] = {}
    for name in names:
        template = next((p["targets"][name] for p in parts if name in p["targets"]), None)
        pieces = []
        for part in parts:
            count = len(part["index"])
            if name in part["targets"]:
                pieces.append(part["targets"][name])
            elif template is not None:
                fill = tasks[name].missing_value if tasks and name in tasks else _default_missing(template)
                pieces.append(torch.full((count, *template.shape[1:]), fill, dtype=template.dtype))
            else:  # no source of this step carries the task (an exhausted evaluation loader)
                pieces.append(tasks[name].missing_targets(count, spatial))  # type: ignore[index]
        targets[name] = torch.cat(pieces)
    return {"input": inputs, "targets": targets, "index": torch.cat([p["index"] for p in parts])}


def _concatenate(parts: list[Any], where: str) -> Any:
    """Concatenate the per-source inputs leaf by leaf along the batch axis."""
    first = parts[0]
    if isinstance(first, Tensor):
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise ValueError(
                f"the per-task data sets give {where} of different shapes {sorted(shapes)}; one student reads them "
                "all, so resize (or pad token sequences) to one shape in the data sets."
            )
        return torch.cat(parts)
    if isinstance(first, Mapping):
        keys = [list(p) for p in parts]
        if any(k != keys[0] for k in keys):
            raise ValueError(
                f"the per-task data sets give {where} dicts with different keys {keys}; use the same keys."
            )
        return {key: _concatenate([p[key] for p in parts], f"{where}[{key!r}]") for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_concatenate([p[i] for p in parts], f"{where}[{i}]") for i in range(len(first)))
    raise TypeError(
        f"cannot concatenate {where} of type {type(first).__name__}; inputs must be tensors (or dicts of them)."
    )


def _default_missing(template: Tensor) -> float:
    return math.nan if template.is_floating_point() else IGNORE_INDEX


def hide_labels(dataset: Dataset, fractions: Mapping[str, float], seed: int = 0) -> MultiTaskDataset:
    """A copy of ``dataset`` in which ``round(fraction · N)`` labels of each named task are missing.

    The hidden samples are the first ones of a permutation drawn from ``seed`` (and the task's position in
    ``fractions``, so two tasks hide independent subsets); a missing label is ``-100`` for integer targets
    and ``NaN`` for real-valued ones, the default ignore values. One indexed write per task: no loop over
    samples. The input tensors are shared, the dataset passed in is left untouched.

    Example:
        >>> ds = MultiTaskDataset(torch.zeros(4, 2), {"a": torch.arange(4), "b": torch.ones(4)})
        >>> hidden = hide_labels(ds, {"a": 0.5, "b": 0.25})
        >>> int((hidden.targets["a"] == -100).sum()), int(hidden.targets["b"].isnan().sum()), ds.targets["a"].tolist()
        (2, 1, [0, 1, 2, 3])
    """
    if not isinstance(dataset, MultiTaskDataset):
        raise TypeError(
            f"hide_labels needs the train split as an in-memory MultiTaskDataset, got {type(dataset).__name__}; "
            "hide labels in your dataset itself (set them to the task's ignore value), or drop hide_labels."
        )
    unknown = [task for task in fractions if task not in dataset.targets]
    if unknown:
        raise KeyError(f"hide_labels names task(s) {unknown}, but the data has targets for {list(dataset.targets)}.")
    targets = dict(dataset.targets)
    for position, (task, fraction) in enumerate(fractions.items()):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"hide_labels[{task!r}] = {fraction}: the fraction to hide must lie in [0, 1].")
        count = round(fraction * len(dataset))
        generator = torch.Generator().manual_seed(seed * 1_000_003 + position)
        hidden = torch.randperm(len(dataset), generator=generator)[:count]
        target = targets[task].clone()
        target[hidden] = _default_missing(target)
        targets[task] = target
    return MultiTaskDataset(dataset.inputs, targets)


def join_unlabelled(train: Dataset, unlabelled: Dataset) -> MultiTaskDataset:
    """The training split followed by ``unlabelled`` samples whose every target is missing.

    The unlabelled samples' targets are the tasks' missing labels (``-100`` for integer targets, ``NaN`` for
    real-valued ones, shaped like the training targets), whatever ``unlabelled`` carries, so the supervised
    losses and metrics skip them and only the distillation terms reach them: the teachers label them. Their
    indices follow the training samples' (``len(train) + i``), so the teacher cache keys them apart.

    Example:
        >>> train = MultiTaskDataset(torch.zeros(2, 3), {"a": torch.tensor([1, 2]), "b": torch.ones(2, 1)})
        >>> joined = join_unlabelled(train, MultiTaskDataset(torch.ones(1, 3), {}))
        >>> len(joined), joined.targets["a"].tolist(), joined.targets["b"].isnan().flatten().tolist()
        (3, [1, 2, -100], [False, False, True])
    """
    for name, split in (("train", train), ("unlabelled", unlabelled)):
        if not isinstance(split, MultiTaskDataset):
            raise TypeError(
                f"an unlabelled split is joined to the training split in memory, so both must be MultiTaskDatasets; "
                f"the {name} split is a {type(split).__name__}. Wrap its tensors in MultiTaskDataset, or drop "
                "`unlabelled` and put the samples (with missing labels) in your training data set yourself."
            )
    assert isinstance(train, MultiTaskDataset) and isinstance(unlabelled, MultiTaskDataset)
    count = len(unlabelled)
    inputs = _concatenate([train.inputs, unlabelled.inputs], "input")
    targets = {
        name: torch.cat([target, torch.full((count, *target.shape[1:]), _default_missing(target), dtype=target.dtype)])
        for name, target in train.targets.items()
    }
    return MultiTaskDataset(inputs, targets)


class MultiTaskDataModule(L.LightningDataModule):
    """Loaders over train / val / test multi-task datasets.

    Give the three splits directly, or subclass and implement :meth:`build_splits`.

    Args:
        train, val, test: Datasets yielding the batch dict (e.g. :class:`MultiTaskDataset`).
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes (0 keeps in-memory data in the main process, the fastest here).
        pin_memory: Pin host memory; ``None`` pins when CUDA is available.
        seed: Seed of the training shuffle (and of any random split a subclass makes, and of ``hide_labels``).
        hide_labels: ``{task: fraction}``: hide that fraction of the task's *training* labels, to study
            partial labels (e.g. with ``pseudo_label_missing``). A seeded random subset of
            ``round(fraction · N)`` training samples gets the missing label (see :func:`hide_labels`);
            validation and test keep every label. Needs an in-memory train split (:class:`MultiTaskDataset`).
        unlabelled: Inputs without labels that join the training split (:func:`join_unlabelled`): every
            target missing, so the supervised losses skip them and the distillation terms reach them, the
            teachers labelling inputs the student has no labels for. A subclass may instead return an
            ``"unlabelled"`` split from :meth:`build_splits`. A student trained from labels alone ignores them.
        augment: A :class:`~lightning_mtkd.data.augment.BatchAugment` applied to every *training* batch after it
            reaches the device, once, so the teachers and the student see the same view (consistent teaching,
            Beyer et al., CVPR 2022). A TeacherCache of the training split is then refused (the teachers' outputs
            depend on the view); validation and test batches are never augmented.

    YAML::

        data:
          class_path: lightning_mtkd.data.MultiMNISTDataModule
          init_args: {hide_labels: {right: 0.5}}
    """

    def __init__(
        self,
        train: Dataset | None = None,
        val: Dataset | None = None,
        test: Dataset | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        hide_labels: dict[str, float] | None = None,
        unlabelled: Dataset | None = None,
        augment: BatchAugment | None = None,
    ) -> None:
        super().__init__()
        if augment is not None and not isinstance(augment, BatchAugment):
            raise TypeError(
                f"augment must be a lightning_mtkd.data.BatchAugment, got {type(augment).__name__}; for another "
                "transform, override on_after_batch_transfer in a subclass."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        for task, fraction in (hide_labels or {}).items():
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(
                    f"hide_labels[{task!r}] = {fraction}: the fraction of training labels to hide must lie in [0, 1]."
                )
        self.hide_labels = dict(hide_labels or {})
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.seed = seed
        self.augment = augment
        #: Unlabelled samples joined to the training split at setup (0 before, or without any).
        self.num_unlabelled = 0
        self.splits: dict[str, Dataset] = {}
        given = {"train": train, "val": val, "test": test, "unlabelled": unlabelled}
        if train is not None or val is not None or test is not None:
            self.splits = {k: v for k, v in given.items() if v is not None}
        elif unlabelled is not None:
            self._unlabelled = unlabelled

    def build_splits(self) -> dict[str, Dataset]:
        """``{"train": ..., "val": ..., "test": ...}``; subclasses make their data here."""
        raise NotImplementedError("give train/val/test datasets or implement build_splits()")

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = self.build_splits()
            if getattr(self, "_unlabelled", None) is not None:
                self.splits["unlabelled"] = self._unlabelled
        if self.hide_labels and "train" in self.splits and not self.num_unlabelled:
            # Idempotent (the same seeded subset each time), so a second setup() changes nothing.
            self.splits["train"] = hide_labels(self.splits["train"], self.hide_labels, self.seed)
        unlabelled = self.splits.pop("unlabelled", None)
        if unlabelled is not None and len(unlabelled) > 0:  # type: ignore[arg-type]
            if "train" not in self.splits:
                raise ValueError("an unlabelled split joins the training split, but this DataModule has none.")
            self.splits["train"] = join_unlabelled(self.splits["train"], unlabelled)
            self.num_unlabelled = len(unlabelled)  # type: ignore[arg-type]
        if self.augment is not None and stage in ("fit", None) and self.trainer is not None:
            check_teacher_cache(self.trainer, self.augment)
        for name, split in self.splits.items():
            if len(split) == 0:  # type: ignore[arg-type]
                raise ValueError(f"the {name!r} split is empty; give it at least one sample.")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.splits:
            self.setup()
        if split not in self.splits:
            raise ValueError(f"this DataModule has no {split!r} split (it has {list(self.splits)}).")
        dataset = self.splits[split]
        return DataLoader(
            BatchGathering(dataset) if isinstance(dataset, GatheringDataset) else dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed) if shuffle else None,  # type: ignore[arg-type]
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate_batch,
            persistent_workers=self.num_workers > 0,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # One data set per task: a CombinedLoader's {source: batch} becomes one batch before callbacks see it.
        module = self.trainer.lightning_module if self.trainer is not None else None
        return merge_task_batches(batch, getattr(module, "tasks", None))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # On the device, once per training batch, before the step: teachers and student get the same view.
        if self.augment is None or self.trainer is None or not self.trainer.training:
            return batch
        return self.augment(batch, step=self.trainer.global_step, rank=self.trainer.global_rank)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
