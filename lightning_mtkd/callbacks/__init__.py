"""Callbacks: training guards, the distillation report and the teacher-output cache."""

from lightning_mtkd.callbacks.guard import NonFiniteLossGuard
from lightning_mtkd.callbacks.report import (
    DistillationReport,
    DistillationSummary,
    measure_latencies,
    measure_latency,
    run_directory,
)
from lightning_mtkd.callbacks.teacher_cache import TeacherCache, dataset_fingerprint

__all__ = [
    "DistillationReport",
    "DistillationSummary",
    "NonFiniteLossGuard",
    "TeacherCache",
    "dataset_fingerprint",
    "measure_latencies",
    "measure_latency",
    "run_directory",
]
