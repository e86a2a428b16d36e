"""Distillation losses: pure functions.

:mod:`~lightning_mtkd.losses.functional` holds the soft-target, feature and attention losses,
:mod:`~lightning_mtkd.losses.logits` the logit losses beyond Hinton's (DKD, DIST, logit standardisation,
MSE; its docstring tells which applies to which task kind) and
:mod:`~lightning_mtkd.losses.relational` the relational and contrastive feature losses (RKD, CRD).
"""

from lightning_mtkd.losses.functional import (
    attention_map,
    attention_probability_loss,
    attention_transfer_loss,
    binary_soft_target_kd,
    feature_distance,
    masked_mean,
    soft_target_kd,
    token_feature_distance,
)
from lightning_mtkd.losses.logits import (
    dist_loss,
    dkd_loss,
    dkd_terms,
    kl_loss,
    logit_mse_loss,
    sigmoid_mse_loss,
    standardize_logits,
)
from lightning_mtkd.losses.relational import (
    ContrastiveMemory,
    CRDEmbed,
    crd_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
    shifted_negatives,
)

__all__ = [
    "CRDEmbed",
    "ContrastiveMemory",
    "attention_map",
    "attention_probability_loss",
    "attention_transfer_loss",
    "binary_soft_target_kd",
    "crd_loss",
    "dist_loss",
    "dkd_loss",
    "dkd_terms",
    "feature_distance",
    "shifted_negatives",
    "kl_loss",
    "logit_mse_loss",
    "masked_mean",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "rkd_loss",
    "sigmoid_mse_loss",
    "soft_target_kd",
    "standardize_logits",
    "token_feature_distance",
]
