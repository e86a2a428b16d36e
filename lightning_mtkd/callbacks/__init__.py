"""Callbacks: the teacher-output cache."""

from lightning_mtkd.callbacks.teacher_cache import TeacherCache, dataset_fingerprint

__all__ = ["TeacherCache", "dataset_fingerprint"]
