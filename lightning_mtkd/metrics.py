"""Metrics torchmetrics does not have: angular errors of surface normals.

Pure functions first, thin ``Metric`` wrappers after (the torchmetrics pattern). Each metric
accumulates sums over the epoch, so it syncs across DDP processes like any torchmetrics metric.
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
