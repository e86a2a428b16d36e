"""Distillation losses: pure functions in :mod:`lightning_mtkd.losses.functional`."""

from lightning_mtkd.losses.functional import (
    binary_soft_target_kd,
    feature_distance,
    masked_mean,
    soft_target_kd,
)

__all__ = ["binary_soft_target_kd", "feature_distance", "masked_mean", "soft_target_kd"]
