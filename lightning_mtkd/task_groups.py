"""Losses of many tasks at once: tasks of one kind and width computed as one stacked batch.

A model with 40 binary attributes (CelebA) has 40 classification heads of width 2; computing their
supervised and soft-target losses one task at a time costs a few small kernels per task and step,
which dominates a small model's step. :class:`TaskGroups` groups the tasks that share kind, width and
missing-label value once, and computes each group's losses from its heads' outputs stacked into one
``(T, B, C)`` tensor: the same numbers as :meth:`Task.supervised_loss` and :meth:`Task.distillation_loss`
task by task (tested), a handful of kernels whatever ``T``. Kinds or settings it does not stack (dense
maps, a task's own KD loss or temperature) fall back to the task's own method.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mtkd.tasks import Task

#: Kinds whose losses are computed stacked (dense maps keep their per-task path).
STACKED_KINDS = ("classification", "multilabel", "regression")


class TaskGroups:
    """The tasks grouped by ``(kind, width, missing-label value)``, in the order of ``tasks``.

    Example:
        >>> tasks = {n: Task(n, num_classes=2) for n in ("smiling", "young", "male")}
        >>> groups = TaskGroups(tasks)
        >>> outputs = {n: torch.zeros(4, 2) for n in tasks}
        >>> labels = {n: torch.tensor([0, 1, 1, -100]) for n in tasks}
        >>> {n: round(v.item(), 4) for n, v in groups.supervised_losses(outputs, labels).items()}
        {'smiling': 0.6931, 'young': 0.6931, 'male': 0.6931}
    """

    def __init__(self, tasks: Mapping[str, Task]) -> None:
        self.tasks = dict(tasks)
        grouped: dict[tuple[str, int, str], list[str]] = {}
        for name, task in self.tasks.items():
            grouped.setdefault((task.kind, task.num_classes, repr(task.missing_value)), []).append(name)
        self.groups = list(grouped.values())

    def supervised_losses(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{task: Task.supervised_loss(output, target)}``, a group of tasks at a time."""
        losses: dict[str, Tensor] = {}
        for names in self.groups:
            stacked = self._stack(names, outputs, targets)
            if stacked is None:
                losses.update({n: self.tasks[n].supervised_loss(outputs[n], targets[n]) for n in names})
                continue
            values = stacked_supervised_loss(self.tasks[names[0]], *stacked)
            losses.update(zip(names, values.unbind(), strict=True))
        return losses

    def distillation_losses(
        self,
        student: Mapping[str, Tensor],
        teacher: Mapping[str, Tensor],
        temperature: float,
        kd_losses: Mapping[str, Any],
        labels: Mapping[str, Tensor],
    ) -> dict[str, Tensor]:
        """``{task: Task.distillation_loss(...)}`` for the tasks in ``teacher``; the default soft targets stacked."""
        losses: dict[str, Tensor] = {}
        for names in self.groups:
            present = [n for n in names if n in teacher]
            stackable = [n for n in present if n not in kd_losses]  # a task's own loss keeps its own path
            stacked = self._stack(stackable, student, teacher)
            if stacked is None:
                stackable = []
            else:
                values = stacked_distillation_loss(self.tasks[stackable[0]], *stacked, temperature)
                losses.update(zip(stackable, values.unbind(), strict=True))
            for n in present:
                if n not in losses:
                    task = self.tasks[n]
                    losses[n] = task.distillation_loss(
                        student[n], teacher[n], temperature, kd_losses.get(n), labels.get(n)
                    )
        return losses

    def _stack(
        self, names: list[str], a: Mapping[str, Tensor], b: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor] | None:
        """``(a, b)`` of the named tasks stacked on a new first axis, or ``None`` where stacking does not apply."""
        if len(names) < 2 or self.tasks[names[0]].kind not in STACKED_KINDS:
            return None
        first_a, first_b = a[names[0]], b[names[0]]
        if any(a[n].shape != first_a.shape or b[n].shape != first_b.shape for n in names):
            return None
        return torch.stack([a[n] for n in names]), torch.stack([b[n] for n in names])


def stacked_supervised_loss(task: Task, outputs: Tensor, targets: Tensor) -> Tensor:
    """``(T,)``: :meth:`Task.supervised_loss` of ``T`` tasks like ``task`` from outputs ``(T, B, ...)`` and targets."""
    if task.kind == "classification":
        ignore = int(task.missing_value)
        per = F.cross_entropy(outputs.flatten(0, 1), targets.flatten(0, 1), ignore_index=ignore, reduction="none")
        return per.view(targets.shape).sum(1) / (targets != ignore).sum(1).clamp_min(1)
    targets = targets.reshape(outputs.shape)  # a one-output regression head may come with (B,) targets
    present = ~torch.isnan(targets) if math.isnan(task.missing_value) else targets != task.missing_value
    if task.kind == "multilabel":
        per = F.binary_cross_entropy_with_logits(outputs, targets.masked_fill(~present, 0).float(), reduction="none")
    else:
        per = F.mse_loss(outputs, torch.where(present, targets, outputs.detach()), reduction="none")
    weights = present.to(per.dtype).flatten(1)
    return (per.flatten(1) * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def stacked_distillation_loss(task: Task, student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    r"""``(T,)``: the default :meth:`Task.distillation_loss` of ``T`` tasks like ``task``, outputs ``(T, B, ...)``.

    Classification: :math:`T^2 \cdot \mathrm{mean}_b\,\mathrm{KL}(\sigma(z^t/T)\,\|\,\sigma(z^s/T))` per task
    (Hinton et al., 2015); multilabel: the per-label Bernoulli KL; regression: MSE.
    """
    teacher = teacher.detach()
    if task.kind == "classification":
        log_p_student = F.log_softmax(student / temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
        kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)
        return kl.mean(dim=1) * temperature**2
    if task.kind == "multilabel":
        p_teacher = torch.sigmoid(teacher / temperature)
        cross = F.binary_cross_entropy_with_logits(student / temperature, p_teacher, reduction="none")
        entropy = F.binary_cross_entropy_with_logits(teacher / temperature, p_teacher, reduction="none")
        return (cross - entropy).flatten(1).mean(1) * temperature**2
    return (student - teacher.reshape(student.shape)).pow(2).flatten(1).mean(1)
