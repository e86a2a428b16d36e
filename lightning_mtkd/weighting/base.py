"""Task weighting: how named task and distillation terms become one loss.

Weighting is a plug-in family orthogonal to the distillation strategy (LibMTL's split of
architecture × weighting). Each plug-in is an ``nn.Module`` so its state (learned parameters,
loss histories) lives in ``state_dict`` and resumes with the checkpoint.

Distillation terms are named ``"{kind}/{task}"`` for per-task terms (``"kd/left"``) and
``"{kind}"`` for shared terms (``"hint"``); a per-task term takes its task's weight.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_mtkd.config import RecordsInitArgs
from lightning_mtkd.tasks import Task


def term_task(name: str) -> str | None:
    """The task a distillation term belongs to (``"kd/left"`` → ``"left"``), or ``None`` for shared terms."""
    _, _, task = name.partition("/")
    return task or None


class Weighting(RecordsInitArgs, nn.Module):
    """Base class: ``combine`` turns task losses and distillation terms into the total loss."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks: dict[str, Task] = {}

    def setup_tasks(self, tasks: Mapping[str, Task]) -> None:
        """Called once by the module with its tasks, before training."""
        self.tasks = dict(tasks)

    def combine(self, task_losses: Mapping[str, Tensor], distill_terms: Mapping[str, Tensor], alpha: float) -> Tensor:
        raise NotImplementedError

    def current_weights(self) -> dict[str, Tensor]:
        """Per-task weights to log (``{task: weight}``); empty if fixed."""
        return {}


class StaticWeighting(Weighting):
    r"""Fixed weights: :math:`\mathcal{L} = \sum_t w_t \big[(1-\alpha)\,\mathcal{L}^{sup}_t + \alpha\,
    \mathcal{L}^{KD}_t\big] + \alpha \sum_s \mathcal{L}^{KD}_s` with :math:`w_t` = ``Task.weight``
    and :math:`s` the shared terms (hints).

    Without a teacher (:class:`~lightning_mtkd.MultiTaskModule`) ``alpha`` is 0: a weighted sum of task losses.
    """

    def combine(self, task_losses: Mapping[str, Tensor], distill_terms: Mapping[str, Tensor], alpha: float) -> Tensor:
        total = torch.zeros((), device=next(iter(task_losses.values())).device)
        for name, loss in task_losses.items():
            total = total + (1 - alpha) * self.tasks[name].weight * loss
        for name, term in distill_terms.items():
            task = term_task(name)
            total = total + alpha * (self.tasks[task].weight if task in self.tasks else 1.0) * term
        return total
