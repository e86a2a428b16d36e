"""Strategy 1 — multi-task shared distillation."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_mtkd.strategies.base import FeaturePair, HintDistance
from lightning_mtkd.strategies.distillation import DistillationModule
from lightning_mtkd.strategies.step import CRD, as_distance
from lightning_mtkd.tasks import Task


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

    The shared feature of each model is, unless a path is given, the input of its task heads, found
    by one dry run (:func:`~lightning_mtkd.models.hooks.find_shared_feature`): a ``MultiTaskNet``'s
    ``backbone``, a Hugging Face model's pooled output, any model whose heads read one tensor. Vectors,
    token sequences ``(B, L, D)`` (padding masked out) and conv maps are bridged alike.

    Args:
        student: The multi-task student.
        teacher: The multi-task teacher: a module or a lightning-mtkd checkpoint path.
        tasks: The tasks; the teacher must output every one.
        student_feature: Dotted path of the student's shared representation (``None``: found).
        teacher_feature: Dotted path of the teacher's shared representation (``None``: found).
        hint_weight: ``β``, the hint term's weight (0 turns the hint off).
        distance: How features are compared (:data:`~lightning_mtkd.strategies.step.HintDistance`): ``l2``,
            ``cosine``, ``l1``, ``cka``, ``rkd`` or ``crd`` (or :class:`~lightning_mtkd.strategies.step.CRD` settings).
        **kwargs: Everything else :class:`DistillationModule` takes (``temperature``, ``alpha``, ``optimizer``, …).

    Example (YAML)::

        model:
          class_path: lightning_mtkd.SharedDistiller
          init_args:
            teacher: checkpoints/multimnist/teacher.ckpt
            student: {class_path: lightning_mtkd.models.MultiTaskNet, init_args: {...}}
            tasks: [{name: left, num_classes: 10}, {name: right, num_classes: 10}]
            temperature: 4.0
            alpha: 0.9
    """

    requires_multitask_teacher = True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | str | None,
        tasks: list[Task],
        student_feature: str | None = None,
        teacher_feature: str | None = None,
        hint_weight: float = 1.0,
        distance: HintDistance | CRD = "l2",
        **kwargs: Any,
    ) -> None:
        super().__init__(student, teacher, tasks, **kwargs)
        if hint_weight < 0:
            raise ValueError(f"hint_weight must be >= 0, got {hint_weight}.")
        self.student_feature = student_feature
        self.teacher_feature = teacher_feature
        self.hint_weight = hint_weight
        self.distance = as_distance(distance)

    def feature_pairs(self) -> list[FeaturePair]:
        if self.hint_weight == 0:
            return []
        return [
            FeaturePair(
                "hint", self.student_feature, self.teacher_feature, weight=self.hint_weight, distance=self.distance
            )
        ]
