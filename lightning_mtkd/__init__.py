"""lightning-mtkd: multi-task knowledge distillation strategies for PyTorch Lightning."""

from lightning_mtkd.strategies import (
    AdaptiveDistiller,
    AttentionDistiller,
    AttentionPair,
    DistillationModule,
    FeaturePair,
    FusionDistiller,
    ModelOutputs,
    MultiTaskModule,
    MutualDistiller,
    SelfDistiller,
    SharedDistiller,
    Step,
    TaskSpecificDistiller,
    TransferDistiller,
    load_module,
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
    "FeaturePair",
    "FusionDistiller",
    "ModelOutputs",
    "MultiTaskModule",
    "MutualDistiller",
    "SelfDistiller",
    "SharedDistiller",
    "Step",
    "Task",
    "TaskSpecificDistiller",
    "TransferDistiller",
    "load_module",
    "load_student",
    "load_teacher",
]
