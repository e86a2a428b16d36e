"""GradNorm (Chen et al., ICML 2018): balance the tasks' gradient norms at the last shared layer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_mtkd.models.hooks import find_shared_feature, resolve_module
from lightning_mtkd.tasks import Task
from lightning_mtkd.weighting.base import Weighting

if TYPE_CHECKING:
    import lightning as L


def gradnorm_targets(grad_norms: Tensor, losses: Tensor, initial_losses: Tensor, alpha: float) -> Tensor:
    r"""GradNorm's target gradient norms.

    .. math::
        G_i^{target} = \bar G_W \cdot r_i^{\alpha}, \qquad r_i = \frac{\tilde L_i}{\mathrm{mean}_j \tilde L_j},
        \qquad \tilde L_i = \frac{L_i(t)}{L_i(0)}

    with :math:`G_i = \|\nabla_W w_i L_i\|_2` and :math:`\bar G_W` their mean (Chen, Badrinarayanan, Lee &
    Rabinovich, *GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask
    Networks*, ICML 2018, eq. 1–2). Treated as constants when the weights are updated.
    """
    ratios = losses / initial_losses.clamp_min(1e-12)
    relative = ratios / ratios.mean()
    return grad_norms.mean() * relative.pow(alpha)


def gradnorm_loss(grad_norms: Tensor, targets: Tensor) -> Tensor:
    r""":math:`L_{grad} = \sum_i |G_i - G_i^{target}|_1` (Chen et al., ICML 2018, eq. 2)."""
    return (grad_norms - targets.detach()).abs().sum()


class GradNorm(Weighting):
    r"""Learned task weights :math:`w_i` that pull each task's gradient norm at the last shared layer
    toward the mean norm, scaled by how slowly the task trains (asymmetry ``alpha``).

    Each training step, for the per-task losses :math:`L_i = (1-\alpha_{KD})\mathcal{L}^{sup}_i +
    \alpha_{KD}\mathcal{L}^{KD}_i`:

    1. the weights are renormalised to sum to the number of tasks (the paper does this after each step);
    2. :math:`g_i = \|\nabla_W L_i\|` at the shared layer ``W`` (one partial backward per task, down to
       ``W`` only); :math:`G_i = w_i g_i`, exactly, so the weights' gradient needs no second-order graph;
    3. :math:`L_{grad}` (:func:`gradnorm_loss`) trains only the :math:`w_i`; the network trains on
       :math:`\sum_i w_i L_i` with the weights held constant. :math:`L_{grad}` adds gradient but no
       value to the returned loss, so ``train/loss`` stays comparable across weightings.

    Shared distillation terms are added with weight :math:`\alpha_{KD}`. The weights (a parameter, in
    the optimizer's ``"weighting"`` group) and the initial losses :math:`L_i(0)` (a buffer, taken at
    the first training step) are in ``state_dict``. ``Task.weight`` is not used.

    Args:
        alpha: The asymmetry :math:`\alpha` (1.5 in most of the paper's experiments; 0 equalises the norms).
        shared_layer: Dotted path, in the module's network, of the last shared layer; if that module
            holds no parameters itself, the last submodule under it that does is used (``"backbone"``
            of a :class:`~lightning_mtkd.models.MultiTaskNet` → its last linear layer). Its ``weight`` is
            :math:`W` (all its parameters if it has no ``weight``). ``None``: the module whose output feeds
            every task head, found by a dry run at the start of fit
            (:func:`~lightning_mtkd.models.hooks.find_shared_feature`), whatever the network.

    YAML::

        weighting: {class_path: lightning_mtkd.weighting.GradNorm, init_args: {alpha: 1.5, shared_layer: backbone}}
    """

    initial_losses: Tensor
    initialised: Tensor

    def __init__(self, alpha: float = 1.5, shared_layer: str | None = None) -> None:
        super().__init__()
        if alpha < 0:
            raise ValueError(f"GradNorm: alpha (the asymmetry) must be >= 0, got {alpha}.")
        self.alpha = float(alpha)
        self.shared_layer = shared_layer
        self._shared: list[nn.Parameter] = []  # a plain list: the network's parameters stay the network's
        self.shared_layer_name = ""

    def setup_tasks(self, tasks: Mapping[str, Task]) -> None:
        super().setup_tasks(tasks)
        k = len(self.tasks)
        self.task_weights = nn.Parameter(torch.ones(k))
        self.register_buffer("initial_losses", torch.ones(k))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def attach(self, module: L.LightningModule) -> None:
        model = module.model
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradNorm: {type(module).__name__} has no network `model`; call attach_model(network).")
        path = self.shared_layer
        if path is None:
            from lightning_mtkd.data.examples import example_inputs

            unpack = getattr(module, "unpack_inputs", True)
            path = find_shared_feature(model, example_inputs(module, "fit"), unpack, owner="GradNorm shared_layer")
        self.attach_model(model, path)

    def attach_model(self, model: nn.Module, shared_layer: str | None = None) -> None:
        """Find ``W`` in ``model``: the parameters of its last shared layer (``shared_layer``, else the configured)."""
        path = shared_layer or self.shared_layer
        if path is None:
            raise ValueError("GradNorm: give `shared_layer`, the dotted path of the network's last shared layer.")
        layer = resolve_module(model, path, owner=f"GradNorm shared_layer {path!r}")
        owners = [(name, m) for name, m in layer.named_modules() if any(True for _ in m.parameters(recurse=False))]
        if not owners:
            raise ValueError(
                f"GradNorm: the module at shared_layer {path!r} has no parameters; name a layer with "
                "weights (e.g. the backbone's last linear layer)."
            )
        name, owner = owners[-1]
        weight = getattr(owner, "weight", None)
        params = [weight] if isinstance(weight, nn.Parameter) else list(owner.parameters(recurse=False))
        self._shared = [p for p in params if p.requires_grad]
        if not self._shared:
            raise ValueError(f"GradNorm: the parameters of shared_layer {path!r} are frozen.")
        self.shared_layer_name = ".".join(filter(None, [path, name]))

    def combine(self, task_losses: Mapping[str, Tensor], distill_terms: Mapping[str, Tensor], alpha: float) -> Tensor:
        per_task, shared = self.task_terms(task_losses, distill_terms, alpha)
        losses = torch.stack([per_task[name] for name in self.tasks])
        if not (self.training and torch.is_grad_enabled() and losses.requires_grad):
            return (self.task_weights.detach() * losses).sum() + shared
        if not self._shared:
            raise RuntimeError(
                "GradNorm has no shared layer: the module calls `attach(module)` at the start of fit; in a loop "
                "of your own, call `weighting.attach_model(model)` first."
            )
        with torch.no_grad():  # renormalise: sum_i w_i = K, weights kept positive
            self.task_weights.clamp_(min=1e-6)
            self.task_weights.mul_(len(self.tasks) / self.task_weights.sum())
            self.initial_losses.copy_(torch.where(self.initialised, self.initial_losses, losses.detach()))
            self.initialised.fill_(True)
        norms = torch.stack([self._grad_norm(loss) for loss in losses.unbind()])
        grad_norms = self.task_weights * norms  # G_i = ||∇_W w_i L_i|| = w_i ||∇_W L_i|| since w_i > 0
        targets = gradnorm_targets(grad_norms.detach(), losses.detach(), self.initial_losses, self.alpha)
        balance = gradnorm_loss(grad_norms, targets)
        return (self.task_weights.detach() * losses).sum() + shared + (balance - balance.detach())

    def _grad_norm(self, loss: Tensor) -> Tensor:
        grads = torch.autograd.grad(loss, self._shared, retain_graph=True, allow_unused=True)
        flat = [g.flatten() for g in grads if g is not None]
        return torch.linalg.vector_norm(torch.cat(flat)) if flat else loss.new_zeros(())

    def current_weights(self) -> dict[str, Tensor]:
        # As the next step will use them: renormalised to sum to the number of tasks.
        weights = self.task_weights.detach().clamp_min(1e-6)
        return dict(zip(self.tasks, weights * len(self.tasks) / weights.sum(), strict=True))
