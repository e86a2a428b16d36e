"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018): learned per-task log-variances."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_mtkd.tasks import Task
from lightning_mtkd.weighting.base import Weighting


def uncertainty_weighted_loss(losses: Tensor, log_variances: Tensor) -> Tensor:
    r"""Homoscedastic-uncertainty weighting of per-task losses.

    .. math::
        \mathcal{L} = \sum_t \tfrac{1}{2} e^{-s_t}\, \mathcal{L}_t + \tfrac{1}{2} s_t,
        \qquad s_t = \log \sigma_t^2

    Kendall, Gal & Cipolla, *Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry
    and Semantics*, CVPR 2018 (eq. 7, in the log-variance form that is stable to learn, as in LibMTL).
    """
    return (0.5 * torch.exp(-log_variances) * losses + 0.5 * log_variances).sum()


class UncertaintyWeighting(Weighting):
    r"""Per-task weights :math:`\tfrac{1}{2}e^{-s_t}` learned with the network (Kendall et al., CVPR 2018).

    Each task's loss :math:`\mathcal{L}_t = (1-\alpha)\mathcal{L}^{sup}_t + \alpha\,\mathcal{L}^{KD}_t`
    is weighted by :func:`uncertainty_weighted_loss`; shared distillation terms are added with
    weight :math:`\alpha`. The log-variances :math:`s_t` are parameters: the module puts them in
    the optimizer (its ``"weighting"`` group) and in ``state_dict``. ``Task.weight`` is not used.

    Args:
        init_log_variance: Starting :math:`s_t` for every task (0: weight ½).

    YAML::

        weighting: {class_path: lightning_mtkd.weighting.UncertaintyWeighting}
    """

    def __init__(self, init_log_variance: float = 0.0) -> None:
        super().__init__()
        self.init_log_variance = float(init_log_variance)
        self.log_variance = nn.Parameter(torch.zeros(0))

    def setup_tasks(self, tasks: Mapping[str, Task]) -> None:
        super().setup_tasks(tasks)
        # One entry per task, in task order; sized here because the tasks are known only now.
        self.log_variance = nn.Parameter(torch.full((len(self.tasks),), self.init_log_variance))

    def combine(self, task_losses: Mapping[str, Tensor], distill_terms: Mapping[str, Tensor], alpha: float) -> Tensor:
        per_task, shared = self.task_terms(task_losses, distill_terms, alpha)
        losses = torch.stack([per_task[name] for name in self.tasks])
        return uncertainty_weighted_loss(losses, self.log_variance) + shared

    def current_weights(self) -> dict[str, Tensor]:
        weights = 0.5 * torch.exp(-self.log_variance.detach())
        return dict(zip(self.tasks, weights, strict=True))
