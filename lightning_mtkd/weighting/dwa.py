"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019): weights from the rate each loss falls."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_mtkd.tasks import Task
from lightning_mtkd.weighting.base import Weighting


def dwa_weights(last: Tensor, before_last: Tensor, temperature: float = 2.0) -> Tensor:
    r"""DWA's task weights from the average losses of the last two epochs.

    .. math::
        w_k(t) = \frac{K \exp(r_k(t-1)/T)}{\sum_i \exp(r_i(t-1)/T)}, \qquad
        r_k(t-1) = \frac{\mathcal{L}_k(t-1)}{\mathcal{L}_k(t-2)}

    Liu, Johns & Davison, *End-to-End Multi-Task Learning with Attention* (MTAN), CVPR 2019, eq. 7.
    A task whose loss falls slowly (ratio near 1) gets more weight; the weights sum to ``K``.
    """
    ratios = last / before_last.clamp_min(1e-12)
    return len(ratios) * torch.softmax(ratios / temperature, dim=0)


class DynamicWeightAverage(Weighting):
    r"""DWA: per-task weights from the ratio of each task's average loss over the last two epochs.

    The losses weighted are :math:`\mathcal{L}_t = (1-\alpha)\mathcal{L}^{sup}_t + \alpha\,\mathcal{L}^{KD}_t`
    (see :func:`dwa_weights`); shared distillation terms are added with weight :math:`\alpha`. The
    first two epochs use weight 1, as in the paper. Training losses are summed on the device
    during the epoch (no host sync) and averaged (across DDP ranks too) at its end. The last two
    epoch averages and the weights are buffers, the running sums extra state: all are in
    ``state_dict``, so resuming, even mid-epoch, loses nothing.
    ``Task.weight`` is not used.

    Args:
        temperature: ``T``, the softness of the weights (2 in the paper).

    YAML::

        weighting: {class_path: lightning_mtkd.weighting.DynamicWeightAverage, init_args: {temperature: 2.0}}
    """

    weights: Tensor
    history: Tensor
    epochs_seen: Tensor

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"DynamicWeightAverage: temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)

    def setup_tasks(self, tasks: Mapping[str, Task]) -> None:
        super().setup_tasks(tasks)
        k = len(self.tasks)
        self.register_buffer("weights", torch.ones(k))
        self.register_buffer("history", torch.ones(2, k))  # rows: epoch t-2, epoch t-1
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))
        # This rank's running sums are not buffers: DDP broadcasts buffers from rank 0 before every forward,
        # which would overwrite them. They reach state_dict as extra state instead.
        self.epoch_loss_sum = torch.zeros(k)
        self.epoch_steps = torch.zeros(())

    def combine(self, task_losses: Mapping[str, Tensor], distill_terms: Mapping[str, Tensor], alpha: float) -> Tensor:
        per_task, shared = self.task_terms(task_losses, distill_terms, alpha)
        losses = torch.stack([per_task[name] for name in self.tasks])
        if self.training and torch.is_grad_enabled():
            if self.epoch_loss_sum.device != losses.device:
                self.epoch_loss_sum, self.epoch_steps = self.epoch_loss_sum.to(losses), self.epoch_steps.to(losses)
            self.epoch_loss_sum += losses.detach()
            self.epoch_steps += 1
        return (self.weights * losses).sum() + shared

    def on_train_epoch_end(self) -> None:
        sums, steps = self.epoch_loss_sum.to(self.history), self.epoch_steps.to(self.history)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(steps)
        average = sums / steps.clamp_min(1)
        self.history.copy_(torch.stack([self.history[1], average]))
        self.epochs_seen += 1
        # From the third epoch on (two full epochs seen), as in the paper; torch.where avoids a host sync.
        update = dwa_weights(self.history[1], self.history[0], self.temperature)
        self.weights.copy_(torch.where(self.epochs_seen >= 2, update, torch.ones_like(update)))
        self.epoch_loss_sum = torch.zeros_like(sums)
        self.epoch_steps = torch.zeros_like(steps)

    def get_extra_state(self) -> dict[str, Tensor]:
        return {"epoch_loss_sum": self.epoch_loss_sum.clone(), "epoch_steps": self.epoch_steps.clone()}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        self.epoch_loss_sum, self.epoch_steps = state["epoch_loss_sum"].clone(), state["epoch_steps"].clone()

    def current_weights(self) -> dict[str, Tensor]:
        return dict(zip(self.tasks, self.weights.clone(), strict=True))
