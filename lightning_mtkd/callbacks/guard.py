"""Stop (or skip) on a NaN or infinite loss, naming the term and the task that went bad."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class NonFiniteLossGuard(Callback):
    """Checks each training step's loss before the optimizer step.

    With ``policy="raise"`` a NaN or infinite loss stops training with an error that names every
    non-finite term (``"left/loss"``: the supervised loss of task ``left``; ``"kd/right"``: the
    distillation term of task ``right``; ``"hint"``…) and what usually causes it. With
    ``policy="skip"`` the step's gradients are dropped, so the optimizer leaves the weights as they
    were, and the skipped steps are counted (``skipped_batches``, logged as ``train/skipped_batches``).
    Buffers updated by the forward pass itself (BatchNorm running statistics) cannot be taken back.

    The check reads one boolean per step from the device: cheap on CPU, one sync per step on a GPU.

    Example (YAML, on by default in ``lightning-mtkd``)::

        trainer:
          callbacks:
            - class_path: lightning_mtkd.callbacks.NonFiniteLossGuard
              init_args: {policy: skip}
    """

    def __init__(self, policy: Literal["raise", "skip"] = "raise") -> None:
        if policy not in ("raise", "skip"):
            raise ValueError(f"policy must be 'raise' or 'skip', got {policy!r}.")
        self.policy = policy
        self.skipped_batches = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        terms: dict[str, torch.Tensor] = getattr(pl_module, "step_terms", {})
        loss = terms.get("loss")
        if loss is None or bool(torch.isfinite(loss.detach())):
            return
        bad = [name for name, value in terms.items() if name != "loss" and not bool(torch.isfinite(value).all())]
        if self.policy == "raise":
            raise FloatingPointError(
                f"non-finite training loss at epoch {trainer.current_epoch}, step {trainer.global_step}: "
                f"{', '.join(bad) or 'the total'} is NaN or infinite. Usual causes: a learning rate too high, "
                "NaN/inf in the inputs or targets, a temperature near 0. Use NonFiniteLossGuard(policy='skip') to "
                "skip such batches instead."
            )
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        self.skipped_batches += 1
        pl_module.log("train/skipped_batches", float(self.skipped_batches), on_step=False, on_epoch=True)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_batches": self.skipped_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_batches = state_dict["skipped_batches"]
