"""Teacher annealing (Clark et al., ACL 2019, BAM!): from the teacher's soft target to the gold label."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_mtkd.weighting.base import StaticWeighting

if TYPE_CHECKING:
    import lightning as L


class TeacherAnnealing(StaticWeighting):
    r"""Teacher annealing: the distillation share moves from 1 to 0 as training progresses.

    .. math::
        \mathcal{L} = \sum_t w_t \big[\lambda\, \mathcal{L}^{sup}_t + (1-\lambda)\, \mathcal{L}^{KD}_t\big]
        + (1-\lambda) \sum_s \mathcal{L}_s

    Clark, Luong, Khandelwal, Manning & Le, *BAM! Born-Again Multi-Task Networks for Natural Language
    Understanding*, ACL 2019: the target :math:`\lambda y + (1-\lambda) p^T` with :math:`\lambda` rising
    linearly from 0 to 1. For cross-entropy, :math:`\mathrm{CE}(\lambda y + (1-\lambda)p^T, p^S) =
    \lambda\,\mathrm{CE}(y, p^S) + (1-\lambda)\,\mathrm{CE}(p^T, p^S)`, and :math:`\mathrm{CE}(p^T, p^S)`
    differs from :math:`\mathrm{KL}(p^T\|p^S)` by a constant: mixing the losses is mixing the targets.

    So it is :class:`StaticWeighting` with the distillation share :math:`\alpha` replaced by
    :math:`1 - \lambda`; ``Task.weight`` (:math:`w_t`) still weighs the tasks.
    Progress is the number of training steps taken (a buffer in ``state_dict``, so resuming continues
    the schedule) over ``total_steps``, read from the trainer at the start of fit when not given.
    Without a teacher it is plain supervised training. BAM!
    used temperature 1; with ``T > 1`` the distillation term is the ``T²``-scaled KL.

    Args:
        total_steps: Training batches over which :math:`\lambda` goes from 0 to 1 (default: the whole fit).

    YAML::

        weighting: {class_path: lightning_mtkd.weighting.TeacherAnnealing}
    """

    steps_taken: Tensor
    steps_total: Tensor

    def __init__(self, total_steps: int | None = None) -> None:
        super().__init__()
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"TeacherAnnealing: total_steps must be >= 1, got {total_steps}.")
        self.total_steps = total_steps
        self.register_buffer("steps_taken", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps_total", torch.tensor(float(total_steps or 1)))

    def attach(self, module: L.LightningModule) -> None:
        if self.total_steps is not None:
            return
        trainer = module.trainer
        total = trainer.estimated_stepping_batches * trainer.accumulate_grad_batches
        if not total < float("inf"):
            raise ValueError(
                "TeacherAnnealing: the trainer has no finite length (max_epochs=-1 and no max_steps); set "
                "`total_steps` or give the trainer max_epochs / max_steps."
            )
        self.steps_total.fill_(float(total))

    @property
    def progress(self) -> Tensor:
        """:math:`\\lambda` in [0, 1], a tensor (reading it needs no host sync)."""
        return (self.steps_taken / self.steps_total).clamp(0.0, 1.0)

    def combine(self, task_losses: Mapping[str, Tensor], distill_terms: Mapping[str, Tensor], alpha: float) -> Tensor:
        # Without a teacher there is nothing to anneal from: the gold label alone.
        share = 1 - self.progress if distill_terms else 0.0
        total = super().combine(task_losses, distill_terms, share)  # type: ignore[arg-type]  # a 0-d tensor
        if self.training and torch.is_grad_enabled():
            self.steps_taken += 1
        return total

    def current_weights(self) -> dict[str, Tensor]:
        """The gold label's share per task, :math:`\\lambda\\, w_t`."""
        return {name: self.progress * task.weight for name, task in self.tasks.items()}
