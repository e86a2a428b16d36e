"""Strategy 3 — multi-task transfer: one teacher's common features to small per-task students."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_mtkd.checkpoints import CLASS_KEY
from lightning_mtkd.config import class_path, to_config
from lightning_mtkd.models.students import TaskStudents
from lightning_mtkd.strategies.base import FeaturePair, HintDistance, MultiTaskModule
from lightning_mtkd.strategies.distillation import DistillationModule
from lightning_mtkd.strategies.step import CRD, as_distance
from lightning_mtkd.tasks import Task, as_tasks


class TransferDistiller(DistillationModule):
    r"""One multi-task teacher, one small student per task (or group of tasks), each deployable alone.

    The teacher's common feature :math:`f^t` and its task outputs are computed once per batch and
    shared by all students. Student :math:`s` (predicting tasks :math:`\mathcal{T}_s`) learns from
    labels, from the teacher's soft targets for its tasks, and from the teacher's common feature
    through its own adaptor :math:`A_s`:

    .. math::
        \mathcal{L} = \sum_s \Big[\sum_{t\in\mathcal{T}_s} w_t\big((1-\alpha)\,\mathcal{L}^{sup}_t
        + \alpha\,T^2\,\mathrm{KL}(\sigma(z^t_t/T)\,\|\,\sigma(z^s_t/T))\big)
        + \alpha\,\beta\, d\big(A_s(f^s), f^t\big)\Big]

    The students share no parameters, so the sum trains each one exactly as if it were distilled
    alone, in one ``fit`` and one teacher pass per batch. This is knowledge transfer from a
    multi-task teacher to task-specific students (Hinton et al., 2015 soft targets; a FitNets hint,
    Romero et al., ICLR 2015, on L2-normalised features as in Li & Bilen, ECCV-W 2020).

    The students live in a :class:`~lightning_mtkd.models.TaskStudents` (``module.model[name]``);
    the checkpoint holds them all, and :meth:`export_student` writes one as a standalone
    ``MultiTaskModule`` checkpoint, read back with :func:`load_student`.

    Args:
        student: ``{name: network}``: a network named after a task predicts that task (it may return a
            bare Tensor); list the tasks of a network that predicts several in ``groups``.
        teacher: The multi-task teacher: a module or a ``MultiTaskModule`` checkpoint path.
        tasks: The tasks; each must be predicted by exactly one student, and output by the teacher.
        groups: ``{student name: [tasks]}`` for students of several tasks.
        student_feature: Dotted path of the feature in each student (``None``: the input of its task heads,
            found by a dry run; ``"backbone"`` for a ``MultiTaskNet``).
        teacher_feature: Dotted path of the teacher's common feature (``None``: found likewise).
        hint_weight: ``β``, the feature term's weight (0 turns it and the adaptors off). The default 0.1
            is light because a small per-task student cannot afford to spend much of itself on imitating
            the teacher's whole shared feature: on MultiMNIST (``benchmarks/quality.py``, 3 seeds, 20 epochs,
            10.5K students) β = 1 closed 19% of the teacher–scratch gap, β = 0.1 29%, β = 0 30%.
        distance: How features are compared (:data:`~lightning_mtkd.strategies.step.HintDistance`): ``l2``,
            ``cosine``, ``l1``, ``cka``, ``rkd`` or ``crd`` (or :class:`~lightning_mtkd.strategies.step.CRD` settings).
        **kwargs: Everything else :class:`DistillationModule` takes (``temperature``, ``alpha``, ``adaptor_lr``, …).

    Example (YAML)::

        model:
          class_path: lightning_mtkd.TransferDistiller
          init_args:
            teacher: checkpoints/multimnist/teacher.ckpt
            student:
              left: {class_path: lightning_mtkd.models.MultiTaskNet, init_args: {..., heads: {left: 10}}}
              right: {class_path: lightning_mtkd.models.MultiTaskNet, init_args: {..., heads: {right: 10}}}
            tasks: [{name: left, num_classes: 10}, {name: right, num_classes: 10}]
    """

    requires_multitask_teacher = True

    def __init__(
        self,
        student: dict[str, nn.Module],
        teacher: nn.Module | str | None,
        tasks: list[Task],
        groups: dict[str, list[str]] | None = None,
        student_feature: str | None = None,
        teacher_feature: str | None = None,
        hint_weight: float = 0.1,
        distance: HintDistance | CRD = "l2",
        **kwargs: Any,
    ) -> None:
        if isinstance(student, nn.Module) or not isinstance(student, Mapping) or not student:
            raise TypeError(
                "TransferDistiller trains one student per task: pass `student` as a dict {task: network}, "
                "e.g. {'left': net_left, 'right': net_right}."
            )
        _check_students(list(as_tasks(tasks)), list(student), groups or {})
        super().__init__(TaskStudents(_built(student), groups), teacher, tasks, **kwargs)
        if hint_weight < 0:
            raise ValueError(f"hint_weight must be >= 0, got {hint_weight}.")
        self.student_feature = student_feature
        self.teacher_feature = teacher_feature
        self.hint_weight = hint_weight
        self.distance = as_distance(distance)

    @property
    def students(self) -> TaskStudents:
        """All students, by name (the module's ``model``)."""
        assert isinstance(self.model, TaskStudents)
        return self.model

    def student(self, name: str) -> nn.Module:
        """The network ``name`` alone (it runs without this module)."""
        if name not in self.students:
            raise KeyError(f"no student {name!r}; the students are {list(self.students)}.")
        return self.students[name]

    def feature_pairs(self) -> list[FeaturePair]:
        if self.hint_weight == 0:
            return []
        # One teacher feature for all students: the teacher runs once per batch.
        return [
            FeaturePair(
                f"hint/{name}",
                f"{name}.{self.student_feature}" if self.student_feature else None,
                self.teacher_feature,
                weight=self.hint_weight,
                distance=self.distance,
                student_root=name,
                adaptor=name,
            )
            for name in self.students
        ]

    def export_student(self, name: str, path: str | os.PathLike) -> str:
        """Write student ``name`` alone as a ``MultiTaskModule`` checkpoint (no teacher, no other student).

        The file loads with :func:`load_student` (or ``MultiTaskModule.load_from_checkpoint``) and can
        serve as a teacher checkpoint path. The student must be built from a recorded config (our
        models, or any model built by LightningCLI).
        """
        network = self.student(name)
        standalone = MultiTaskModule(network, [self.tasks[task] for task in self.students.tasks_of(name)])
        hparams = dict(standalone.hparams)
        recorded = to_config(network)
        if not isinstance(recorded, dict) or "init_args" not in recorded:
            raise ValueError(
                f"student {name!r} ({type(network).__name__}) does not record how it was built, so a standalone "
                "checkpoint could not rebuild it. Store its constructor arguments as attributes of the same names, "
                "derive it from lightning_mtkd.config.RecordsInitArgs (or build it from a config), or save "
                f"`module.student({name!r}).state_dict()` instead."
            )
        path = os.fspath(path)
        checkpoint = {
            "state_dict": standalone.state_dict(),
            "hyper_parameters": hparams,
            CLASS_KEY: class_path(standalone),
            "pytorch-lightning_version": L.__version__,
        }
        torch.save(checkpoint, path)
        return path


def _built(students: Mapping[str, Any]) -> dict[str, nn.Module]:
    """The students as modules (a reloaded checkpoint gives their recorded configs)."""
    from lightning_mtkd.checkpoints import as_module

    return {name: as_module(network, f"student[{name!r}]") for name, network in students.items()}


def load_student(path: str | os.PathLike) -> nn.Module:
    """A student exported by :meth:`TransferDistiller.export_student`, ready to run on its own."""
    return MultiTaskModule.load_from_checkpoint(os.fspath(path), map_location="cpu", weights_only=True).model


def _check_students(tasks: list[str], students: list[str], groups: Mapping[str, list[str]]) -> None:
    """Every task predicted by exactly one student; every student predicts tasks in ``tasks``."""
    owners: dict[str, list[str]] = {}
    for name in students:
        predicted = list(groups.get(name, [name]))
        unknown = [task for task in predicted if task not in tasks]
        if unknown:
            where = f"groups[{name!r}] lists" if name in groups else f"student {name!r} is named after"
            raise KeyError(
                f"{where} {unknown}, not a task in `tasks` {tasks}. Name each student after its task, or list the "
                f"tasks of a multi-task student in groups={{{name!r}: [...]}}."
            )
        for task in predicted:
            owners.setdefault(task, []).append(name)
    missing = [task for task in tasks if task not in owners]
    if missing:
        raise KeyError(
            f"no student for task(s) {missing}: the students are {students}. Add a student named after each "
            f"(student={{{missing[0]!r}: <network>, ...}}) or list it in a student's group (groups=...)."
        )
    shared = {task: names for task, names in owners.items() if len(names) > 1}
    if shared:
        raise KeyError(f"task(s) predicted by several students: {shared}; give each task to exactly one student.")
