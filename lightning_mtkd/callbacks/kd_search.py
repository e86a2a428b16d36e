r"""Soft-target settings from the data: a small search over temperature and α on the validation split.

The temperature :math:`T` and the distillation share :math:`\alpha` that suit one data set do not suit
every one (MultiMNIST's α = 0.9, T = 4 tied the scratch student on a held-out set whose teacher was right
only 78 % of the time). :class:`KDSearch` picks them per fit: before the first epoch it trains the
strategy's student briefly under each candidate :math:`(T, \alpha)`, from the same initial weights, the
same batches and the same random draws, scores each on the validation split (every task's primary metric,
candidates ranked per task, the mean rank decides; the summed supervised validation loss breaks ties) and
sets the winner on the module. The module's weights, the random state and the optimizer are left as they
were, so the real fit then runs exactly as it would have with the winner given by hand.

The choice is printed, logged (``kd_search/temperature``, ``kd_search/alpha`` and each candidate's
score), written into the checkpoint (the module's ``hyper_parameters`` — so a reloaded module carries the
chosen values — and ``checkpoint["kd_search"]``), and restored on resume without searching again.
"""

from __future__ import annotations

import copy
import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_mtkd.callbacks.teacher_trust import _val_loader


def rank_candidates(scores: Sequence[Mapping[str, float]], higher_is_better: Mapping[str, bool]) -> list[float]:
    """Each candidate's mean rank over the tasks (0 = best on every task; ties share their mean rank).

    Example:
        >>> rank_candidates([{"a": 0.9, "b": 0.5}, {"a": 0.8, "b": 0.7}, {"a": 0.9, "b": 0.6}], {"a": True, "b": True})
        [1.25, 1.0, 0.75]
    """
    ranks = [0.0] * len(scores)
    for task, higher in higher_is_better.items():
        values = [s[task] for s in scores]
        for i, value in enumerate(values):
            better = sum((v > value) if higher else (v < value) for v in values)
            ties = sum(v == value for v in values) - 1
            ranks[i] += better + ties / 2
    return [r / max(1, len(higher_is_better)) for r in ranks]


class KDSearch(L.Callback):
    r"""Choose the temperature and α of a distillation fit by short trial fits scored on validation data.

    Before the first epoch, for every pair of ``temperatures`` × ``alphas``: the module's weights are reset to
    where they started, the student trains ``epochs`` passes over the training loader with a fresh optimizer
    from the module's ``configure_optimizers``, and is scored on the validation loader. A pass reads at most
    ``max_batches`` batches and at most what the trainer's ``limit_train_batches`` / ``limit_val_batches``
    allow. Candidates are ranked per task by the
    task's primary metric; the lowest mean rank wins (:func:`rank_candidates`), the lower summed supervised
    validation loss breaking ties. Every candidate sees the same batches and random draws; the module's
    weights, optimizer and random state are restored afterwards. Under DDP rank 0's choice is broadcast.

    Cost: ``len(temperatures) · len(alphas) · epochs`` extra passes with the teachers running (the teacher
    cache is not open yet). Turn it off by leaving the callback out.

    Args:
        temperatures: Candidate temperatures (> 0).
        alphas: Candidate distillation shares, in [0, 1].
        epochs: Training passes of each trial fit.
        max_batches: Batches per trial pass and per scoring pass (``None``: as many as the trainer's limits allow).

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_mtkd.callbacks.KDSearch
              init_args: {temperatures: [1.0, 2.0, 4.0], alphas: [0.5, 0.9], epochs: 2}
    """

    def __init__(
        self,
        temperatures: Sequence[float] = (1.0, 2.0, 4.0),
        alphas: Sequence[float] = (0.5, 0.9),
        epochs: int = 2,
        max_batches: int | None = None,
    ) -> None:
        if not temperatures or not alphas:
            raise ValueError("KDSearch needs at least one temperature and one alpha to choose from.")
        bad_t = [t for t in temperatures if not (t > 0 and math.isfinite(t))]
        bad_a = [a for a in alphas if not 0.0 <= a <= 1.0]
        if bad_t or bad_a:
            raise ValueError(
                f"temperatures must be > 0 and alphas lie in [0, 1]; got temperatures {bad_t}, alphas {bad_a}."
            )
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}.")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 (or None), got {max_batches}.")
        self.candidates = [(float(t), float(a)) for t, a in itertools.product(temperatures, alphas)]
        self.epochs = epochs
        self.max_batches = max_batches
        #: ``{"temperature", "alpha"}`` once chosen (or restored from a checkpoint).
        self.chosen: dict[str, float] = {}
        #: Per candidate: ``{"temperature", "alpha", "scores": {task: metric}, "loss", "rank"}``.
        self.results: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lightning_mtkd.strategies.distillation import DistillationModule

        if not isinstance(pl_module, DistillationModule):
            raise TypeError(
                f"KDSearch chooses a distillation module's temperature and alpha, but the module is a "
                f"{type(pl_module).__name__}. Remove the callback, or use a distillation strategy."
            )
        if not self.chosen:
            self.chosen = trainer.strategy.broadcast(self.search(trainer, pl_module), src=0)
        self.apply(pl_module)
        rank_zero_info(
            f"KD search: temperature {self.chosen['temperature']:g}, alpha {self.chosen['alpha']:g}"
            + (
                " ("
                + "; ".join(f"T={r['temperature']:g} α={r['alpha']:g}: rank {r['rank']:.2f}" for r in self.results)
                + ")"
                if self.results
                else " (restored from the checkpoint)"
            )
        )
        metrics = {"kd_search/temperature": self.chosen["temperature"], "kd_search/alpha": self.chosen["alpha"]}
        for r in self.results:
            metrics.update({f"kd_search/T{r['temperature']:g}_a{r['alpha']:g}/{t}": v for t, v in r["scores"].items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def apply(self, module: Any) -> None:
        """Set the chosen values on ``module`` and in its hyper-parameters (so its checkpoints carry them)."""
        module.temperature = self.chosen["temperature"]
        module.distillation_alpha = self.chosen["alpha"]
        if "temperature" in module.hparams:
            module.hparams["temperature"] = self.chosen["temperature"]
        if "alpha" in module.hparams:
            module.hparams["alpha"] = self.chosen["alpha"]

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["kd_search"] = {"chosen": dict(self.chosen), "results": list(self.results)}

    def state_dict(self) -> dict[str, Any]:
        return {"chosen": dict(self.chosen), "results": list(self.results)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.chosen = dict(state_dict.get("chosen", {}))
        self.results = list(state_dict.get("results", []))

    # ------------------------------------------------------------------------------ the search
    def search(self, trainer: L.Trainer, module: Any) -> dict[str, float]:
        """Run the trial fits; returns ``{"temperature", "alpha"}`` of the best and fills :attr:`results`."""
        trainer.fit_loop.setup_data()  # the loop would load it next; idempotent
        train = trainer.train_dataloader
        val = _val_loader(trainer)
        if train is None or val is None:
            raise ValueError("KDSearch needs a training and a validation loader to choose temperature and alpha.")
        start = copy.deepcopy(module.state_dict())
        rng = _rng_state()
        was_training, stage = module.training, trainer.state.stage
        self.results = []
        train_batches = self._cap(trainer.limit_train_batches, train)
        val_batches = self._cap(trainer.limit_val_batches, val)
        try:
            for temperature, alpha in self.candidates:
                module.load_state_dict(start)
                _set_rng_state(rng)  # every candidate: the same initial draws, batches and augmentations
                module.temperature, module.distillation_alpha = temperature, alpha
                self._fit(trainer, module, train, train_batches)
                scores, loss = self._score(trainer, module, val, val_batches)
                self.results.append({"temperature": temperature, "alpha": alpha, "scores": scores, "loss": loss})
        finally:
            module.load_state_dict(start)
            _set_rng_state(rng)
            module.train(was_training)
            trainer.state.stage = stage
        higher = {name: task.higher_is_better for name, task in module.tasks.items()}
        ranks = rank_candidates([r["scores"] for r in self.results], higher)
        for r, rank in zip(self.results, ranks, strict=True):
            r["rank"] = rank
        best = min(self.results, key=lambda r: (r["rank"], r["loss"]))
        return {"temperature": best["temperature"], "alpha": best["alpha"]}

    def _cap(self, limit: int | float | None, loader: Any) -> int | None:
        """The batches a pass reads: ``max_batches`` and the trainer's ``limit_*_batches`` (a count or a share)."""
        caps = [] if self.max_batches is None else [self.max_batches]
        if isinstance(limit, int):
            caps.append(limit)
        elif isinstance(limit, float) and limit < 1.0 and hasattr(loader, "__len__"):
            caps.append(max(1, int(limit * len(loader))))  # a loader without a length: its own end is the limit
        return min(caps) if caps else None

    def _batches(self, trainer: L.Trainer, module: Any, loader: Any, training: bool, limit: int | None) -> Any:
        trainer.training = training  # the DataModule augments training batches only
        for index, batch in enumerate(loader):
            if limit is not None and index >= limit:
                return
            batch = module._on_before_batch_transfer(batch, dataloader_idx=0)  # the loops' own calls
            yield module._apply_batch_transfer_handler(batch)

    def _fit(self, trainer: L.Trainer, module: Any, loader: Any, limit: int | None) -> None:
        configured = module.configure_optimizers()
        optimizer = _first_optimizer(configured)
        module.train()
        sampler: Any = getattr(loader, "sampler", None)
        for epoch in range(self.epochs):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            for batch in self._batches(trainer, module, loader, True, limit):
                optimizer.zero_grad(set_to_none=True)
                step_loss(module, batch).backward()
                optimizer.step()
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(0)

    @torch.no_grad()
    def _score(
        self, trainer: L.Trainer, module: Any, loader: Any, limit: int | None
    ) -> tuple[dict[str, float], float]:
        module.eval()
        metrics = {
            name: task.make_metrics()[task.primary_metric].to(module.device) for name, task in module.tasks.items()
        }
        losses = []
        for batch in self._batches(trainer, module, loader, False, limit):
            outputs = module.task_outputs(module(batch["input"]), "student")
            total = 0.0
            for name, task in module.tasks.items():
                metrics[name].update(*task.metric_inputs(outputs[name], batch["targets"][name]))
                total += float(task.supervised_loss(outputs[name], batch["targets"][name]))
            losses.append(total)
        return {name: float(m.compute()) for name, m in metrics.items()}, statistics.fmean(losses) if losses else 0.0


def step_loss(module: Any, batch: Mapping[str, Any]) -> Tensor:
    """The training loss of the shared step for one batch, without its metrics and logs.

    The same terms as ``MultiTaskModule.shared_step`` (supervised losses on the supervision targets, the
    strategy's distillation terms, the weighting plug-in, other networks' losses); it does not log, so it can
    run outside Lightning's loops.
    """
    step = module.forward_step(batch, "train")
    supervised = module.supervision_targets(step)
    outputs = step.student.outputs
    task_losses = {name: task.supervised_loss(outputs[name], supervised[name]) for name, task in module.tasks.items()}
    terms = {**module.distillation_loss(step), **step.terms} if step.teachers else {}
    loss = module.weighting.combine(task_losses, terms, module.distillation_alpha if step.teachers else 0.0)
    return loss + sum(step.losses.values()) if step.losses else loss


def _first_optimizer(configured: Any) -> torch.optim.Optimizer:
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, Mapping):
        return configured["optimizer"]
    if isinstance(configured, (list, tuple)) and configured:
        return _first_optimizer(configured[0])
    raise TypeError(f"KDSearch cannot find the optimizer in what configure_optimizers returned: {configured!r}.")


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
