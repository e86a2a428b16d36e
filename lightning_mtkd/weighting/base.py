"""Task weighting: how named task and distillation terms become one loss.

Weighting is a plug-in family orthogonal to the distillation strategy (LibMTL's split of
architecture × weighting). Each plug-in is an ``nn.Module`` so its state (learned parameters,
loss histories) lives in ``state_dict`` and resumes with the checkpoint.

Distillation terms are named ``"{kind}/{task}"`` for per-task terms (``"kd/left"``) and
``"{kind}"`` for shared terms (``"hint"``); a per-task term takes its task's weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_mtkd.config import RecordsInitArgs
from lightning_mtkd.tasks import Task

if TYPE_CHECKING:
    import lightning as L


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

    def attach(self, module: L.LightningModule) -> None:
        """Called by the module at the start of fit: plug-ins that need the network (GradNorm's shared layer)
        or the trainer (training progress) read them here. Keep no reference to ``module`` as a submodule:
        it would enter ``state_dict``."""

    def combine(self, task_losses: Mapping[str, Tensor], distill_terms: Mapping[str, Tensor], alpha: float) -> Tensor:
        raise NotImplementedError

    def on_train_epoch_end(self) -> None:
        """Called by the module at the end of each training epoch, before the weights are logged."""

    def current_weights(self) -> dict[str, Tensor]:
        """Per-task weights to log (``{task: weight}``); empty if fixed."""
        return {}

    def task_terms(
        self, task_losses: Mapping[str, Tensor], distill_terms: Mapping[str, Tensor], alpha: float
    ) -> tuple[dict[str, Tensor], Tensor]:
        r"""Split the terms into one loss per task and the shared remainder.

        Per task :math:`\mathcal{L}_t = (1-\alpha)\,\mathcal{L}^{sup}_t + \alpha \sum_k \mathcal{L}^{k}_t`
        (its per-task distillation terms ``"kind/t"``); shared :math:`\alpha \sum_s \mathcal{L}_s`. Learned
        weightings weigh the :math:`\mathcal{L}_t`; the shared terms are added as they are.
        """
        per_task = {name: (1 - alpha) * loss for name, loss in task_losses.items()}
        shared = torch.zeros((), device=next(iter(task_losses.values())).device)
        for name, term in distill_terms.items():
            task = term_task(name)
            if task in per_task:
                per_task[task] = per_task[task] + alpha * term
            else:
                shared = shared + alpha * term
        return per_task, shared


class StaticWeighting(Weighting):
    r"""Fixed weights: :math:`\mathcal{L} = \sum_t w_t \big[(1-\alpha)\,\mathcal{L}^{sup}_t + \alpha\,
    \mathcal{L}^{KD}_t\big] + \alpha \sum_s \mathcal{L}^{KD}_s` with :math:`w_t` = ``Task.weight``
    and :math:`s` the shared terms (hints).

    Without a teacher (:class:`~lightning_mtkd.MultiTaskModule`) ``alpha`` is 0: a weighted sum of task losses.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[tuple[Any, ...], Tensor] = {}

    def combine(self, task_losses: Mapping[str, Tensor], distill_terms: Mapping[str, Tensor], alpha: float) -> Tensor:
        # One weighted sum of all terms (not one multiply-add per term: tens of tasks make that the cost).
        values = [*task_losses.values(), *distill_terms.values()]
        coefficients = self._coefficients(tuple(task_losses), tuple(distill_terms), alpha, values[0].device)
        return (torch.stack(values) * coefficients).sum()

    def _coefficients(
        self, tasks: tuple[str, ...], terms: tuple[str, ...], alpha: float, device: torch.device
    ) -> Tensor:
        """Each term's factor, made once per set of term names (then reused: no host-to-device copy per step)."""
        key = (tasks, terms, alpha, device)
        cached = self._cache.get(key)
        if cached is None:
            factors = [(1 - alpha) * self.tasks[name].weight for name in tasks]
            for name in terms:
                task = term_task(name)
                factors.append(alpha * (self.tasks[task].weight if task in self.tasks else 1.0))
            # A normal tensor even when first made in an evaluation loop (inference mode): training reuses it.
            with torch.inference_mode(False):
                cached = self._cache[key] = torch.tensor(factors, device=device)
        return cached
