"""Callbacks: training guards, reports and the teacher cache."""

from lightning_mtkd.callbacks.guard import NonFiniteLossGuard

__all__ = ["NonFiniteLossGuard"]
