"""The LightningModules: the shared base and one file per distillation strategy."""

from lightning_mtkd.strategies.adaptive import AdaptiveDistiller
from lightning_mtkd.strategies.attention import AttentionDistiller, AttentionPair
from lightning_mtkd.strategies.base import DistillationModule, ModelOutputs, MultiTaskModule, load_teacher
from lightning_mtkd.strategies.shared import SharedDistiller

__all__ = [
    "AdaptiveDistiller",
    "AttentionDistiller",
    "AttentionPair",
    "DistillationModule",
    "ModelOutputs",
    "MultiTaskModule",
    "SharedDistiller",
    "load_teacher",
]
