"""The LightningModules: the shared base and one file per distillation strategy."""

from lightning_mtkd.strategies.adaptive import AdaptiveDistiller
from lightning_mtkd.strategies.attention import AttentionDistiller, AttentionPair
from lightning_mtkd.strategies.base import DistillationModule, ModelOutputs, MultiTaskModule, load_teacher
from lightning_mtkd.strategies.fusion import FusionDistiller
from lightning_mtkd.strategies.shared import SharedDistiller
from lightning_mtkd.strategies.task_specific import TaskSpecificDistiller
from lightning_mtkd.strategies.transfer import TransferDistiller, load_student

__all__ = [
    "AdaptiveDistiller",
    "AttentionDistiller",
    "AttentionPair",
    "DistillationModule",
    "FusionDistiller",
    "ModelOutputs",
    "MultiTaskModule",
    "SharedDistiller",
    "TaskSpecificDistiller",
    "TransferDistiller",
    "load_student",
    "load_teacher",
]
