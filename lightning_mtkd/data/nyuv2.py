"""NYUv2 (13-class segmentation, depth, surface normals) in the preprocessed layout of MTAN and LibMTL.

Layout (Liu et al., *End-to-End Multi-Task Learning with Attention*, CVPR 2019; the same files
LibMTL reads)::

    root/
      train/image/0.npy …   (H, W, 3) float RGB in [0, 1]            795 samples, H×W = 288×384
      train/label/0.npy …   (H, W) class in 0..12, -1 = unlabelled
      train/depth/0.npy …   (H, W, 1) metres, 0 = no reading
      train/normal/0.npy …  (H, W, 3) unit normals, all-zero = none
      val/…                 the same, 654 samples (the published test split)

Missing values become this library's missing labels: ``-1`` → ``-100``, depth ``0`` and all-zero
normals → ``NaN``; they are masked out of every loss and metric. Arrays are read when a batch is
drawn (1,449 full-size samples are ~4 GB as float32); ``num_workers`` reads in parallel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lightning_mtkd.data.augment import BatchAugment
from lightning_mtkd.data.base import GatheringDataset, MultiTaskDataModule
from lightning_mtkd.tasks import IGNORE_INDEX, Task

NYUTask = Literal["segmentation", "depth", "normals"]
#: Task name → the folder holding its arrays.
FOLDERS = {"segmentation": "label", "depth": "depth", "normals": "normal"}
NUM_CLASSES = 13


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{str(path)!r} cannot be read as a .npy array ({error}); replace the file.") from None


def array_indices(folder: Path) -> list[int]:
    """The sample indices ``<index>.npy`` present in ``folder``, sorted."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"NYUv2 folder {str(folder)!r} does not exist; the layout is "
            "<root>/train|val/image|label|depth|normal/<i>.npy (the preprocessed NYUv2 of MTAN / LibMTL)."
        )
    indices = []
    for entry in folder.iterdir():
        if entry.suffix == ".npy" and entry.stem.isdigit():
            indices.append(int(entry.stem))
    return sorted(indices)


class NYUv2Dataset(GatheringDataset):
    """One NYUv2 split, read sample by sample from ``.npy`` files and gathered into a batch.

    Args:
        folder: The split folder (``root/train`` or ``root/val``).
        indices: The sample indices to serve (``<index>.npy``).
        tasks: Which targets to read.
        size: ``(H, W)`` to resize to (bilinear for images, nearest for targets), or ``None``.
    """

    def __init__(
        self, folder: Path, indices: Sequence[int], tasks: Sequence[str], size: tuple[int, int] | None
    ) -> None:
        self.folder, self.indices, self.tasks, self.size = folder, list(indices), list(tasks), size

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, kind: str, index: int, height_width: tuple[int, ...] | None) -> np.ndarray:
        path = self.folder / ("image" if kind == "image" else FOLDERS[kind]) / f"{index}.npy"
        array = _load(path)
        if kind == "depth" and array.ndim == 2:
            array = array[..., None]
        channels = {"image": 3, "depth": 1, "normals": 3}.get(kind)
        expected = (*height_width, channels) if height_width and channels else None
        if kind == "segmentation":
            ok = array.ndim == 2 and (height_width is None or array.shape == height_width)
        else:
            ok = array.ndim == 3 and array.shape[-1] == channels and (expected is None or array.shape == expected)
        if not ok:
            want = "(H, W)" if kind == "segmentation" else f"(H, W, {channels})"
            raise ValueError(
                f"{str(path)!r} holds an array of shape {array.shape}; a NYUv2 {kind} array is {want}"
                + (f" with the image's H×W = {height_width}." if height_width else ".")
            )
        return array

    def gather(self, indices: Sequence[int]) -> dict[str, Any]:
        # Files are read one by one by nature; the DataLoader's workers do it off the training process.
        images: list[np.ndarray] = []
        targets: dict[str, list[np.ndarray]] = {task: [] for task in self.tasks}
        for i in indices:
            image = self._read("image", self.indices[i], None)
            images.append(image)
            for task in self.tasks:
                targets[task].append(self._read(task, self.indices[i], image.shape[:2]))
        image_batch = torch.from_numpy(np.stack(images)).float().permute(0, 3, 1, 2)
        batch_targets = {}
        for task, arrays in targets.items():
            values = torch.from_numpy(np.stack(arrays)).float()
            if task == "segmentation":
                labels = values.round().long()
                batch_targets[task] = labels.masked_fill(labels < 0, IGNORE_INDEX)
            else:
                values = values.permute(0, 3, 1, 2)
                missing = (values == 0).all(dim=1, keepdim=True).expand_as(values)
                batch_targets[task] = values.masked_fill(missing, math.nan)
        if self.size is not None and tuple(image_batch.shape[-2:]) != self.size:
            image_batch = F.interpolate(image_batch, size=self.size, mode="bilinear", align_corners=False)
            for task, value in batch_targets.items():
                if task == "segmentation":  # nearest keeps labels (and -100) intact
                    value = F.interpolate(value[:, None].float(), size=self.size, mode="nearest")[:, 0].long()
                else:
                    value = F.interpolate(value, size=self.size, mode="nearest")
                batch_targets[task] = value
        return {"input": image_batch, "targets": batch_targets, "index": torch.as_tensor(indices, dtype=torch.long)}


class NYUv2DataModule(MultiTaskDataModule):
    """NYUv2's three dense tasks from the preprocessed ``.npy`` layout (see the module docstring).

    The ``val/`` folder is the published test split; as in MTAN and LibMTL it serves both validation
    and test, unless ``val_from_train`` holds out that many training samples for validation.

    Args:
        root: The folder holding ``train/`` and ``val/``.
        tasks: Which of ``segmentation``, ``depth``, ``normals`` to load (their target names in the batch).
        image_size: ``[H, W]`` to resize to (e.g. ``[144, 192]``, half size); ``None`` keeps 288×384.
        val_from_train: Training samples held out (at random, from ``seed``) for validation.
        batch_size, num_workers, pin_memory, seed, augment: As in :class:`MultiTaskDataModule` (``augment``: noise
            and mixup; ``shift`` is refused, since it would move the image away from its dense maps).

    YAML::

        data:
          class_path: lightning_mtkd.data.NYUv2DataModule
          init_args: {root: data/nyuv2, image_size: [144, 192], batch_size: 8}
    """

    def __init__(
        self,
        root: str,
        tasks: list[NYUTask] | None = None,
        image_size: tuple[int, int] | None = None,
        val_from_train: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        augment: BatchAugment | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, seed=seed, augment=augment
        )
        chosen: list[str] = list(tasks) if tasks is not None else list(FOLDERS)
        unknown = [t for t in chosen if t not in FOLDERS]
        if unknown or not chosen or len(set(chosen)) != len(chosen):
            raise ValueError(f"tasks {chosen} must be distinct names among {list(FOLDERS)}.")
        if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
            raise ValueError(f"image_size must be [H, W] with positive sides, got {image_size}.")
        if val_from_train < 0:
            raise ValueError(f"val_from_train must be >= 0, got {val_from_train}.")
        self.root = Path(root)
        self.task_names: list[str] = chosen
        self.image_size: tuple[int, int] | None = (image_size[0], image_size[1]) if image_size is not None else None
        self.val_from_train = val_from_train

    def _split_indices(self, split: str) -> list[int]:
        folder = self.root / split
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"NYUv2 root {str(self.root)!r} does not exist; give the folder holding train/ and val/."
            )
        found = {name: array_indices(folder / name) for name in ["image", *(FOLDERS[t] for t in self.task_names)]}
        images = found["image"]
        if not images:
            raise ValueError(f"{str(folder / 'image')!r} holds no <index>.npy arrays.")
        for name, indices in found.items():
            if indices != images:
                missing = sorted(set(images) - set(indices))[:5]
                extra = sorted(set(indices) - set(images))[:5]
                raise ValueError(
                    f"{split}/{name} has {len(indices)} arrays but {split}/image has {len(images)} (no {name} for "
                    f"indices {missing}, no image for {extra}); every image needs one array per task."
                )
        return images

    def build_splits(self) -> dict[str, Dataset]:
        train = self._split_indices("train")
        test = self._split_indices("val")
        make = lambda split, idx: NYUv2Dataset(self.root / split, idx, self.task_names, self.image_size)  # noqa: E731
        if self.val_from_train:
            if self.val_from_train >= len(train):
                raise ValueError(
                    f"val_from_train={self.val_from_train} leaves no training sample (there are {len(train)})."
                )
            order = np.random.default_rng(self.seed).permutation(len(train))
            held = sorted(train[i] for i in order[: self.val_from_train])
            kept = sorted(train[i] for i in order[self.val_from_train :])
            return {"train": make("train", kept), "val": make("train", held), "test": make("val", test)}
        return {"train": make("train", train), "val": make("val", test), "test": make("val", test)}

    def tasks(self) -> list[Task]:
        """The matching :class:`~lightning_mtkd.Task` list."""
        channels = {"segmentation": NUM_CLASSES, "depth": 1, "normals": 3}
        return [Task(name, kind=name, num_classes=channels[name]) for name in self.task_names]  # type: ignore[arg-type]
