"""The LightningModules: the shared base and one file per distillation strategy."""

from lightning_mtkd.checkpoints import load_module, load_teacher
from lightning_mtkd.strategies.adaptive import AdaptiveDistiller
from lightning_mtkd.strategies.attention import AttentionDistiller, AttentionPair
from lightning_mtkd.strategies.base import FeaturePair, ModelOutputs, MultiTaskModule, Step
from lightning_mtkd.strategies.distillation import DistillationModule
from lightning_mtkd.strategies.fusion import FusionDistiller
from lightning_mtkd.strategies.online import MutualDistiller, SelfDistiller
from lightning_mtkd.strategies.shared import SharedDistiller
from lightning_mtkd.strategies.step import CRD
from lightning_mtkd.strategies.task_specific import TaskSpecificDistiller
from lightning_mtkd.strategies.transfer import TransferDistiller, load_student

__all__ = [
    "AdaptiveDistiller",
    "AttentionDistiller",
    "AttentionPair",
    "CRD",
    "DistillationModule",
    "FeaturePair",
    "FusionDistiller",
    "ModelOutputs",
    "MultiTaskModule",
    "MutualDistiller",
    "SelfDistiller",
    "SharedDistiller",
    "Step",
    "TaskSpecificDistiller",
    "TransferDistiller",
    "load_module",
    "load_student",
    "load_teacher",
]
