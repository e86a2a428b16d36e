"""Strategy 4 — multi-task adaptive distillation."""

from __future__ import annotations

from typing import Any, cast

import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torchmetrics import MetricCollection

from lightning_mtkd.strategies.base import Step
from lightning_mtkd.strategies.distillation import DistillationModule
from lightning_mtkd.tasks import Task


def teacher_gap(student: Tensor, teacher: Tensor, higher_is_better: bool) -> Tensor:
    r"""How far the student lags the teacher on a validation metric, relative to the teacher's value.

    :math:`g = (m^t - m^s) / |m^t|` when higher is better (accuracy, F1), :math:`(m^s - m^t)/|m^t|` when
    lower is (MAE): positive while the student lags, 0 when it matches, negative when it is ahead.
    """
    difference = teacher - student if higher_is_better else student - teacher
    return difference / teacher.abs().clamp_min(1e-8)


def adaptive_kd_targets(gaps: Tensor, initial: Tensor, gap_temperature: float) -> Tensor:
    r"""Target KD weights from the per-task gaps: :math:`w^*_t = w^0_t \cdot K\,\mathrm{softmax}(g / \tau)_t`.

    Equal gaps keep the configured weights :math:`w^0`; a task that lags more than the others gets
    more, one that has caught up gets less, and the weights keep their total scale (``K`` tasks).
    """
    return initial * len(gaps) * torch.softmax(gaps / gap_temperature, dim=0)


class AdaptiveDistiller(DistillationModule):
    r"""Per-task soft-target KD whose weights follow the student–teacher gap on each task's validation metric.

    .. math::
        \mathcal{L} = \mathrm{weighting}\big(\{\mathcal{L}^{sup}_t\},\, \{\lambda_t\,
        T_t^2\,\mathrm{KL}(\sigma(z^t_t/T_t)\,\|\,\sigma(z^s_t/T_t))\}\big)

    After each validation epoch, per task :math:`t`, the gap :math:`g_t` between teacher and student on
    the task's primary metric (:func:`teacher_gap`; ``acc``, ``f1`` or ``mae``) gives a target
    :math:`\lambda^*_t` (:func:`adaptive_kd_targets`), approached with momentum and kept in bounds:

    .. math::
        \lambda_t \leftarrow \mathrm{clip}\big(m\,\lambda_t + (1-m)\,\lambda^*_t,\ \lambda_{min},\ \lambda_{max}\big)

    With ``adaptive_temperature`` the temperature follows the same factor,
    :math:`T_t = \mathrm{clip}(T\,\lambda_t/\lambda^0_t,\ T_{min},\ T_{max})`: a lagging task gets softer
    targets, which carry more of the teacher's similarity structure (Hinton et al., 2015).
    The gap-driven weighting follows the idea of weighting tasks by how far they are from a target
    (dynamic task prioritisation, Guo et al., ECCV 2018) with the teacher as the target.

    The weights :math:`\lambda_t` (and :math:`T_t`) are buffers, so checkpoints hold them, and are
    logged per task as ``val/<task>/kd_weight`` (``val/<task>/kd_temperature``). The supervised terms
    go through the ``weighting`` plug-in as in every strategy, so any plug-in composes with this.

    Args:
        student: The multi-task student.
        teacher: A module, a checkpoint path, or ``{name: module or path}`` (single-task teachers named after tasks).
        tasks: The tasks.
        kd_weights: Starting :math:`\lambda^0_t` per task (1 for tasks not given).
        momentum: :math:`m` in [0, 1): how much of the old weight each update keeps.
        gap_temperature: :math:`\tau` > 0: a relative gap of :math:`\tau` more than another task's
            weighs :math:`e` times as much.
        min_weight, max_weight: The bounds :math:`0 \le \lambda_{min} \le \lambda_{max}`.
        adaptive_temperature: Let each task's temperature follow its weight.
        min_temperature, max_temperature: Bounds of the adaptive temperature.
        **kwargs: Everything else :class:`DistillationModule` takes (``temperature``: the starting ``T``;
            ``alpha``, ``optimizer``, …).

    Example (YAML)::

        model:
          class_path: lightning_mtkd.AdaptiveDistiller
          init_args:
            teacher: checkpoints/multimnist/teacher.ckpt
            student: {class_path: lightning_mtkd.models.MultiTaskNet, init_args: {...}}
            tasks: [{name: left, num_classes: 10}, {name: right, num_classes: 10}]
            momentum: 0.5
            min_weight: 0.25
            max_weight: 4.0
    """

    initial_kd_weight: Tensor
    kd_weight: Tensor
    kd_temperature: Tensor

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | str | dict[str, nn.Module | str | None] | None,
        tasks: list[Task],
        kd_weights: dict[str, float] | None = None,
        momentum: float = 0.5,
        gap_temperature: float = 0.05,
        min_weight: float = 0.1,
        max_weight: float = 10.0,
        adaptive_temperature: bool = False,
        min_temperature: float = 1.0,
        max_temperature: float = 8.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(student, teacher, tasks, **kwargs)
        if min_weight < 0 or max_weight < 0:
            raise ValueError(f"KD weight bounds must be >= 0, got min_weight={min_weight}, max_weight={max_weight}.")
        if min_weight > max_weight:
            raise ValueError(f"min_weight={min_weight} is above max_weight={max_weight}; swap them.")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1) (1 would never update), got {momentum}.")
        if not gap_temperature > 0:
            raise ValueError(f"gap_temperature must be > 0, got {gap_temperature}.")
        if adaptive_temperature and not 0 < min_temperature <= self.temperature <= max_temperature:
            raise ValueError(
                "adaptive temperature needs 0 < min_temperature <= temperature <= max_temperature, got "
                f"{min_temperature}, {self.temperature}, {max_temperature}."
            )
        weights = dict(kd_weights or {})
        unknown = [name for name in weights if name not in self.tasks]
        if unknown:
            raise ValueError(f"kd_weights names unknown task(s) {unknown}; the tasks are {list(self.tasks)}.")
        initial = torch.tensor([float(weights.get(name, 1.0)) for name in self.tasks])
        if (initial < min_weight).any() or (initial > max_weight).any():
            raise ValueError(f"kd_weights {weights} must lie within the bounds [{min_weight}, {max_weight}].")
        self.momentum = float(momentum)
        self.gap_temperature = float(gap_temperature)
        self.weight_bounds = (float(min_weight), float(max_weight))
        self.adaptive_temperature = adaptive_temperature
        self.temperature_bounds = (float(min_temperature), float(max_temperature))
        self.register_buffer("initial_kd_weight", initial, persistent=False)
        self.register_buffer("kd_weight", initial.clone())
        self.register_buffer("kd_temperature", torch.full((len(self.tasks),), self.temperature))
        self._temperatures: dict[str, float] | None = None  # Python floats for the step; refreshed after updates
        self.register_load_state_dict_post_hook(_forget_temperatures)

    def distillation_loss(self, step: Step) -> dict[str, Tensor]:
        if self._temperatures is None:  # one host read per update, not per step
            self._temperatures = dict(zip(self.tasks, self.kd_temperature.tolist(), strict=True))
        weights = {name: self.kd_weight[index] for index, name in enumerate(self.tasks)}
        return self.soft_target_terms(step, temperatures=self._temperatures, weights=weights)

    def on_validation_epoch_end(self) -> None:
        # Only while fitting: the sanity check and a stand-alone `validate` must not move the weights.
        if self.trainer.sanity_checking or self.trainer.state.fn != TrainerFn.FITTING or not self.teachers.active:
            return
        student, teacher = [], []
        student_metrics: nn.ModuleDict = getattr(self, "val_metrics")  # noqa: B009 - set by name in the base
        teacher_metrics: nn.ModuleDict = getattr(self, "val_teacher_metrics")  # noqa: B009
        for name, task in self.tasks.items():
            metric = task.primary_metric
            ours = cast(MetricCollection, student_metrics[name])[metric]
            theirs = cast(MetricCollection, teacher_metrics[name])[metric]
            if not (ours.update_called and theirs.update_called):
                return  # no validation batch ran
            student.append(ours.compute())
            teacher.append(theirs.compute())
        self.update_kd_weights(torch.stack(student), torch.stack(teacher))
        for index, name in enumerate(self.tasks):
            self.log(f"val/{name}/kd_weight", self.kd_weight[index])
            if self.adaptive_temperature:
                self.log(f"val/{name}/kd_temperature", self.kd_temperature[index])

    def update_kd_weights(self, student: Tensor, teacher: Tensor) -> Tensor:
        """One update from the per-task validation metrics (in task order); returns the gaps."""
        higher = torch.tensor([task.higher_is_better for task in self.tasks.values()], device=student.device)
        gaps = torch.where(higher, teacher_gap(student, teacher, True), teacher_gap(student, teacher, False))
        target = adaptive_kd_targets(gaps.to(self.kd_weight), self.initial_kd_weight, self.gap_temperature)
        updated = (self.momentum * self.kd_weight + (1 - self.momentum) * target).clamp(*self.weight_bounds)
        self.kd_weight.copy_(updated)
        if self.adaptive_temperature:
            factor = self.kd_weight / self.initial_kd_weight.clamp_min(1e-8)
            self.kd_temperature.copy_((self.temperature * factor).clamp(*self.temperature_bounds))
        self._temperatures = None
        return gaps


def _forget_temperatures(module: nn.Module, _keys: Any) -> None:
    """A ``load_state_dict`` post-hook: the loaded temperatures replace the cached Python floats."""
    module._temperatures = None  # type: ignore[assignment]
