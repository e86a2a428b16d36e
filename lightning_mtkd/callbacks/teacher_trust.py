r"""Teacher trust: per task, distil only from the teachers that are best on validation data.

A teacher trained on one task is not always better at it than a multi-task teacher: on a held-out two-digit
set, one single-task teacher was 3.9 points worse than the multi-task teacher on its own task, and a
task-specific student that followed it lost 3.1 points on that task. Before fitting, :class:`TeacherTrust`
scores every teacher on every task it outputs, on the validation split (each task's primary metric:
accuracy, MAE, …), and keeps, per task, the teachers within ``tolerance`` of the best; the strategy then
distils that task from those only. The choice is made once (the teachers are frozen, so it cannot change),
printed, logged to the trainer's loggers (:meth:`TeacherTrust.log_choice`) and saved in the checkpoint.

Strategies take the choice through one method, ``trust_teachers(choice, scores)`` (``{task: [teachers, best
first]}`` and ``{task: {teacher: score}}``):
:class:`~lightning_mtkd.TaskSpecificDistiller` distils each task from its best teacher,
:class:`~lightning_mtkd.FusionDistiller` fuses the trusted teachers only. Strategies with one teacher per
task and nothing to choose from are left as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from lightning_mtkd.inputs import call_model


def trusted_teachers(
    scores: Mapping[str, Mapping[str, float]], higher_is_better: Mapping[str, bool], tolerance: float
) -> dict[str, list[str]]:
    r"""Per task, the teachers whose score is within ``tolerance`` (relative) of the task's best teacher.

    Teacher :math:`k` is kept for task :math:`t` when :math:`s_{kt} \ge s^*_t - \epsilon |s^*_t|` (higher is
    better; :math:`s_{kt} \le s^*_t + \epsilon |s^*_t|` for an error such as MAE), with :math:`s^*_t` the best
    teacher's score and :math:`\epsilon` the tolerance. The best teacher comes first, the others in order.

    Example:
        >>> trusted_teachers({"left": {"left": 0.90, "multitask": 0.94}}, {"left": True}, tolerance=0.01)
        {'left': ['multitask']}
        >>> trusted_teachers({"left": {"left": 0.935, "multitask": 0.94}}, {"left": True}, tolerance=0.01)
        {'left': ['multitask', 'left']}
    """
    choice = {}
    for task, by_teacher in scores.items():
        if not by_teacher:
            continue
        sign = 1.0 if higher_is_better[task] else -1.0
        best_name = max(by_teacher, key=lambda name: sign * by_teacher[name])
        best = by_teacher[best_name]
        margin = tolerance * abs(best)
        kept = [name for name, score in by_teacher.items() if sign * (score - best) >= -margin and name != best_name]
        choice[task] = [best_name, *kept]
    return choice


class TeacherTrust(L.Callback):
    """Choose, per task, the teachers a multi-teacher strategy distils from, by their scores on validation data.

    At ``setup`` of a fit (before the strategy sets up its feature hints and fusion gates, so these follow the
    choice), every teacher runs once over the validation loader; per task, the teachers within ``tolerance``
    of the best are kept (:func:`trusted_teachers`) and handed to the module's ``trust_teachers``. A module
    without that method (one teacher per task) is left as it is. The scores and the choice are kept in
    :attr:`scores` and :attr:`choice`, printed, logged to the loggers (``trust/<task>/<teacher>``: the
    teacher's score, ``trust/<task>/<teacher>_kept``: 1 or 0) and saved in the checkpoint (the callback's state
    and ``checkpoint["teacher_trust"]``). The choice is a deterministic function of the frozen teachers and
    the validation data, so every DDP rank (each reads the whole validation loader here) and a resumed run
    make the same one; a resumed run whose choice differs from the checkpoint's is warned about.

    TaskSpecificDistiller and FusionDistiller add this callback themselves (``teacher_trust=True``, their
    default); add it to the trainer yourself to change its settings.

    Args:
        tolerance: Relative margin within which a teacher counts as good as the best one (0.005: half a point
            of a 95 % accuracy). 0 keeps only the best; a large value keeps every teacher (trust off).
        max_batches: Validation batches read to score the teachers (``None``: all).

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_mtkd.callbacks.TeacherTrust
              init_args: {tolerance: 0.005}
    """

    def __init__(self, tolerance: float = 0.005, max_batches: int | None = None) -> None:
        if not (tolerance >= 0 and math.isfinite(tolerance)):
            raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}.")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 (or None for the whole split), got {max_batches}.")
        self.tolerance = float(tolerance)
        self.max_batches = max_batches
        #: ``{task: {teacher: validation score}}`` (the task's primary metric).
        self.scores: dict[str, dict[str, float]] = {}
        #: ``{task: [trusted teachers, best first]}``.
        self.choice: dict[str, list[str]] = {}
        self._restored: dict[str, list[str]] | None = None

    # ------------------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not hasattr(pl_module, "trust_teachers"):
            return
        loader = _val_loader(trainer)
        if loader is None:
            rank_zero_warn("TeacherTrust: no validation loader, so every teacher is trusted. Give a val split.")
            return
        self.scores = self.score_teachers(pl_module, loader)
        higher = {task: pl_module.tasks[task].higher_is_better for task in self.scores}
        self.choice = trusted_teachers(self.scores, higher, self.tolerance)
        pl_module.trust_teachers(self.choice, self.scores)
        dropped = {t: [k for k in self.scores[t] if k not in self.choice[t]] for t in self.choice}
        rank_zero_info(
            "teacher trust (validation "
            + ", ".join(f"{t}: " + " ".join(f"{k} {v:.4g}" for k, v in self.scores[t].items()) for t in self.scores)
            + f"): distilling {self.choice}"
            + (f", dropped {dropped}" if any(dropped.values()) else "")
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restored is not None and self.choice and self._restored != self.choice:
            rank_zero_warn(
                f"TeacherTrust: the resumed checkpoint distilled {self._restored}, but the teachers' validation "
                f"scores now give {self.choice} (teachers or validation data changed); continuing with the new choice."
            )
        self.log_choice(trainer)

    def log_choice(self, trainer: L.Trainer) -> None:
        """Each teacher's validation score and whether it is kept, to every logger (``trust/<task>/<teacher>``)."""
        metrics = {}
        for task, by_teacher in self.scores.items():
            for teacher, score in by_teacher.items():
                metrics[f"trust/{task}/{teacher}"] = score
                metrics[f"trust/{task}/{teacher}_kept"] = float(teacher in self.choice.get(task, ()))
        for logger in trainer.loggers if metrics else []:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["teacher_trust"] = {"scores": self.scores, "choice": self.choice}

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores, "choice": self.choice, "tolerance": self.tolerance}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = {task: list(names) for task, names in state_dict.get("choice", {}).items()}

    # ------------------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_teachers(self, module: Any, loader: DataLoader) -> dict[str, dict[str, float]]:
        """``{task: {teacher: score}}``: each teacher's primary metric on each task it outputs, over ``loader``."""
        teachers = module.teachers
        if not teachers.activate(needed=True):
            return {}
        metrics: dict[str, dict[str, Any]] = {}
        # Before the strategy's setup the module may not be on its device yet: score where the teachers are.
        device = next((p.device for t in teachers.modules().values() for p in t.parameters()), torch.device("cpu"))
        for index, batch in enumerate(loader):
            if self.max_batches is not None and index >= self.max_batches:
                break
            batch = move_data_to_device(batch, device)
            for name, network in teachers.modules().items():
                outputs = module.task_outputs(
                    call_model(network, batch["input"], module.unpack_inputs), f"teacher {name!r}", False, name
                )
                for task_name, output in outputs.items():
                    task = module.tasks.get(task_name)
                    if task is None:
                        continue
                    metric = metrics.setdefault(task_name, {}).get(name)
                    if metric is None:
                        metric = task.make_metrics()[task.primary_metric].to(device)
                        metrics[task_name][name] = metric
                    metric.update(*task.metric_inputs(output, batch["targets"][task_name]))
        return {
            task: {name: float(metric.compute()) for name, metric in by_teacher.items()}
            for task, by_teacher in metrics.items()
        }


def _val_loader(trainer: L.Trainer) -> Any:
    """The fit's validation loader, before the validation loop has loaded it (``None`` if there is none)."""
    if trainer.datamodule is not None and hasattr(trainer.datamodule, "val_dataloader"):
        try:
            return trainer.datamodule.val_dataloader()
        except (NotImplementedError, ValueError):
            return None
    source = trainer.fit_loop.epoch_loop.val_loop._data_source  # plain loaders passed to fit (no public accessor)
    return source.dataloader() if source.is_defined() else None
