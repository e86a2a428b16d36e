"""Strategy 5 — multi-task attention distillation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtkd.losses.functional import AttentionLoss, attention_probability_loss, attention_transfer_loss
from lightning_mtkd.models.hooks import request_attention_weights, resolve_module
from lightning_mtkd.strategies.base import (
    TEACHER,
    DistillationModule,
    ModelOutputs,
    _save_config_hparams,
    teacher_config,
)
from lightning_mtkd.tasks import Task
from lightning_mtkd.weighting.base import Weighting

AttentionKind = Literal["map", "weights"]


@dataclass(frozen=True)
class AttentionPair:
    """One entry of the layer map: a student layer distilled from a teacher layer.

    Args:
        student: Dotted path of the student's layer.
        teacher: Dotted path of the teacher's layer.
        task: The task this pair serves (a teacher's task-specific branch), or ``None`` for shared maps.
    """

    student: str
    teacher: str
    task: str | None = None


class AttentionDistiller(DistillationModule):
    r"""The student learns where the teacher looks: attention maps per layer pair, plus soft targets per task.

    .. math::
        \mathcal{L} = \sum_t w_t\big[(1-\alpha)\,\mathcal{L}^{sup}_t + \alpha\, \mathcal{L}^{KD}_t
        + \alpha\,\beta \sum_{(i,j) \in P_t} d(a^s_i, a^t_j)\big] + \alpha\,\beta \sum_{(i,j) \in P} d(a^s_i, a^t_j)

    over the layer map's pairs :math:`(i, j)` — per task :math:`P_t` (``task`` set: a teacher's
    task-specific branch) or shared :math:`P` (they serve all tasks). The kind of a pair follows from
    its layers:

    - conv feature maps → attention transfer (Zagoruyko & Komodakis, *Paying More Attention to
      Attention*, ICLR 2017): :math:`a = \mathrm{vec}(\sum_c |A_c|^p)`, L2-normalised, compared by
      squared L2, spatial sizes matched by interpolation
      (:func:`~lightning_mtkd.losses.functional.attention_transfer_loss`); channel counts may differ,
      so no adaptor is needed;
    - ``nn.MultiheadAttention`` layers → their attention probabilities, read by a forward hook that asks
      the layer for per-head weights (outputs unchanged), compared by MiniLM's KL or TinyBERT's MSE
      (:func:`~lightning_mtkd.losses.functional.attention_probability_loss`); heads are averaged when
      the counts differ; the layer map says which teacher layer teaches which student layer when
      the depths differ.

    Terms are logged as ``attention`` (shared) and ``attention/<task>``; :math:`\beta` is ``attention_weight``.

    Args:
        student: The multi-task student.
        teacher: The multi-task teacher: a module or a ``MultiTaskModule`` checkpoint path.
        tasks: The tasks; the teacher must output every one.
        layers: The layer map, e.g. ``[{student: backbone.features.3, teacher: backbone.features.3}]``.
        attention_weight: :math:`\beta` (0 leaves plain soft-target KD).
        attention_loss: ``kl`` (MiniLM) or ``mse`` (TinyBERT), for transformer attention.
        p: The exponent of the attention-transfer map (2 in the paper).
        temperature: Soft-target temperature ``T``.
        alpha: Distillation share in [0, 1].

    Example (YAML)::

        model:
          class_path: lightning_mtkd.AttentionDistiller
          init_args:
            teacher: checkpoints/multimnist/teacher.ckpt
            student: {class_path: lightning_mtkd.models.MultiTaskNet, init_args: {...}}
            tasks: [{name: left, num_classes: 10}, {name: right, num_classes: 10}]
            layers:
              - {student: backbone.features.3, teacher: backbone.features.3}
              - {student: backbone.features.7, teacher: backbone.features.7}
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | str | None,
        tasks: list[Task],
        layers: list[AttentionPair],
        attention_weight: float = 1.0,
        attention_loss: AttentionLoss = "kl",
        p: float = 2.0,
        temperature: float = 4.0,
        alpha: float = 0.5,
        weighting: Weighting | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        pseudo_label_missing: bool = False,
    ) -> None:
        super().__init__(
            student, teacher, tasks, temperature, alpha, None, weighting, optimizer, scheduler, pseudo_label_missing
        )
        _save_config_hparams(self, {**locals(), "teacher": teacher_config(teacher)})
        pairs = [pair if isinstance(pair, AttentionPair) else AttentionPair(**pair) for pair in layers]
        if not pairs:
            raise ValueError("AttentionDistiller: `layers` is empty; give a {student: .., teacher: ..} pair.")
        for pair in pairs:
            if pair.task is not None and pair.task not in self.tasks:
                raise ValueError(
                    f"AttentionDistiller: layer pair {pair.student!r} → {pair.teacher!r} names task {pair.task!r}, "
                    f"but the tasks are {list(self.tasks)}; use one of them or leave `task` out for a shared map."
                )
        if attention_weight < 0:
            raise ValueError(f"attention_weight must be >= 0, got {attention_weight}.")
        if not p > 0:
            raise ValueError(f"p (the attention map's exponent) must be > 0, got {p}.")
        self.layers = pairs
        self.attention_weight = float(attention_weight)
        self.attention_loss: AttentionLoss = attention_loss
        self.p = float(p)
        self.kinds: list[AttentionKind] = []
        self.student_feature_paths = sorted({pair.student for pair in pairs})
        self.teacher_feature_paths = {TEACHER: sorted({pair.teacher for pair in pairs})}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if not self._teacher_sources:  # evaluating the student alone
            return
        self.kinds = [self._pair_kind(pair) for pair in self.layers]

    def _pair_kind(self, pair: AttentionPair) -> AttentionKind:
        """``weights`` for two attention layers (asking them for their weights), ``map`` for two other layers."""
        student = resolve_module(self.model, pair.student, owner="student")
        teacher = resolve_module(self.teacher, pair.teacher, owner="teacher")
        is_attention = (isinstance(student, nn.MultiheadAttention), isinstance(teacher, nn.MultiheadAttention))
        if is_attention[0] != is_attention[1]:
            raise ValueError(
                f"layer map: student {pair.student!r} ({type(student).__name__}) is paired with teacher "
                f"{pair.teacher!r} ({type(teacher).__name__}); pair nn.MultiheadAttention layers with each other "
                "(transformer attention) and conv layers with each other (attention transfer)."
            )
        if is_attention[0]:
            request_attention_weights(student)
            request_attention_weights(teacher)
            return "weights"
        return "map"

    def distillation_loss(
        self, student: ModelOutputs, teachers: dict[str, ModelOutputs], batch: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        terms = self.soft_target_terms(student, teachers)
        if self.attention_weight == 0:
            return terms
        teacher = teachers[TEACHER]
        sums: dict[str | None, Tensor] = {}
        for pair, kind in zip(self.layers, self.kinds, strict=True):
            s = _attention_input(student.features, pair.student, kind, "student")
            t = _attention_input(teacher.features, pair.teacher, kind, "teacher")
            if kind == "weights":
                loss = attention_probability_loss(s, t, self.attention_loss)
            else:
                loss = attention_transfer_loss(s, t, self.p)
            sums[pair.task] = sums[pair.task] + loss if pair.task in sums else loss
        for task, value in sums.items():
            terms["attention" if task is None else f"attention/{task}"] = self.attention_weight * value
        return terms


def _attention_input(features: Mapping[str, Any], path: str, kind: AttentionKind, who: str) -> Tensor:
    """The recorded attention of one layer, with a clear error when the layer yields none."""
    if path not in features:
        raise RuntimeError(
            f"{who} layer {path!r} recorded nothing in the forward pass: its forward hook never ran. Name a layer "
            "the model's forward actually calls."
        )
    value = features[path]
    if kind == "weights":
        weights = value[1] if isinstance(value, tuple) and len(value) == 2 else None
        if not isinstance(weights, Tensor) or weights.dim() != 4:
            raise ValueError(
                f"{who} attention layer {path!r} yielded no per-head attention weights (got {_describe(weights)}); "
                "call it batched (batch_first or (L, B, E) inputs) and not through a fused kernel that bypasses "
                "nn.MultiheadAttention.forward."
            )
        return weights
    if not isinstance(value, Tensor) or value.dim() != 4:
        raise ValueError(
            f"{who} layer {path!r} yields no attention map: attention transfer needs a conv feature map "
            f"(B, C, H, W), got {_describe(value)}. Name a convolutional stage, or an nn.MultiheadAttention layer."
        )
    return value


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, tuple):
        return f"a tuple ({', '.join(_describe(v) for v in value)})"
    return type(value).__name__
