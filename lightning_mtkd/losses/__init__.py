"""Distillation losses: pure functions in :mod:`lightning_mtkd.losses.functional`."""

from lightning_mtkd.losses.functional import (
    attention_map,
    attention_probability_loss,
    attention_transfer_loss,
    binary_soft_target_kd,
    feature_distance,
    masked_mean,
    soft_target_kd,
)

__all__ = [
    "attention_map",
    "attention_probability_loss",
    "attention_transfer_loss",
    "binary_soft_target_kd",
    "feature_distance",
    "masked_mean",
    "soft_target_kd",
]
