"""CelebA face attributes, read from the folder the data set is distributed as.

Layout (Liu et al., *Deep Learning Face Attributes in the Wild*, ICCV 2015)::

    root/
      img_align_celeba/000001.jpg …        aligned and cropped JPEGs, 178×218
      list_attr_celeba.txt                 line 1: the image count; line 2: the 40 attribute names;
                                           then "000001.jpg -1  1 …" (1 = has the attribute, -1 = not)
      list_eval_partition.txt              "000001.jpg 0" (0 = train, 1 = val, 2 = test)

Images are decoded with PIL when a batch is drawn (202,599 JPEGs do not fit in memory as tensors); use
``num_workers`` to decode in parallel.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_mtkd.data.augment import BatchAugment
from lightning_mtkd.data.base import GatheringDataset, MultiTaskDataModule
from lightning_mtkd.tasks import IGNORE_INDEX, Task

ATTRIBUTE_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IMAGE_FOLDER = "img_align_celeba"
PARTITIONS = {0: "train", 1: "val", 2: "test"}

#: The 40 attributes, in the order of ``list_attr_celeba.txt``.
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips", "Big_Nose",
    "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses",
    "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young",
)


def read_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """``(image names, attribute names, values)`` of ``list_attr_celeba.txt``: ``1``/``-1`` (``0``: unknown)."""
    if not path.is_file():
        raise FileNotFoundError(f"CelebA attribute file {str(path)!r} does not exist (it ships as {ATTRIBUTE_FILE}).")
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if len(lines) < 2 or len(lines[0]) != 1 or not lines[0][0].isdigit():
        raise ValueError(
            f"{str(path)!r} does not look like {ATTRIBUTE_FILE}: line 1 must be the image count and line 2 the "
            "attribute names."
        )
    count, names, rows = int(lines[0][0]), lines[1], lines[2:]
    if count != len(rows):
        raise ValueError(
            f"{str(path)!r} announces {count} images on line 1 but lists {len(rows)}; the file is cut short."
        )
    for number, row in enumerate(rows, start=3):
        if len(row) != len(names) + 1:
            raise ValueError(
                f"{str(path)!r}, line {number}: {len(row) - 1} attribute values for {len(names)} attribute names."
            )
    try:
        values = np.array([row[1:] for row in rows], dtype=np.int64).reshape(len(rows), len(names))
    except ValueError:
        raise ValueError(f"{str(path)!r}: attribute values must be 1 or -1 (0 for unknown).") from None
    if not np.isin(values, (-1, 0, 1)).all():
        raise ValueError(f"{str(path)!r}: attribute values must be 1 or -1 (0 for unknown).")
    return [row[0] for row in rows], names, values


def read_partition(path: Path) -> dict[str, str]:
    """``{image name: "train" | "val" | "test"}`` from ``list_eval_partition.txt``."""
    if not path.is_file():
        raise FileNotFoundError(f"CelebA partition file {str(path)!r} does not exist (it ships as {PARTITION_FILE}).")
    result = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise ValueError(f"{str(path)!r}, line {number}: expected '<image> <0|1|2>', got {line!r}.")
        result[parts[0]] = PARTITIONS[int(parts[1])]
    return result


def load_image(path: Path, crop: int | None, size: int) -> np.ndarray:
    """One RGB image as ``(3, size, size)`` uint8: centre-cropped to ``crop``×``crop`` (if given), then resized."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
            if crop is not None:
                crop = min(crop, image.width, image.height)
                left, top = (image.width - crop) // 2, (image.height - crop) // 2
                image = image.crop((left, top, left + crop, top + crop))
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image).transpose(2, 0, 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"CelebA image {str(path)!r} does not exist.") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"CelebA image {str(path)!r} cannot be decoded ({error}); replace the file.") from None


class CelebADataset(GatheringDataset):
    """One CelebA split: images decoded on demand, attributes as targets (0/1, ``-100`` if unknown).

    Args:
        image_dir: The ``img_align_celeba`` folder.
        files: Image file names of the split.
        attributes: ``(N, K)`` labels, 1 / 0 / ``-100``.
        names: The ``K`` attribute names.
        mode: ``binary`` (one two-class task per attribute) or ``multilabel`` (one task of ``K`` labels).
        multilabel_task: The multilabel task's name.
        image_size, crop: See :class:`CelebADataModule`.
    """

    def __init__(
        self,
        image_dir: Path,
        files: Sequence[str],
        attributes: Tensor,
        names: Sequence[str],
        mode: Literal["binary", "multilabel"],
        multilabel_task: str,
        image_size: int,
        crop: int | None,
    ) -> None:
        self.image_dir, self.files, self.attributes, self.names = image_dir, list(files), attributes, list(names)
        self.mode, self.multilabel_task, self.image_size, self.crop = mode, multilabel_task, image_size, crop

    def __len__(self) -> int:
        return len(self.files)

    def gather(self, indices: Sequence[int]) -> dict[str, Any]:
        index = torch.as_tensor(indices, dtype=torch.long)
        # Decoding is per file by nature; the DataLoader's workers run this off the training process.
        images = np.stack([load_image(self.image_dir / self.files[i], self.crop, self.image_size) for i in indices])
        labels = self.attributes[index]
        if self.mode == "multilabel":
            targets = {self.multilabel_task: labels}
        else:
            targets = {name: labels[:, k] for k, name in enumerate(self.names)}
        return {"input": torch.from_numpy(images).float().div_(255.0), "targets": targets, "index": index}


class CelebADataModule(MultiTaskDataModule):
    """CelebA's 40 face attributes (or a subset) as binary tasks or one multilabel task, on its official splits.

    Args:
        root: The CelebA folder (holding ``img_align_celeba/``, ``list_attr_celeba.txt``,
            ``list_eval_partition.txt``). The Kaggle copy's doubled ``img_align_celeba/img_align_celeba/`` works too.
        attributes: Attribute names to keep, in this order (``None``: all 40), e.g. ``[Smiling, Male, Young]``.
        mode: ``binary``: one two-class classification task per attribute, named after it; ``multilabel``:
            one task (``multilabel_task``) predicting all selected attributes at once.
        multilabel_task: Name of the multilabel task.
        image_size: Side of the square input images.
        crop: Centre crop (pixels, at most the image's shorter side) before resizing; 178 keeps the whole width
            of the 178×218 aligned faces.
            ``None`` resizes the full image (distorting its aspect ratio).
        max_samples: Keep at most this many images per split (the first in the file), for quick runs.
        batch_size, num_workers, pin_memory, seed, augment: As in :class:`MultiTaskDataModule` (``augment``: e.g.
            ``BatchAugment(shift=4, mixup=1.0, mixup_mode="append")``).

    After ``setup()``, :meth:`tasks` gives the matching :class:`~lightning_mtkd.Task` list.

    YAML::

        data:
          class_path: lightning_mtkd.data.CelebADataModule
          init_args: {root: data/celeba, attributes: [Smiling, Male, Young], mode: binary, image_size: 64}
    """

    def __init__(
        self,
        root: str,
        attributes: list[str] | None = None,
        mode: Literal["binary", "multilabel"] = "multilabel",
        multilabel_task: str = "attributes",
        image_size: int = 64,
        crop: int | None = 178,
        max_samples: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        augment: BatchAugment | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, seed=seed, augment=augment
        )
        if mode not in ("binary", "multilabel"):
            raise ValueError(f"mode {mode!r} must be 'binary' or 'multilabel'.")
        if image_size < 1 or (crop is not None and crop < 1) or (max_samples is not None and max_samples < 1):
            raise ValueError("image_size, crop and max_samples must be >= 1.")
        if attributes is not None and len(set(attributes)) != len(attributes):
            raise ValueError(f"attributes {attributes} lists a name twice.")
        self.root = Path(root)
        self.attribute_names = list(attributes) if attributes is not None else None
        self.mode: Literal["binary", "multilabel"] = mode
        self.multilabel_task = multilabel_task
        self.image_size, self.crop, self.max_samples = image_size, crop, max_samples
        self.input_shape = (3, image_size, image_size)

    def image_dir(self) -> Path:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"CelebA root {str(self.root)!r} does not exist; give the folder holding {IMAGE_FOLDER}/, "
                f"{ATTRIBUTE_FILE} and {PARTITION_FILE}."
            )
        folder = self.root / IMAGE_FOLDER
        if (folder / IMAGE_FOLDER).is_dir():  # the Kaggle copy nests the folder
            folder = folder / IMAGE_FOLDER
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{str(self.root)!r} has no {IMAGE_FOLDER}/ folder of images; unpack img_align_celeba.zip there."
            )
        return folder

    def build_splits(self) -> dict[str, Dataset]:
        image_dir = self.image_dir()
        files, names, values = read_attributes(self.root / ATTRIBUTE_FILE)
        partition = read_partition(self.root / PARTITION_FILE)
        unpartitioned = [f for f in files if f not in partition]
        if unpartitioned:
            raise ValueError(
                f"{len(unpartitioned)} image(s) of {ATTRIBUTE_FILE} have no line in {PARTITION_FILE} (first: "
                f"{unpartitioned[:3]}); the two files must list the same images."
            )
        on_disk = {entry.name for entry in image_dir.iterdir()}
        absent = [f for f in files if f not in on_disk]
        if absent:
            raise FileNotFoundError(
                f"{len(absent)} of the {len(files)} images listed in {ATTRIBUTE_FILE} are not in {str(image_dir)!r} "
                f"(first: {absent[:3]}); the image folder is incomplete."
            )
        keep = self.attribute_names if self.attribute_names is not None else names
        unknown = [a for a in keep if a not in names]
        if unknown:
            raise ValueError(f"unknown CelebA attribute(s) {unknown}; the attributes are {names}.")
        columns = values[:, [names.index(a) for a in keep]]
        labels = torch.from_numpy(np.where(columns == 0, IGNORE_INDEX, (columns + 1) // 2))
        splits: dict[str, Dataset] = {}
        for split in ("train", "val", "test"):
            rows = [i for i, f in enumerate(files) if partition[f] == split][: self.max_samples]
            splits[split] = CelebADataset(
                image_dir, [files[i] for i in rows], labels[rows], keep, self.mode, self.multilabel_task,
                self.image_size, self.crop,
            )
        self.selected = keep
        return splits

    def tasks(self) -> list[Task]:
        """The tasks these batches carry (call after ``setup()``)."""
        if not self.splits:
            self.setup()
        if self.mode == "multilabel":
            return [Task(self.multilabel_task, kind="multilabel", num_classes=len(self.selected))]
        return [Task(name, num_classes=2) for name in self.selected]
