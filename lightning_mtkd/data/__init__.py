"""DataModules and datasets that feed multi-task batches."""

from lightning_mtkd.data.base import MultiTaskDataModule, MultiTaskDataset, collate_batch
from lightning_mtkd.data.multimnist import MultiMNISTDataModule

__all__ = ["MultiMNISTDataModule", "MultiTaskDataModule", "MultiTaskDataset", "collate_batch"]
