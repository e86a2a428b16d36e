"""Strategy 6 — multi-task fusion distillation: several teachers fused into one target per task."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_mtkd.losses.functional import confidence_weights, masked_mean
from lightning_mtkd.models.deferred import FusionGate
from lightning_mtkd.strategies.base import ModelOutputs, Step
from lightning_mtkd.strategies.distillation import DistillationModule
from lightning_mtkd.tasks import Task
from lightning_mtkd.teachers import TEACHER

FusionMode = Literal["mean", "weights", "confidence", "learned"]


class FusionDistiller(DistillationModule):
    r"""Several teachers; for each task their outputs are fused into one target the student distils.

    For task :math:`t`, the teachers :math:`k \in K_t` that output it (a teacher that does not is
    left out of that task's fusion) are mixed with per-sample weights :math:`w_{kb}`
    (:math:`\sum_{k\in K_t} w_{kb} = 1`):

    .. math::
        \tilde p_{tb} = \sum_{k\in K_t} w_{kb}\,\sigma(z^k_{tb}/T), \qquad
        \mathcal{L} = \sum_t w_t\big[(1-\alpha)\,\mathcal{L}^{sup}_t
        + \alpha\,T^2\,\mathrm{KL}(\tilde p_t\,\|\,\sigma(z^s_t/T))\big]

    (a weighted mean of outputs for regression tasks). The weights, by ``fusion``:

    - ``mean``: :math:`1/|K_t|`;
    - ``weights``: fixed, one per teacher in the order of ``teacher``, renormalised over :math:`K_t`;
    - ``confidence``: :math:`w_{kb} = \frac{1}{|K_t|-1}\big(1 - \mathrm{softmax}_k(L_{kb})\big)` from each
      teacher's loss :math:`L_{kb}` on the true label, as in CA-MKD (Zhang, Chen & Wang,
      *Confidence-Aware Multi-Teacher Knowledge Distillation*, ICASSP 2022); uniform where a label is missing;
    - ``learned``: a per-task gate :math:`w_b = \mathrm{softmax}(G_t[z^1_{tb},\dots,z^K_{tb}])`, a linear
      layer over the teachers' outputs (initialised to the mean). It is trained to weight the teachers
      that are right, by minimising :math:`\sum_k w_{kb} L_{kb}` (term ``gate/<task>``, which reaches
      only the gate); the KD term uses its weights as constants, so the student cannot pull the
      target towards itself. Gates train in the adaptors' parameter group (``adaptor_lr``).

    The fused target is this strategy's :meth:`teacher_targets`, so the soft-target terms, the teacher
    metrics beside the student's (``val/<task>/teacher_acc``) and ``pseudo_label_missing`` all use it.
    The mean fusion weight of each teacher is logged per task and epoch as ``<stage>/<task>/fusion_<teacher>``.

    Args:
        student: The multi-task student.
        teacher: ``{name: module or checkpoint path}`` (multi-task or single-task teachers, any
            architectures); a single teacher is allowed (its fusion is the identity).
        tasks: The tasks; each must be output by at least one teacher.
        fusion: ``mean``, ``weights``, ``confidence`` or ``learned``.
        weights: The fixed weights (``fusion: weights``): one number >= 0 per teacher, in dict order.
        teacher_trust: Before fitting, score every teacher on the validation split and fuse, per task, only the
            teachers within a tolerance of the best (:class:`~lightning_mtkd.callbacks.TeacherTrust`, added
            unless the trainer has one): a teacher clearly worse on a task than another no longer pulls its
            fused target down. Not added with ``fusion="weights"`` (the weights already say whom to trust;
            add the callback yourself to combine both).
        **kwargs: Everything else :class:`DistillationModule` takes (``temperature``, ``alpha``, ``adaptor_lr``:
            the learned gates' learning rate, …).

    Example (YAML)::

        model:
          class_path: lightning_mtkd.FusionDistiller
          init_args:
            teacher: {multitask: checkpoints/multimnist/teacher.ckpt, left: checkpoints/multimnist/teacher_left.ckpt}
            student: {class_path: lightning_mtkd.models.MultiTaskNet, init_args: {...}}
            tasks: [{name: left, num_classes: 10}, {name: right, num_classes: 10}]
            fusion: confidence
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | str | dict[str, nn.Module | str | None] | None,
        tasks: list[Task],
        fusion: FusionMode = "mean",
        weights: list[float] | None = None,
        teacher_trust: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(student, teacher, tasks, **kwargs)
        # Fixed weights are the user's own trust in each teacher: not second-guessed unless the callback is added.
        self.teacher_trust = teacher_trust and fusion != "weights"
        if fusion not in ("mean", "weights", "confidence", "learned"):
            raise ValueError(f"unknown fusion {fusion!r}; use 'mean', 'weights', 'confidence' or 'learned'.")
        self.teacher_names = list(teacher) if isinstance(teacher, Mapping) else [TEACHER]
        self.fusion: FusionMode = fusion
        self.fixed_weights = _check_weights(fusion, weights, self.teacher_names)
        # Non-persistent: hyper-parameters rebuild it; indexing it per task (views) keeps the step free of
        # host-to-device copies.
        self.register_buffer("_fixed", torch.tensor(self.fixed_weights or [], dtype=torch.float), persistent=False)

    # ------------------------------------------------------------------------------ the strategy hooks
    def teacher_targets(self, step: Step) -> dict[str, Tensor]:
        """Per task, the fused target of the teachers that output it (the gate's own loss goes to ``step.terms``)."""
        targets = {}
        for name, task in self.tasks.items():
            names = self.covering_teachers(step.teachers, name)
            if not names:
                continue  # reported by the first batch's check
            if self.fixed_weights is not None and not any(
                self.fixed_weights[self.teacher_names.index(n)] for n in names
            ):
                raise ValueError(
                    f"task {name!r} is output only by teacher(s) {names}, whose fixed fusion weights are all 0; give "
                    "one of them a positive weight."
                )
            stacked = torch.stack([step.teachers[teacher].outputs[name] for teacher in names])
            weights, gate_loss = self.fusion_weights(name, names, stacked, step.labels[name])
            targets[name] = task.fuse_teacher_outputs(stacked, weights.detach(), self.temperature)
            if gate_loss is not None:
                step.terms[f"gate/{name}"] = gate_loss
            for mean, teacher in zip(weights.detach().mean(dim=1), names, strict=True):
                step.logs[f"{name}/fusion_{teacher}"] = mean
        return targets

    def configure_extra_modules(self, dry_run: Step) -> dict[str, nn.Module]:
        """One zero-initialised gate per task (``fusion: learned``), over the outputs of the teachers covering it."""
        if self.fusion != "learned":
            return {}
        gates: dict[str, nn.Module] = {}
        for name in self.tasks:
            names = self.covering_teachers(dry_run.teachers, name)
            if names:
                width = sum(dry_run.teachers[t].outputs[name][0].numel() for t in names)
                gates[name] = FusionGate(width, len(names))
        return gates

    # ------------------------------------------------------------------------------ which teachers, what weights
    def covering_teachers(self, teachers: Mapping[str, ModelOutputs], task: str) -> list[str]:
        """Names of the (trusted) teachers that output ``task``, in the order of ``teacher``."""
        trusted = self.trusted.get(task)
        return [
            name
            for name in self.teacher_names
            if name in teachers and task in teachers[name].outputs and (trusted is None or name in trusted)
        ]

    def fusion_weights(
        self, task: str, names: list[str], stacked: Tensor, target: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """Per-sample weights ``(K, B)`` of the teachers ``names`` (outputs ``stacked``, ``(K, B, ...)``) for
        ``task``, and the learned gate's own loss (``None`` for the other modes)."""
        k, batch = stacked.shape[:2]
        if self.fusion == "mean":
            return stacked.new_full((k, batch), 1.0 / k), None
        if self.fusion == "weights":
            all_fixed = self.get_buffer("_fixed")
            fixed = torch.stack([all_fixed[self.teacher_names.index(name)] for name in names])
            return (fixed / fixed.sum().clamp_min(torch.finfo(fixed.dtype).tiny)).unsqueeze(1).expand(k, batch), None
        spec = self.tasks[task]
        losses, present = zip(*(spec.per_sample_loss(output, target) for output in stacked), strict=True)
        teacher_losses = torch.stack(losses)
        if self.fusion == "confidence":
            return confidence_weights(teacher_losses, present[0]), None
        gate_logits = self.extras[task](stacked.transpose(0, 1).reshape(batch, -1))
        weights = torch.softmax(gate_logits, dim=1).transpose(0, 1)
        return weights, masked_mean((weights * teacher_losses).sum(0), present[0])


def _check_weights(fusion: str, weights: list[float] | None, teachers: list[str]) -> list[float] | None:
    if fusion != "weights":
        if weights is not None:
            raise ValueError(f"`weights` are only used with fusion='weights' (fusion is {fusion!r}); drop them.")
        return None
    if weights is None:
        raise ValueError(f"fusion='weights' needs `weights`: one number >= 0 per teacher, in the order {teachers}.")
    if len(weights) != len(teachers):
        raise ValueError(
            f"`weights` has {len(weights)} value(s) for {len(teachers)} teacher(s) {teachers}; give one per teacher, "
            "in that order."
        )
    bad = {name: w for name, w in zip(teachers, weights, strict=True) if not (math.isfinite(w) and w >= 0)}
    if bad:
        raise ValueError(f"fusion weights must be finite and >= 0; got {bad}.")
    if sum(weights) == 0:
        raise ValueError(f"fusion weights {weights} are all zero; give at least one teacher a positive weight.")
    return [float(w) for w in weights]
