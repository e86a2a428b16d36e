"""Task-weighting plug-ins, orthogonal to the distillation strategy (`weighting: {class_path: ...}`)."""

from lightning_mtkd.weighting.annealing import TeacherAnnealing
from lightning_mtkd.weighting.base import StaticWeighting, Weighting, term_task
from lightning_mtkd.weighting.dwa import DynamicWeightAverage, dwa_weights
from lightning_mtkd.weighting.gradnorm import GradNorm, gradnorm_loss, gradnorm_targets
from lightning_mtkd.weighting.uncertainty import UncertaintyWeighting, uncertainty_weighted_loss

__all__ = [
    "DynamicWeightAverage",
    "GradNorm",
    "StaticWeighting",
    "TeacherAnnealing",
    "UncertaintyWeighting",
    "Weighting",
    "dwa_weights",
    "gradnorm_loss",
    "gradnorm_targets",
    "term_task",
    "uncertainty_weighted_loss",
]
