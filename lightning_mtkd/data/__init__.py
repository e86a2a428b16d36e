"""DataModules and datasets that feed multi-task batches."""

from lightning_mtkd.data.base import MultiTaskDataModule, MultiTaskDataset, collate_batch
from lightning_mtkd.data.celeba import CelebADataModule, CelebADataset
from lightning_mtkd.data.csv import CSVMultiTaskDataModule
from lightning_mtkd.data.idx import read_idx, read_mnist_split
from lightning_mtkd.data.multimnist import MultiMNISTDataModule

__all__ = [
    "CelebADataModule",
    "CelebADataset",
    "CSVMultiTaskDataModule",
    "MultiMNISTDataModule",
    "MultiTaskDataModule",
    "MultiTaskDataset",
    "collate_batch",
    "read_idx",
    "read_mnist_split",
]
