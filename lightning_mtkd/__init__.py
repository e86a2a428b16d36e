"""lightning-mtkd: multi-task knowledge distillation strategies for PyTorch Lightning."""

from lightning_mtkd.strategies import (
    AdaptiveDistiller,
    AttentionDistiller,
    AttentionPair,
    DistillationModule,
    FusionDistiller,
    ModelOutputs,
    MultiTaskModule,
    SharedDistiller,
    TaskSpecificDistiller,
    TransferDistiller,
    load_student,
    load_teacher,
)
from lightning_mtkd.tasks import Task

__version__ = "0.1.0"

__all__ = [
    "AdaptiveDistiller",
    "AttentionDistiller",
    "AttentionPair",
    "DistillationModule",
    "FusionDistiller",
    "ModelOutputs",
    "MultiTaskModule",
    "SharedDistiller",
    "Task",
    "TaskSpecificDistiller",
    "TransferDistiller",
    "load_student",
    "load_teacher",
]
