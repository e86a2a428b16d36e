"""DataModules and datasets that feed multi-task batches."""

from lightning_mtkd.data.augment import BatchAugment
from lightning_mtkd.data.base import (
    BatchGathering,
    GatheringDataset,
    MultiTaskDataModule,
    MultiTaskDataset,
    collate_batch,
    hide_labels,
    join_unlabelled,
    merge_task_batches,
)
from lightning_mtkd.data.celeba import CelebADataModule, CelebADataset
from lightning_mtkd.data.csv import CSVMultiTaskDataModule
from lightning_mtkd.data.idx import read_idx, read_mnist_split
from lightning_mtkd.data.multimnist import MultiMNISTDataModule
from lightning_mtkd.data.nyuv2 import NYUv2DataModule, NYUv2Dataset
from lightning_mtkd.data.optdigits import MultiOptDigitsDataModule
from lightning_mtkd.data.packaged_tables import AbaloneDataModule, PackagedTableDataModule, PenguinsDataModule
from lightning_mtkd.data.per_task import PerTaskDataModule, source_shares

__all__ = [
    "AbaloneDataModule",
    "BatchAugment",
    "BatchGathering",
    "GatheringDataset",
    "CelebADataModule",
    "CelebADataset",
    "CSVMultiTaskDataModule",
    "MultiMNISTDataModule",
    "MultiOptDigitsDataModule",
    "MultiTaskDataModule",
    "MultiTaskDataset",
    "NYUv2DataModule",
    "NYUv2Dataset",
    "PackagedTableDataModule",
    "PenguinsDataModule",
    "PerTaskDataModule",
    "collate_batch",
    "hide_labels",
    "join_unlabelled",
    "merge_task_batches",
    "read_idx",
    "read_mnist_split",
    "source_shares",
]
