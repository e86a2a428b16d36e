"""Strategy 1 — multi-task shared distillation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtkd.losses.functional import FeatureDistance, feature_distance
from lightning_mtkd.strategies.base import (
    TEACHER,
    DistillationModule,
    ModelOutputs,
    _save_config_hparams,
    check_hint,
    teacher_config,
)
from lightning_mtkd.tasks import Task
from lightning_mtkd.weighting.base import Weighting


class SharedDistiller(DistillationModule):
    r"""One multi-task teacher, one multi-task student: soft targets per task plus a shared-feature hint.

    The teacher's general features, learned across tasks, train the student, which minimises all task
    losses at once:

    .. math::
        \mathcal{L} = \sum_t w_t\big[(1-\alpha)\,\mathrm{CE}(z^s_t, y_t) + \alpha\, T^2\,
        \mathrm{KL}(\sigma(z^t_t/T)\,\|\,\sigma(z^s_t/T))\big]
        + \alpha\,\beta\, d\big(A(f^s), f^t\big)

    with Hinton et al.'s soft targets (*Distilling the Knowledge in a Neural Network*, 2015) and a
    FitNets-style hint (Romero et al., ICLR 2015): a trainable adaptor :math:`A` (sized by a dry run)
    maps the student's shared feature :math:`f^s` to the teacher's :math:`f^t`, compared by
    ``distance`` on channel-normalised features (as in Li & Bilen, ECCV-W 2020). :math:`\beta` is
    ``hint_weight``; set it to 0 for plain multi-task KD.

    Args:
        student: The multi-task student.
        teacher: The multi-task teacher: a module or a ``MultiTaskModule`` checkpoint path.
        tasks: The tasks; the teacher must output every one.
        temperature: Soft-target temperature ``T``.
        alpha: Distillation share in [0, 1].
        student_feature: Dotted path of the student's shared representation.
        teacher_feature: Dotted path of the teacher's shared representation.
        hint_weight: ``β``, the hint term's weight (0 turns the hint off).
        distance: ``l2`` on normalised features, ``cosine`` or ``l1``.
        adaptor_lr: The adaptor's learning rate (the optimizer's own if ``None``).

    Example (YAML)::

        model:
          class_path: lightning_mtkd.SharedDistiller
          init_args:
            teacher: checkpoints/multimnist/teacher.ckpt
            student: {class_path: lightning_mtkd.models.MultiTaskNet, init_args: {...}}
            tasks: [{name: left, num_classes: 10}, {name: right, num_classes: 10}]
            temperature: 4.0
            alpha: 0.5
    """

    requires_multitask_teacher = True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | str | None,
        tasks: list[Task],
        temperature: float = 4.0,
        alpha: float = 0.5,
        student_feature: str | None = "backbone",
        teacher_feature: str | None = "backbone",
        hint_weight: float = 1.0,
        distance: FeatureDistance = "l2",
        adaptor_lr: float | None = None,
        weighting: Weighting | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        pseudo_label_missing: bool = False,
    ) -> None:
        super().__init__(
            student,
            teacher,
            tasks,
            temperature,
            alpha,
            adaptor_lr,
            weighting,
            optimizer,
            scheduler,
            pseudo_label_missing,
        )
        _save_config_hparams(self, {**locals(), "teacher": teacher_config(teacher)})
        check_hint(hint_weight, student_feature, teacher_feature)
        self.student_feature = student_feature
        self.teacher_feature = teacher_feature
        self.hint_weight = hint_weight
        self.distance: FeatureDistance = distance

    def adaptor_specs(self) -> dict[str, tuple[str, str, str]]:
        if self.hint_weight == 0:
            return {}
        assert self.student_feature is not None and self.teacher_feature is not None
        return {"hint": (self.student_feature, TEACHER, self.teacher_feature)}

    def distillation_loss(
        self, student: ModelOutputs, teachers: dict[str, ModelOutputs], batch: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        terms = self.soft_target_terms(student, teachers)
        if self.hint_weight > 0:
            assert self.student_feature is not None and self.teacher_feature is not None
            adapted = self.adaptors["hint"](student.features[self.student_feature])
            target = teachers[TEACHER].features[self.teacher_feature]
            terms["hint"] = self.hint_weight * feature_distance(adapted, target, self.distance)
        return terms
