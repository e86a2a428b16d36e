"""Task-weighting plug-ins, orthogonal to the distillation strategy."""

from lightning_mtkd.weighting.base import StaticWeighting, Weighting, term_task

__all__ = ["StaticWeighting", "Weighting", "term_task"]
