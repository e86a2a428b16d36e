"""The LightningModules: the shared base and one file per distillation strategy."""

from lightning_mtkd.strategies.base import DistillationModule, ModelOutputs, MultiTaskModule, load_teacher
from lightning_mtkd.strategies.shared import SharedDistiller

__all__ = ["DistillationModule", "ModelOutputs", "MultiTaskModule", "SharedDistiller", "load_teacher"]
