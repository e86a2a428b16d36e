"""Callbacks: training guards, reports and the teacher-output cache."""

from lightning_mtkd.callbacks.guard import NonFiniteLossGuard
from lightning_mtkd.callbacks.teacher_cache import TeacherCache, dataset_fingerprint

__all__ = ["NonFiniteLossGuard", "TeacherCache", "dataset_fingerprint"]
