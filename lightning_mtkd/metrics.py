"""Metrics torchmetrics does not have: angular errors of surface normals, and every task kind's metrics for
many tasks at once.

Pure functions first, thin ``Metric`` wrappers after (the torchmetrics pattern). Each metric
accumulates sums over the epoch, so it syncs across DDP processes like any torchmetrics metric.
:func:`task_statistics` and :func:`task_metric_values` are the maths of
:class:`~lightning_mtkd.bookkeeping.TaskGroupMetrics`: per-task counts and sums from stacked outputs, and
the metrics :meth:`Task.make_metrics` names from them, equal to torchmetrics' per task.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric


def angular_error(preds: Tensor, target: Tensor) -> Tensor:
    r"""Angle in degrees between predicted and true normals, vectors ``(N, 3)``.

    .. math:: \theta = \frac{180}{\pi} \arccos\big(\mathrm{clamp}(\hat n \cdot n / \|\hat n\|\|n\|, -1, 1)\big)

    as in the NYUv2 evaluation of MTAN (Liu et al., CVPR 2019) and Eigen & Fergus (ICCV 2015).

    Example:
        >>> preds, target = torch.tensor([[0.0, 0, 2], [1, 1, 0]]), torch.tensor([[0.0, 0, 1], [1, 0, 0]])
        >>> angular_error(preds, target)
        tensor([ 0., 45.])
    """
    cosine = (F.normalize(preds, dim=-1) * F.normalize(target, dim=-1)).sum(-1)
    return torch.rad2deg(torch.acos(cosine.clamp(-1.0, 1.0)))


class MeanAngularError(Metric):
    """Mean angular error (degrees) of surface normals over all valid pixels of the epoch."""

    higher_is_better = False
    full_state_update = False
    total: Tensor
    count: Tensor

    def __init__(self, **kwargs) -> None:  # noqa: ANN003 - torchmetrics options
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.total += angular_error(preds, target).sum(dtype=torch.float64)
        self.count += preds.shape[0]

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp_min(1)).float()


class WithinAngle(Metric):
    """Fraction of valid pixels whose normal is within ``threshold`` degrees of the truth (11.25°, 22.5°, 30°)."""

    higher_is_better = True
    full_state_update = False
    hits: Tensor
    count: Tensor

    def __init__(self, threshold: float = 11.25, **kwargs) -> None:  # noqa: ANN003 - torchmetrics options
        super().__init__(**kwargs)
        self.threshold = threshold
        self.add_state("hits", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.hits += (angular_error(preds, target) < self.threshold).sum()
        self.count += preds.shape[0]

    def compute(self) -> Tensor:
        return self.hits.float() / self.count.clamp_min(1)


# ---------------------------------------------------------------------------------- many tasks at once
#: The metrics of each task kind, by the names they are logged under (``Task.make_metrics`` has the same keys).
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("acc",),
    "multilabel": ("f1",),
    "regression": ("mae", "mse"),
    "segmentation": ("miou", "pixel_acc"),
    "depth": ("abs_err", "rel_err"),
    "normals": ("mean_angle", "within_11_25"),
}

#: MeanAbsolutePercentageError's floor on ``|target|`` (torchmetrics' value).
MAPE_EPSILON = 1.17e-06


def task_statistics(
    kind: str, preds: Tensor, target: Tensor, valid: Tensor, num_classes: int
) -> tuple[Tensor, Tensor | None]:
    r"""Sufficient statistics of ``T`` tasks of one kind from one batch, stacked: ``(counts, sums)``.

    ``preds`` are the tasks' outputs stacked ``(T, B, ...)`` (logits; classes on dimension 2), ``target``
    their labels shaped like one task's metric target, stacked, and ``valid`` marks present labels
    (same shape as ``target``). Missing labels add nothing. Counts are ``int64`` and sums ``float64``,
    summed over batches and over DDP processes; :func:`task_metric_values` turns them into metrics.
    Branch-free in the data: no host sync (boolean indexing, ``bincount``, ``.item()``), so it can run
    every step on a GPU.

    ======================  ============================================  =====================
    kind                    counts per task                               sums per task
    ======================  ============================================  =====================
    classification          ``[correct, present]``                        —
    multilabel              ``(L, 3)``: ``tp, fp, fn`` per label           —
    regression              ``[present]``                                 ``[Σ|e|, Σe²]``
    segmentation            ``(C, C)`` confusion matrix (true, predicted)  —
    depth                   ``[present]``                                 ``[Σ|e|, Σ|e|/|y|]``
    normals                 ``[pixels, pixels within 11.25°]``            ``[Σ angle]``
    ======================  ============================================  =====================

    Multilabel predictions are ``z > 0``, that is :math:`\sigma(z) > 0.5`; a normal counts when all three
    components are present (``valid`` reduced over dimension 2).
    """
    t = preds.shape[0]
    if kind == "classification":
        hit = (preds.argmax(2) == target) & valid
        return torch.stack([hit.reshape(t, -1).sum(1), valid.reshape(t, -1).sum(1)], 1), None
    if kind == "multilabel":
        predicted, positive, negative = preds > 0, (target == 1) & valid, (target == 0) & valid
        tp = (predicted & positive).sum(1)
        fp = (predicted & negative).sum(1)
        fn = (~predicted & positive).sum(1)
        return torch.stack([tp, fp, fn], -1), None
    if kind == "segmentation":
        cells = num_classes * num_classes
        predicted = preds.argmax(2)
        # One bin per (true, predicted) pair and task, plus a bin per task for missing pixels, filled by
        # scatter_add (bincount would read the largest index back to the host).
        index = torch.where(valid, target * num_classes + predicted, cells).reshape(t, -1)
        index = index + torch.arange(t, device=index.device).unsqueeze(1) * (cells + 1)
        flat = torch.zeros(t * (cells + 1), dtype=torch.long, device=index.device)
        flat.scatter_add_(0, index.reshape(-1), torch.ones_like(index.reshape(-1)))
        return flat.view(t, cells + 1)[:, :cells].reshape(t, num_classes, num_classes), None
    preds = preds.float()
    if kind == "normals":
        pixels = valid.all(2)
        safe = torch.where(pixels.unsqueeze(2), target, 1.0)
        angle = angular_error(preds.movedim(2, -1), safe.movedim(2, -1))
        within = (angle < 11.25) & pixels
        counts = torch.stack([pixels.reshape(t, -1).sum(1), within.reshape(t, -1).sum(1)], 1)
        sums = torch.where(pixels, angle, 0.0).reshape(t, -1).sum(1, dtype=torch.float64)
        return counts, sums.unsqueeze(1)
    error = torch.where(valid, preds - torch.where(valid, target, 0.0), 0.0).reshape(t, -1)
    counts = valid.reshape(t, -1).sum(1, keepdim=True)
    if kind == "depth":
        relative = error.abs() / torch.where(valid, target, 1.0).abs().clamp_min(MAPE_EPSILON).reshape(t, -1)
        sums = torch.stack([error.abs().sum(1, dtype=torch.float64), relative.sum(1, dtype=torch.float64)], 1)
        return counts, sums
    if kind == "regression":
        sums = torch.stack([error.abs().sum(1, dtype=torch.float64), error.square().sum(1, dtype=torch.float64)], 1)
        return counts, sums
    raise ValueError(f"unknown task kind {kind!r}")


def task_metric_values(
    kind: str, counts: Tensor, sums: Tensor | None, ignore_index: int | None = None
) -> dict[str, Tensor]:
    """Each task's metrics ``{name: (T,)}`` from its accumulated :func:`task_statistics`.

    The same numbers as torchmetrics' per-task metrics that :meth:`Task.make_metrics` builds, edge cases
    included: an accuracy or F1 over no label is 0, a mean error over none is NaN, mIoU averages the classes
    present in predictions or labels (not ``ignore_index``), F1 is the macro average over labels with 0 for a
    label never predicted nor present.
    """
    if kind == "classification":
        correct, present = counts.double().unbind(1)
        return {"acc": _ratio(correct, present, 0.0)}
    if kind == "multilabel":
        tp, fp, fn = counts.double().unbind(-1)
        return {"f1": _ratio(2 * tp, 2 * tp + fp + fn, 0.0).mean(1).float()}
    if kind == "segmentation":
        confusion = counts.double()
        tp = confusion.diagonal(dim1=1, dim2=2)
        per_class_total = confusion.sum(1) + confusion.sum(2)  # predicted + true
        iou = _ratio(tp, per_class_total - tp, 0.0)
        weights = (per_class_total > 0).double()
        if ignore_index is not None and 0 <= ignore_index < confusion.shape[1]:
            weights[:, ignore_index] = 0.0
        miou = (weights * iou).sum(1) / weights.sum(1)  # NaN when no class was seen, as torchmetrics
        return {"miou": miou.float(), "pixel_acc": _ratio(tp.sum(1), confusion.sum((1, 2)), 0.0)}
    assert sums is not None
    if kind == "normals":
        pixels, within = counts.double().unbind(1)
        return {
            "mean_angle": (sums[:, 0] / pixels.clamp_min(1)).float(),
            "within_11_25": (within / pixels.clamp_min(1)).float(),
        }
    present = counts[:, 0].double()
    first, second = (sums / present.unsqueeze(1)).float().unbind(1)  # NaN over no label, as torchmetrics
    return {"abs_err": first, "rel_err": second} if kind == "depth" else {"mae": first, "mse": second}


def _ratio(numerator: Tensor, denominator: Tensor, zero_division: float) -> Tensor:
    """``numerator / denominator`` as float32, ``zero_division`` where the denominator is 0."""
    safe = torch.where(denominator > 0, denominator, 1.0)
    return torch.where(denominator > 0, numerator / safe, zero_division).float()
