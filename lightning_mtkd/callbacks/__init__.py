"""Callbacks: training guards, the distillation report, the teacher-output cache and teacher trust."""

from lightning_mtkd.callbacks.guard import NonFiniteLossGuard
from lightning_mtkd.callbacks.kd_search import KDSearch, rank_candidates
from lightning_mtkd.callbacks.report import (
    DistillationReport,
    DistillationSummary,
    measure_latencies,
    measure_latency,
    run_directory,
)
from lightning_mtkd.callbacks.teacher_cache import TeacherCache, dataset_fingerprint
from lightning_mtkd.callbacks.teacher_trust import TeacherTrust, trusted_teachers

__all__ = [
    "DistillationReport",
    "DistillationSummary",
    "KDSearch",
    "NonFiniteLossGuard",
    "TeacherCache",
    "TeacherTrust",
    "dataset_fingerprint",
    "measure_latencies",
    "measure_latency",
    "rank_candidates",
    "run_directory",
    "trusted_teachers",
]
