"""Strategy 6 — multi-task fusion distillation: several teachers fused into one target per task."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtkd.losses.functional import confidence_weights, masked_mean
from lightning_mtkd.strategies.base import (
    TEACHER,
    DistillationModule,
    ModelOutputs,
    _save_config_hparams,
    teacher_config,
)
from lightning_mtkd.tasks import Task
from lightning_mtkd.weighting.base import Weighting

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

    The mean fusion weight of each teacher is logged per task and epoch as ``<stage>/<task>/fusion_<teacher>``;
    the teacher metrics beside the student's (``val/<task>/teacher_acc``) are those of the fused target.

    Args:
        student: The multi-task student.
        teacher: ``{name: module or checkpoint path}`` (multi-task or single-task teachers, any
            architectures); a single teacher is allowed (its fusion is the identity).
        tasks: The tasks; each must be output by at least one teacher.
        fusion: ``mean``, ``weights``, ``confidence`` or ``learned``.
        weights: The fixed weights (``fusion: weights``): one number >= 0 per teacher, in dict order.
        temperature: Soft-target temperature ``T``.
        alpha: Distillation share in [0, 1].
        adaptor_lr: The learned gates' learning rate (the optimizer's own if ``None``).

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
        temperature: float = 4.0,
        alpha: float = 0.5,
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
        if fusion not in ("mean", "weights", "confidence", "learned"):
            raise ValueError(f"unknown fusion {fusion!r}; use 'mean', 'weights', 'confidence' or 'learned'.")
        self.teacher_names = list(teacher) if isinstance(teacher, Mapping) else [TEACHER]
        self.fusion: FusionMode = fusion
        self.fixed_weights = _check_weights(fusion, weights, self.teacher_names)
        # Non-persistent: hyper-parameters rebuild it; indexing it per task (views) keeps the step free of
        # host-to-device copies.
        self.register_buffer("_fixed", torch.tensor(self.fixed_weights or [], dtype=torch.float), persistent=False)
        self.gates = nn.ModuleDict()
        self._fusion_log: dict[str, tuple[list[str], Tensor]] = {}
        self._fused: dict[str, Tensor] = {}

    # ------------------------------------------------------------------------------ which teachers, what weights
    def covering_teachers(self, teachers: Mapping[str, ModelOutputs], task: str) -> list[str]:
        """Names of the teachers that output ``task``, in the order of ``teacher``."""
        return [name for name in self.teacher_names if name in teachers and task in teachers[name].outputs]

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
        gate_logits = self.gates[task](stacked.transpose(0, 1).reshape(batch, -1))
        weights = torch.softmax(gate_logits, dim=1).transpose(0, 1)
        return weights, masked_mean((weights * teacher_losses).sum(0), present[0])

    # ------------------------------------------------------------------------------ the strategy hooks
    def check_teacher_outputs(self, teachers: Mapping[str, ModelOutputs]) -> None:
        super().check_teacher_outputs(teachers)  # every task has at least one teacher
        for task in self.tasks:
            names = self.covering_teachers(teachers, task)
            fixed = self.fixed_weights
            if fixed is not None and sum(fixed[self.teacher_names.index(n)] for n in names) == 0:
                raise ValueError(
                    f"task {task!r} is output only by teacher(s) {names}, whose fixed fusion weights are all 0; give "
                    "one of them a positive weight."
                )
        for name, out in teachers.items():
            if not any(task in out.outputs for task in self.tasks):
                raise KeyError(
                    f"teacher {name!r} outputs {list(out.outputs)}, none of the tasks {list(self.tasks)}: it would "
                    "teach nothing. Drop it, or name a single-task teacher after the task it was trained on."
                )

    def distillation_loss(
        self, student: ModelOutputs, teachers: dict[str, ModelOutputs], batch: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for name, task in self.tasks.items():
            names = self.covering_teachers(teachers, name)
            stacked = torch.stack([teachers[teacher].outputs[name] for teacher in names])
            weights, gate_loss = self.fusion_weights(name, names, stacked, batch["targets"][name])
            fused = task.fuse_teacher_outputs(stacked, weights.detach(), self.temperature)
            terms[f"kd/{name}"] = task.distillation_loss(student.outputs[name], fused, self.temperature)
            if gate_loss is not None:
                terms[f"gate/{name}"] = gate_loss
            self._fusion_log[name] = (names, weights.detach().mean(dim=1))
            self._fused[name] = fused
        return terms

    def _update_metrics(
        self,
        stage: str,
        student: ModelOutputs,
        teachers: dict[str, ModelOutputs],
        targets: Mapping[str, Tensor],
    ) -> None:
        # The teacher beside the student in the logs (`val/<task>/teacher_acc`) is the fused target.
        fused, self._fused = self._fused, {}
        super()._update_metrics(stage, student, {"fused": ModelOutputs(fused)} if fused else teachers, targets)

    def _log_terms(
        self,
        stage: str,
        loss: Tensor,
        task_losses: Mapping[str, Tensor],
        distill_terms: Mapping[str, Tensor],
        batch_size: int,
    ) -> None:
        super()._log_terms(stage, loss, task_losses, distill_terms, batch_size)
        logged = {
            f"{stage}/{task}/fusion_{teacher}": mean[i]
            for task, (names, mean) in self._fusion_log.items()
            for i, teacher in enumerate(names)
        }
        self._fusion_log = {}
        if logged:
            self.log_dict(logged, on_step=False, on_epoch=True, batch_size=batch_size)

    # ------------------------------------------------------------------------------ the learned gates
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.fusion != "learned" or not self._teacher_sources or all(t in self.gates for t in self.tasks):
            return
        example = self._example_input()
        teachers = self.teacher_forward({"input": example})
        for name in self.tasks:
            names = self.covering_teachers(teachers, name)
            if names and name not in self.gates:
                width = sum(teachers[t].outputs[name][0].numel() for t in names)
                self.gates[name] = _zero_gate(width, len(names)).to(example.device)

    def load_state_dict(self, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        # Gates are sized by a dry run when fitting; a state dict alone rebuilds any not built yet. Here, not in
        # on_load_checkpoint: ddp_spawn hands the trained weights back to the main process through a non-strict
        # load_state_dict, which would otherwise drop the learned gates without a word.
        for key, value in state_dict.items():
            task = key[len("gates.") : -len(".weight")]
            if key.startswith("gates.") and key.endswith(".weight") and task not in self.gates:
                self.gates[task] = _zero_gate(value.shape[1], value.shape[0]).to(value.device)
        return super().load_state_dict(state_dict, *args, **kwargs)

    def param_groups(self) -> list[dict[str, Any]]:
        groups = super().param_groups()
        if len(self.gates):
            group: dict[str, Any] = {"params": list(self.gates.parameters()), "name": "gates"}
            if self.adaptor_lr is not None:
                group["lr"] = self.adaptor_lr
            groups.append(group)
        return groups


def _zero_gate(in_features: int, teachers: int) -> nn.Linear:
    # Zero weights: the gate starts as the plain mean and learns to depart from it.
    gate = nn.Linear(in_features, teachers)
    nn.init.zeros_(gate.weight)
    nn.init.zeros_(gate.bias)
    return gate


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
