"""Strategy 2 — multi-task distinct distillation: one teacher per task."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_mtkd.strategies.base import FeaturePair, HintDistance
from lightning_mtkd.strategies.distillation import DistillationModule
from lightning_mtkd.strategies.step import CRD, as_distance
from lightning_mtkd.tasks import Task


class TaskSpecificDistiller(DistillationModule):
    r"""Each task has its own teacher; one multi-task student learns every task from its teacher.

    For each task :math:`t` with teacher :math:`\tau(t)`, a small trainable adaptor :math:`A_t`
    maps the student's shared feature :math:`f^s` into that teacher's feature space, and the
    student minimises

    .. math::
        \mathcal{L} = \sum_t w_t\Big[(1-\alpha)\,\mathcal{L}^{sup}_t + \alpha\big(T^2\,
        \mathrm{KL}(\sigma(z^{\tau(t)}_t/T)\,\|\,\sigma(z^s_t/T)) + \beta\, d(A_t(f^s), f^{\tau(t)})\big)\Big]

    where :math:`d` compares channel-wise L2-normalised features (``l2`` by default, ``l1`` or
    ``cosine``), as in Li & Bilen, *Knowledge Distillation for Multi-task Learning* (ECCV-W 2020),
    and its follow-up *Universal Representations* (Li, Liu & Bilen, 2021); the soft-target term is
    Hinton et al. (2015). The adaptors are sized by a dry run, so teachers may differ in
    architecture and feature width, and they train in their own parameter group (``adaptor_lr``).
    Terms are per task: ``kd/<task>`` and ``feat/<task>``, logged as ``train/<task>/kd`` and
    ``train/<task>/feat``.

    Args:
        student: The multi-task student.
        teacher: ``{name: module or checkpoint path}``. A teacher named after a task teaches that task
            (a single-task teacher may return a bare Tensor); other teachers (e.g. a multi-task one)
            teach the tasks that ``task_teachers`` maps to them.
        tasks: The tasks; each needs a teacher.
        task_teachers: ``{task: teacher name}`` for tasks whose teacher is not named after them.
        student_feature: Dotted path of the student's shared representation (``None``: the input of its
            task heads, found by a dry run).
        teacher_feature: Dotted path of the feature in each teacher: one path for all, or
            ``{teacher name: path}`` (teachers of different architectures); ``None``: found in each.
        feature_weight: ``β``, weight of the feature term (0 turns it and the adaptors off). The default
            0.1 is light because the one shared student feature is pulled towards several teachers at
            once: on MultiMNIST (``benchmarks/quality.py``, 3 seeds, 20-epoch students) β = 1 closed 15%
            of the teacher–scratch gap, β = 0 23%, β = 0.1 34%.
        distance: How features are compared (:data:`~lightning_mtkd.strategies.step.HintDistance`): ``l2``,
            ``cosine``, ``l1``, ``cka``, ``rkd`` or ``crd`` (or :class:`~lightning_mtkd.strategies.step.CRD` settings).
        teacher_trust: Before fitting, score every teacher on the validation split and distil each task from
            the best teacher that outputs it (:class:`~lightning_mtkd.callbacks.TeacherTrust`, added unless the
            trainer has one). With it, ``teacher`` may hold candidates that teach no task by default, e.g. the
            multi-task teacher next to the single-task ones: a task whose own teacher is clearly worse on it
            (beyond two standard errors on the validation split) learns from the best candidate instead. With
            one teacher per task, or no clearly worse teacher, it changes nothing.
        **kwargs: Everything else :class:`DistillationModule` takes (``temperature``, ``alpha``, ``adaptor_lr``, …).

    Example (YAML)::

        model:
          class_path: lightning_mtkd.TaskSpecificDistiller
          init_args:
            teacher: {left: checkpoints/multimnist/teacher_left.ckpt, right: checkpoints/multimnist/teacher_right.ckpt}
            student: {class_path: lightning_mtkd.models.MultiTaskNet, init_args: {...}}
            tasks: [{name: left, num_classes: 10}, {name: right, num_classes: 10}]
            adaptor_lr: 0.01
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: dict[str, nn.Module | str | None],
        tasks: list[Task],
        task_teachers: dict[str, str] | None = None,
        student_feature: str | None = None,
        teacher_feature: str | dict[str, str] | None = None,
        feature_weight: float = 0.1,
        distance: HintDistance | CRD = "l2",
        teacher_trust: bool = True,
        **kwargs: Any,
    ) -> None:
        if not isinstance(teacher, Mapping):
            raise TypeError(
                "TaskSpecificDistiller needs one teacher per task: pass `teacher` as a dict {task: module or "
                "checkpoint path}, e.g. {'left': 'teacher_left.ckpt', 'right': 'teacher_right.ckpt'}."
            )
        super().__init__(student, teacher, tasks, **kwargs)
        if feature_weight < 0:
            raise ValueError(f"feature_weight must be >= 0, got {feature_weight}.")
        self.teacher_trust = teacher_trust
        self.task_teachers = _assign_teachers(list(self.tasks), list(teacher), task_teachers or {}, teacher_trust)
        if isinstance(teacher_feature, Mapping):
            missing = sorted({t for t in self.task_teachers.values() if t not in teacher_feature})
            if feature_weight > 0 and missing:
                raise KeyError(
                    f"teacher_feature has no path for teacher(s) {missing} (it has {list(teacher_feature)}); give "
                    "every teacher a feature path, or one path for all."
                )
        self.student_feature = student_feature
        self.teacher_feature = teacher_feature
        self.feature_weight = feature_weight
        self.distance = as_distance(distance)

    def feature_path(self, teacher: str) -> str | None:
        """The feature path read in ``teacher`` (``None``: the input of its task heads)."""
        return self.teacher_feature.get(teacher) if isinstance(self.teacher_feature, Mapping) else self.teacher_feature

    def feature_pairs(self) -> list[FeaturePair]:
        if self.feature_weight == 0:
            return []
        return [
            FeaturePair(
                f"feat/{task}",
                self.student_feature,
                self.feature_path(teacher),
                teacher=teacher,
                weight=self.feature_weight,
                distance=self.distance,
                adaptor=task,
            )
            for task, teacher in self.task_teachers.items()
        ]


def _assign_teachers(
    tasks: list[str], teachers: list[str], explicit: Mapping[str, str], candidates: bool = False
) -> dict[str, str]:
    """``{task: teacher name}``: the explicit mapping, else the teacher named after the task; clear errors."""
    for task, teacher in explicit.items():
        if task not in tasks:
            raise KeyError(f"task_teachers names task {task!r}, which is not in `tasks` {tasks}.")
        if teacher not in teachers:
            raise KeyError(f"task_teachers maps {task!r} to teacher {teacher!r}, but the teachers are {teachers}.")
    assigned = {task: explicit.get(task, task) for task in tasks}
    orphans = [task for task, teacher in assigned.items() if teacher not in teachers]
    if orphans:
        raise KeyError(
            f"no teacher for task(s) {orphans}: the teachers are {teachers}. Add a teacher named after each task "
            f"(teacher={{{orphans[0]!r}: 'path/to/teacher.ckpt', ...}}) or map it with task_teachers="
            f"{{{orphans[0]!r}: '<teacher name>'}}."
        )
    unused = [teacher for teacher in teachers if teacher not in assigned.values()]
    if unused and not candidates:
        raise KeyError(
            f"teacher(s) {unused} teach no task: {unused[0]!r} is not a task in `tasks` {tasks} and no task is "
            f"mapped to it. Name each teacher after the task it teaches, map tasks to it with "
            f"task_teachers={{'<task>': {unused[0]!r}}}, drop it, or keep it as a candidate with teacher_trust=True."
        )
    return assigned
