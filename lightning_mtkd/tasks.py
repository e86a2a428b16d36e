"""Task specifications: what a head predicts, how it is trained, distilled and measured.

A :class:`Task` is the one place where a task's *kind* turns into behaviour: its supervised loss,
its knowledge-distillation loss, its metrics and the value that marks a missing label. Strategies
never branch on the kind themselves.

YAML (LightningCLI)::

    tasks:
      - {name: left, num_classes: 10}
      - {name: age, kind: regression, num_classes: 1, weight: 0.5}
      - {name: segmentation, kind: segmentation, num_classes: 13}
      - {name: depth, kind: depth, num_classes: 1}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanAbsoluteError, MeanAbsolutePercentageError, MeanSquaredError, Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex, MultilabelF1Score

from lightning_mtkd.losses import functional as LF
from lightning_mtkd.losses import logits as LL
from lightning_mtkd.metrics import MeanAngularError, WithinAngle, angular_error

TaskKind = Literal["classification", "multilabel", "regression", "segmentation", "depth", "normals"]

#: Kinds whose outputs are maps ``(B, C, H, W)``, one prediction per pixel.
DENSE_KINDS = ("segmentation", "depth", "normals")
#: Kinds with real-valued targets (missing = ``NaN``).
REAL_KINDS = ("regression", "depth", "normals")
#: Output channels a kind requires (``num_classes`` must match).
FIXED_CHANNELS = {"depth": 1, "normals": 3}

#: Label that marks a missing classification / multilabel target (PyTorch's own ignore index).
IGNORE_INDEX = -100

#: The logit distillation losses (:mod:`lightning_mtkd.losses.logits`): Hinton's soft targets ``kl``, the same on
#: standardised logits ``ls`` (Sun et al., CVPR 2024), decoupled KD ``dkd`` (Zhao et al., CVPR 2022) and ``dkd+ls``,
#: DIST's correlations ``dist`` (Huang et al., NeurIPS 2022), ``mse`` on outputs, ``l1`` and ``cosine`` for maps.
KDLoss = Literal["kl", "ls", "dkd", "dkd+ls", "dist", "mse", "l1", "cosine"]

#: The distillation losses each task kind accepts; the first is its default. Softmax losses need a class axis,
#: so multilabel heads (independent sigmoids) take the per-label Bernoulli KL or MSE, and real-valued heads the
#: distances that apply to values.
KD_LOSSES: dict[str, tuple[str, ...]] = {
    "classification": ("kl", "ls", "dkd", "dkd+ls", "dist", "mse"),
    "segmentation": ("kl", "ls", "dkd", "dkd+ls", "dist", "mse"),
    "multilabel": ("kl", "mse"),
    "regression": ("mse",),
    "depth": ("l1", "mse"),
    "normals": ("cosine", "mse"),
}


@dataclass(frozen=True)
class Task:
    """One prediction task of a multi-task model.

    Args:
        name: Key of the task in the batch's ``targets`` and in every model's output dict.
        kind: ``classification`` (integer labels, softmax head), ``multilabel`` (0/1 per label,
            sigmoid head), ``regression`` (real values), or a dense per-pixel kind with outputs
            ``(B, C, H, W)``: ``segmentation`` (labels ``(B, H, W)``; pixel cross-entropy; mIoU and
            pixel accuracy), ``depth`` (``(B, 1, H, W)``; L1 on valid pixels; absolute and relative
            error) or ``normals`` (``(B, 3, H, W)``; cosine loss; mean angular error and the share of
            pixels within 11.25°) — the three NYUv2 tasks of MTAN (Liu et al., CVPR 2019).
        num_classes: Classes (classification, segmentation), labels (multilabel), outputs (regression);
            1 for depth, 3 for normals.
        weight: The task's weight in the total loss (used by the weighting plug-in).
        ignore_value: Label value that marks a missing target. Defaults to ``-100`` for
            classification, multilabel and segmentation and ``NaN`` for regression, depth and normals
            (a normal is missing when any of its three components is).

    Example:
        >>> task = Task("digit", num_classes=10)
        >>> logits, labels = torch.zeros(4, 10), torch.tensor([1, 2, -100, 3])
        >>> round(task.supervised_loss(logits, labels).item(), 4)  # log(10); the -100 is masked
        2.3026
    """

    name: str
    kind: TaskKind = "classification"
    num_classes: int = 2
    weight: float = 1.0
    ignore_value: float | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or "." in self.name:
            raise ValueError(
                f"Task name {self.name!r} must be non-empty and contain no '/' or '.' (it is part of metric keys "
                "and module names)."
            )
        if self.kind not in ("classification", "multilabel", "regression", *DENSE_KINDS):
            raise ValueError(
                f"Task {self.name!r}: unknown kind {self.kind!r}; use 'classification', 'multilabel', 'regression', "
                "'segmentation', 'depth' or 'normals'."
            )
        if self.kind in FIXED_CHANNELS and self.num_classes != FIXED_CHANNELS[self.kind]:
            raise ValueError(
                f"Task {self.name!r}: a {self.kind} head outputs {FIXED_CHANNELS[self.kind]} channel(s); set "
                f"num_classes: {FIXED_CHANNELS[self.kind]} (got {self.num_classes})."
            )
        minimum = 2 if self.kind in ("classification", "segmentation") else 1
        if self.num_classes < minimum:
            raise ValueError(f"Task {self.name!r}: num_classes={self.num_classes} must be at least {minimum}.")
        if self.weight < 0 or not math.isfinite(self.weight):
            raise ValueError(f"Task {self.name!r}: weight={self.weight} must be a finite number >= 0.")

    # ----------------------------------------------------------------------------------- labels
    @property
    def missing_value(self) -> float:
        """The label value that marks a missing target."""
        if self.ignore_value is not None:
            return self.ignore_value
        return math.nan if self.kind in REAL_KINDS else IGNORE_INDEX

    def valid_mask(self, target: Tensor) -> Tensor:
        """Boolean mask of present labels, shaped like ``target``."""
        if math.isnan(self.missing_value):
            return ~torch.isnan(target)
        return target != self.missing_value

    def missing_targets(self, count: int, spatial: tuple[int, ...] = ()) -> Tensor:
        """``count`` missing labels: the targets of samples that carry none for this task.

        Samples of another task's data set get these when per-task batches are merged into one
        (:func:`lightning_mtkd.data.merge_task_batches`); ``spatial`` is the input's ``(H, W)``,
        which dense tasks' targets share.
        """
        one_label = self.kind in ("classification", "segmentation")
        shape: tuple[int, ...] = (count,) if one_label else (count, self.num_classes)
        shape = (*shape, *spatial) if self.kind in DENSE_KINDS else shape
        dtype = torch.float32 if self.kind in REAL_KINDS else torch.long
        value = self.missing_value if self.kind in REAL_KINDS else int(self.missing_value)
        return torch.full(shape, value, dtype=dtype)

    def check_target(self, output: Tensor, target: Tensor) -> None:
        """Raise a clear error if ``target`` cannot be a label for ``output`` (dtype, shape, range).

        It reads label values (a host sync), so the shared step calls it on the first batch only.
        """
        batch = output.shape[0]
        if self.kind in DENSE_KINDS:
            self._check_dense_target(output, target)
            return
        if self.kind == "classification":
            if target.is_floating_point() or target.dtype == torch.bool:
                raise TypeError(
                    f"Task {self.name!r}: classification labels must be integers (torch.long), got {target.dtype}. "
                    "Convert them with `.long()` in your dataset."
                )
            if target.shape != (batch,):
                raise ValueError(
                    f"Task {self.name!r}: expected labels of shape ({batch},) for outputs {tuple(output.shape)}, "
                    f"got {tuple(target.shape)}."
                )
            present = target[self.valid_mask(target)]
            if present.numel() and (present.min() < 0 or present.max() >= self.num_classes):
                raise ValueError(
                    f"Task {self.name!r}: labels must lie in [0, {self.num_classes - 1}] (or be {self.missing_value} "
                    f"when missing), found values in [{int(present.min())}, {int(present.max())}]. "
                    "Check num_classes or the dataset's labels."
                )
        else:
            allowed = [(batch, self.num_classes)] + ([(batch,)] if self.num_classes == 1 else [])
            if tuple(target.shape) not in allowed:
                raise ValueError(
                    f"Task {self.name!r}: expected targets of shape {allowed[0]}, got {tuple(target.shape)}."
                )
            if not target.is_floating_point() and self.kind == "regression":
                raise TypeError(f"Task {self.name!r}: regression targets must be floating point, got {target.dtype}.")
        if output.shape[-1] != self.num_classes or output.shape[0] != batch:
            raise ValueError(
                f"Task {self.name!r}: the model outputs shape {tuple(output.shape)}, but the task has "
                f"num_classes={self.num_classes}; make the head's width match."
            )

    def _check_dense_target(self, output: Tensor, target: Tensor) -> None:
        if output.dim() != 4 or output.shape[1] != self.num_classes:
            raise ValueError(
                f"Task {self.name!r}: a {self.kind} head must output maps (B, {self.num_classes}, H, W), got "
                f"{tuple(output.shape)}; use a dense model (e.g. lightning_mtkd.models.SegNet)."
            )
        batch, _, height, width = output.shape
        if self.kind == "segmentation":
            if target.is_floating_point() or target.dtype == torch.bool:
                raise TypeError(
                    f"Task {self.name!r}: segmentation labels must be integers (torch.long), got {target.dtype}."
                )
            expected: list[tuple[int, ...]] = [(batch, height, width)]
        else:
            if not target.is_floating_point():
                raise TypeError(f"Task {self.name!r}: {self.kind} targets must be floating point, got {target.dtype}.")
            expected = [(batch, self.num_classes, height, width)]
            if self.kind == "depth":  # a depth map may come without its channel dimension
                expected.append((batch, height, width))
        if tuple(target.shape) not in expected:
            raise ValueError(
                f"Task {self.name!r}: expected {self.kind} targets of shape {expected[0]} for outputs "
                f"{tuple(output.shape)}, got {tuple(target.shape)}; outputs and targets need the same resolution."
            )
        if self.kind == "segmentation":
            present = target[self.valid_mask(target)]
            if present.numel() and (present.min() < 0 or present.max() >= self.num_classes):
                raise ValueError(
                    f"Task {self.name!r}: pixel labels must lie in [0, {self.num_classes - 1}] (or be "
                    f"{self.missing_value} when missing), found values in [{int(present.min())}, {int(present.max())}]."
                )

    def _as_output_shape(self, output: Tensor, target: Tensor) -> Tensor:
        # A one-output regression head may come with (B,) targets, a depth head with (B, H, W).
        return target.reshape(output.shape) if self.kind not in ("classification", "segmentation") else target

    def _pixel_mask(self, target: Tensor) -> Tensor:
        """Normals: a pixel counts only when its whole vector is present, ``(B, H, W)``."""
        return self.valid_mask(target).all(dim=1)

    def pseudo_label(self, teacher_output: Tensor) -> Tensor:
        """The label a teacher's output stands for, shaped like this task's outputs.

        The class of highest logit for classification (per pixel for segmentation, classes on
        dimension 1); ``sigmoid(z) > 0.5`` — that is ``z > 0`` — per label for multilabel (as 0/1);
        the output itself for regression, depth and normals. Used by ``pseudo_label_missing``
        (:meth:`fill_missing`).
        """
        if self.kind in ("classification", "segmentation"):
            return teacher_output.argmax(dim=1)
        if self.kind == "multilabel":
            return (teacher_output > 0).long()  # sigmoid(z) > 0.5 without computing the sigmoid
        return teacher_output

    def fill_missing(self, target: Tensor, teacher_output: Tensor) -> Tensor:
        """``target`` with every missing entry replaced by the teacher's :meth:`pseudo_label`; present ones kept.

        Vectorised (one ``torch.where``, no host sync). A normal is replaced as a whole vector when any of
        its components is missing; a dense target may come without its channel dimension (depth).
        """
        pseudo = self.pseudo_label(teacher_output.detach()).reshape(target.shape).to(target.dtype)
        present = self._pixel_mask(target).unsqueeze(1) if self.kind == "normals" else self.valid_mask(target)
        return torch.where(present, target, pseudo)

    # ----------------------------------------------------------------------------------- losses
    def supervised_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean loss over the present labels; exactly 0 (not NaN) when every label is missing.

        Cross-entropy (classification; per pixel for segmentation), binary cross-entropy with logits
        (multilabel), MSE (regression), L1 over valid pixels (depth), ``1 - cos`` over valid pixels (normals).
        """
        if self.kind in ("classification", "segmentation"):
            # PyTorch's own ignore_index: half the ops of masking by hand, which adds up over tens of tasks.
            ignore = int(self.missing_value)
            total = F.cross_entropy(output, target, ignore_index=ignore, reduction="sum")
            return total / (target != ignore).sum().clamp_min(1)
        return LF.masked_mean(*self._elementwise_loss(output, target))

    def _elementwise_loss(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss, present)`` per label (per sample, label or pixel); missing labels give finite values, masked."""
        target = self._as_output_shape(output, target)
        mask = self.valid_mask(target)
        if self.kind == "normals":  # per pixel: a normal counts when its whole vector is present
            mask = self._pixel_mask(target)
            return LF.cosine_distance(output, torch.where(mask.unsqueeze(1), target, 1.0)), mask
        if self.kind == "depth":
            return (output - torch.where(mask, target, output.detach())).abs(), mask
        if self.kind in ("classification", "segmentation"):
            per = F.cross_entropy(output, target.masked_fill(~mask, 0), reduction="none")
        elif self.kind == "multilabel":
            per = F.binary_cross_entropy_with_logits(output, target.masked_fill(~mask, 0).float(), reduction="none")
        else:
            per = F.mse_loss(output, torch.where(mask, target, output.detach()), reduction="none")
        return per, mask

    def distillation_loss(
        self,
        student: Tensor,
        teacher: Tensor,
        temperature: float,
        loss: KDLoss | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """The distillation loss between student and teacher outputs of this task.

        ``loss`` names it (:data:`KD_LOSSES` lists what each kind accepts; ``None``: the kind's first, its
        natural soft-target loss). ``labels`` are needed by ``dkd`` only (the target class; missing labels
        are left out), and unused otherwise. The formulas and papers are in :mod:`lightning_mtkd.losses.logits`.
        """
        name = loss or KD_LOSSES[self.kind][0]
        return self._distillation_loss(name, student, teacher, temperature, labels)

    def _distillation_loss(
        self, loss: str, student: Tensor, teacher: Tensor, temperature: float, labels: Tensor | None
    ) -> Tensor:
        if loss in ("dkd", "dkd+ls"):
            if labels is None:
                raise ValueError(f"Task {self.name!r}: the dkd distillation loss needs the batch's labels.")
            return LL.dkd_loss(student, teacher, labels, temperature=temperature, standardize=loss == "dkd+ls")
        if loss in ("kl", "ls") and self.kind in ("classification", "segmentation"):  # per pixel for segmentation
            return LL.kl_loss(student, teacher, temperature, standardize=loss == "ls")
        if loss == "kl":  # multilabel: per-label Bernoulli KL
            return LF.binary_soft_target_kd(student, teacher, temperature)
        if loss == "dist":
            return LL.dist_loss(student, teacher, temperature=temperature)
        if loss == "l1":
            return F.l1_loss(student, teacher)
        if loss == "cosine":
            return LF.cosine_distance_map(student, teacher)
        return LL.logit_mse_loss(student, teacher.reshape(student.shape))

    def check_kd_loss(self, loss: str | None) -> None:
        """Raise a clear error if ``loss`` is not a distillation loss for this task's kind."""
        if loss is not None and loss not in KD_LOSSES[self.kind]:
            raise ValueError(
                f"Task {self.name!r} ({self.kind}): kd_loss {loss!r} does not apply; a {self.kind} task takes "
                f"{list(KD_LOSSES[self.kind])} (the first is its default)."
            )

    # ----------------------------------------------------------------------------------- metrics
    @property
    def primary_metric(self) -> str:
        """Name of the metric that summarises the task (reports, adaptive weights)."""
        return {
            "classification": "acc",
            "multilabel": "f1",
            "regression": "mae",
            "segmentation": "miou",
            "depth": "abs_err",
            "normals": "mean_angle",
        }[self.kind]

    @property
    def higher_is_better(self) -> bool:
        return self.kind not in REAL_KINDS

    def make_metrics(self) -> dict[str, Metric]:
        """Fresh torchmetrics objects for one stage; they skip missing labels."""
        ignore = int(self.missing_value) if self.kind not in REAL_KINDS else None
        if self.kind == "segmentation":
            return {
                "miou": MulticlassJaccardIndex(self.num_classes, average="macro", ignore_index=ignore),
                "pixel_acc": MulticlassAccuracy(self.num_classes, average="micro", ignore_index=ignore),
            }
        if self.kind == "depth":
            return {"abs_err": MeanAbsoluteError(), "rel_err": MeanAbsolutePercentageError()}
        if self.kind == "normals":
            return {"mean_angle": MeanAngularError(), "within_11_25": WithinAngle(11.25)}
        if self.kind == "classification":
            return {"acc": MulticlassAccuracy(self.num_classes, average="micro", ignore_index=ignore)}
        if self.kind == "multilabel":
            return {"f1": MultilabelF1Score(self.num_classes, ignore_index=ignore)}
        return {"mae": MeanAbsoluteError(), "mse": MeanSquaredError()}

    def metric_inputs(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(preds, target)`` for this task's metrics, with missing real-valued targets dropped.

        Normals come as ``(pixels, 3)`` vectors of the valid pixels.
        """
        target = self._as_output_shape(output, target)
        if self.kind == "normals":
            mask = self._pixel_mask(target)
            return output.movedim(1, -1)[mask], target.movedim(1, -1)[mask]
        if self.kind not in REAL_KINDS:
            return output, target
        mask = self.valid_mask(target)
        return output[mask], target[mask]

    def per_sample_loss(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(loss, present)``, both ``(B,)``: each sample's supervised loss (mean over its present labels
        or pixels) and whether it has any label. Used to judge teachers per sample (confidence-weighted fusion)."""
        return _sample_means(*self._elementwise_loss(output, target))

    def per_sample_score(self, output: Tensor, target: Tensor) -> Tensor:
        """``(B,)``: each sample's share of the primary metric, in its direction (NaN: the sample has no label).

        Its mean over samples is the primary metric for ``acc`` (1 right, 0 wrong) and ``mae`` (the absolute
        error). For metrics that do not split into samples it is the per-sample measure closest to them:
        multi-label, the share of the sample's labels predicted right (F1 is not a mean over samples);
        segmentation, the image's pixel accuracy (for mIoU); depth and normals, the image's mean absolute error
        and mean angular error (degrees) over its labelled pixels. Teacher trust reads its spread (the standard
        error of paired differences between teachers).

        Example:
            >>> Task("digit", num_classes=3).per_sample_score(torch.eye(3), torch.tensor([0, 2, -100])).tolist()
            [1.0, 0.0, nan]
        """
        target = self._as_output_shape(output, target)
        if self.kind == "normals":
            present = self._pixel_mask(target)
            per = angular_error(output.movedim(1, -1), torch.where(present.unsqueeze(1), target, 1.0).movedim(1, -1))
        elif self.kind in ("classification", "segmentation"):
            present = self.valid_mask(target)
            per = (output.argmax(1) == target).float()
        elif self.kind == "multilabel":
            present = self.valid_mask(target)
            per = ((output > 0) == (target > 0.5)).float()
        else:
            present = self.valid_mask(target)
            per = (output - torch.where(present, target, output.detach())).abs().float()
        score, labelled = _sample_means(per, present)
        return torch.where(labelled, score, torch.nan)

    def fuse_teacher_outputs(self, outputs: Tensor, weights: Tensor, temperature: float) -> Tensor:
        """One target from ``K`` teachers' outputs ``(K, B, ...)`` with per-sample weights ``(K, B)``.

        A mixture of the soft targets at ``temperature`` for classification (per pixel for
        segmentation) and multilabel tasks (returned as logits, ready for :meth:`distillation_loss`), a
        weighted mean for regression, depth and normals.
        """
        if self.kind in ("classification", "segmentation"):
            return LF.fuse_soft_targets(outputs, weights, temperature)
        if self.kind == "multilabel":
            return LF.fuse_binary_soft_targets(outputs, weights, temperature)
        return (weights.reshape(*weights.shape, *([1] * (outputs.dim() - 2))) * outputs).sum(0)


def _sample_means(values: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean, labelled)``, both ``(B,)``: each sample's mean of ``values`` over its present labels or pixels
    (0 where it has none), and whether it has any. ``values`` must be finite where labels are missing."""
    batch = values.shape[0]
    values, mask = values.reshape(batch, -1), present.reshape(batch, -1).to(values.dtype)
    return (values * mask).sum(1) / mask.sum(1).clamp_min(1.0), mask.sum(1) > 0


def as_tasks(tasks: list[Task] | list[dict] | tuple) -> dict[str, Task]:
    """Normalise a task list (objects or YAML dicts) into an ordered ``{name: Task}`` dict."""
    result: dict[str, Task] = {}
    for task in tasks:
        task = task if isinstance(task, Task) else Task(**task)
        if task.name in result:
            raise ValueError(f"Task {task.name!r} is listed twice in `tasks`; task names must be unique.")
        result[task.name] = task
    if not result:
        raise ValueError("`tasks` is empty: give at least one Task(name=..., num_classes=...).")
    return result
