"""Callbacks: the distillation report."""

from lightning_mtkd.callbacks.report import (
    DistillationReport,
    DistillationSummary,
    measure_latencies,
    measure_latency,
    run_directory,
)

__all__ = ["DistillationReport", "DistillationSummary", "measure_latencies", "measure_latency", "run_directory"]
