"""Strategy 5 — multi-task attention distillation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from lightning_mtkd.inputs import padding_mask
from lightning_mtkd.losses.functional import AttentionLoss, attention_probability_loss, attention_transfer_loss
from lightning_mtkd.models.hooks import attention_kind, resolve_module
from lightning_mtkd.strategies.base import FeaturePair, Step
from lightning_mtkd.strategies.distillation import DistillationModule
from lightning_mtkd.tasks import Task
from lightning_mtkd.teachers import TEACHER

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
    - attention layers → their attention probabilities ``(B, heads, queries, keys)``, compared by MiniLM's
      KL or TinyBERT's MSE (:func:`~lightning_mtkd.losses.functional.attention_probability_loss`), with
      padded query tokens (the input's ``attention_mask``) left out; heads are averaged when the counts
      differ; the layer map says which teacher layer teaches which student layer when the depths differ.
      Read from ``nn.MultiheadAttention`` (asked for per-head weights; outputs unchanged), timm-style
      ViT attention (recomputed from its ``qkv`` projection) and Hugging Face attention modules loaded
      with ``attn_implementation="eager"`` (:mod:`lightning_mtkd.models.hooks`).

    Terms are logged as ``attention`` (shared) and ``attention/<task>``; :math:`\beta` is ``attention_weight``.

    Args:
        student: The multi-task student.
        teacher: The multi-task teacher: a module or a ``MultiTaskModule`` checkpoint path.
        tasks: The tasks; the teacher must output every one.
        layers: The layer map, e.g. ``[{student: backbone.features.3, teacher: backbone.features.3}]``.
            ``None`` (the default) maps them from the models themselves (:func:`default_layer_map`): every
            student attention layer to a teacher attention layer at the same relative depth, or, in conv
            nets, the last conv layer to the last conv layer.
        attention_weight: :math:`\beta` (0 leaves plain soft-target KD).
        attention_loss: ``kl`` (MiniLM) or ``mse`` (TinyBERT), for transformer attention.
        p: The exponent of the attention-transfer map (2 in the paper).
        **kwargs: Everything else :class:`DistillationModule` takes (``temperature``, ``alpha``, ``optimizer``, …).

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

    requires_multitask_teacher = True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | str | None,
        tasks: list[Task],
        layers: list[AttentionPair] | None = None,
        attention_weight: float = 1.0,
        attention_loss: AttentionLoss = "kl",
        p: float = 2.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(student, teacher, tasks, **kwargs)
        pairs = [pair if isinstance(pair, AttentionPair) else AttentionPair(**pair) for pair in layers or []]
        if layers is not None and not pairs:
            raise ValueError(
                "AttentionDistiller: `layers` is empty; give a {student: .., teacher: ..} pair, or leave it out to map "
                "the layers automatically."
            )
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

    def feature_pairs(self) -> list[FeaturePair]:
        """Each layer pair, read as attention weights (two attention layers) or as conv maps (two other layers)."""
        if not self.layers:
            self.layers = default_layer_map(self.model, self.teacher)
        self.kinds = [self._pair_kind(pair) for pair in self.layers]
        return [
            FeaturePair(
                f"attention/{pair.student}",
                pair.student,
                pair.teacher,
                adapt=False,
                attention=kind == "weights",
            )
            for pair, kind in zip(self.layers, self.kinds, strict=True)
        ]

    def _pair_kind(self, pair: AttentionPair) -> AttentionKind:
        student = resolve_module(self.model, pair.student, owner="student")
        teacher = resolve_module(self.teacher, pair.teacher, owner="teacher")
        is_attention = (attention_kind(student) is not None, attention_kind(teacher) is not None)
        if is_attention[0] != is_attention[1]:
            raise ValueError(
                f"layer map: student {pair.student!r} ({type(student).__name__}) is paired with teacher "
                f"{pair.teacher!r} ({type(teacher).__name__}); pair attention layers with each other "
                "(transformer attention) and conv layers with each other (attention transfer)."
            )
        return "weights" if is_attention[0] else "map"

    def distillation_loss(self, step: Step) -> dict[str, Tensor]:
        terms = self.soft_target_terms(step)
        if self.attention_weight == 0:
            return terms
        teacher = step.teachers[TEACHER]
        mask = padding_mask(step.inputs)
        sums: dict[str | None, Tensor] = {}
        for pair, kind in zip(self.layers, self.kinds, strict=True):
            s = _attention_input(step.student.features, pair.student, kind, "student")
            t = _attention_input(teacher.features, pair.teacher, kind, "teacher")
            if kind == "weights":
                query_mask = mask if mask is not None and mask.shape == (s.shape[0], s.shape[2]) else None
                loss = attention_probability_loss(s, t, self.attention_loss, query_mask)
            else:
                loss = attention_transfer_loss(s, t, self.p)
            sums[pair.task] = sums[pair.task] + loss if pair.task in sums else loss
        for task, value in sums.items():
            terms["attention" if task is None else f"attention/{task}"] = self.attention_weight * value
        return terms


def default_layer_map(student: nn.Module, teacher: nn.Module) -> list[AttentionPair]:
    r"""Pair layers by relative depth when no layer map is given.

    Attention layers (``nn.MultiheadAttention``, timm-style, Hugging Face): student layer :math:`i` of
    :math:`L_s` is taught by teacher layer :math:`\lceil (i+1) L_t / L_s \rceil - 1`, so the last layers
    meet (the uniform mapping of TinyBERT, Jiao et al. 2020). Without attention layers on both sides:
    the last ``nn.Conv2d`` of each, by attention transfer (Zagoruyko & Komodakis, 2017).
    """
    found = [
        _innermost([name for name, m in model.named_modules() if attention_kind(m) is not None])
        for model in (student, teacher)
    ]
    if all(found):
        students, teachers = found
        depth = [math.ceil((i + 1) * len(teachers) / len(students)) - 1 for i in range(len(students))]
        return [AttentionPair(path, teachers[j]) for path, j in zip(students, depth, strict=True)]
    convs = [[name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)] for model in (student, teacher)]
    if all(convs):
        return [AttentionPair(convs[0][-1], convs[1][-1])]
    raise ValueError(
        "AttentionDistiller: found no attention layers (nn.MultiheadAttention, timm-style, Hugging Face) or conv "
        "layers in both the student and the teacher to pair; give `layers`, e.g. "
        "[{student: <student layer path>, teacher: <teacher layer path>}]."
    )


def _innermost(paths: list[str]) -> list[str]:
    """The attention modules that hold no other: a Hugging Face layer's ``attention`` wraps ``attention.self``."""
    return [path for path in paths if not any(other.startswith(f"{path}.") for other in paths)]


def _attention_input(features: Mapping[str, Any], path: str, kind: AttentionKind, who: str) -> Tensor:
    """The recorded attention of one layer, with a clear error when the layer yields none."""
    if path not in features:
        raise RuntimeError(
            f"{who} layer {path!r} recorded nothing in the forward pass: its forward hook never ran. Name a layer "
            "the model's forward actually calls."
        )
    value = features[path]
    if kind == "map" and not (isinstance(value, Tensor) and value.dim() == 4):
        raise ValueError(
            f"{who} layer {path!r} yields no attention map: attention transfer needs a conv feature map "
            f"(B, C, H, W), got {_describe(value)}. Name a convolutional stage, or an attention layer."
        )
    return value


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, tuple):
        return f"a tuple ({', '.join(_describe(v) for v in value)})"
    return type(value).__name__
