r"""Teacher trust: per task, distil only from the teachers that are best on validation data.

A teacher trained on one task is not always better at it than a multi-task teacher: on a held-out two-digit
set, one single-task teacher was 3.9 points worse than the multi-task teacher on its own task, and a
task-specific student that followed it lost 3.1 points on that task. Before fitting, :class:`TeacherTrust`
scores every teacher on every task it outputs, on the validation split (each task's primary metric:
accuracy, MAE, …), and keeps, per task, the teachers not clearly worse than the best: a teacher is dropped
only when it falls short by more than ``z`` standard errors of the paired per-sample difference (plus an
optional relative ``tolerance``; :func:`trusted_teachers`). The strategy then distils that task from the
teachers kept. The choice is made once (the teachers are frozen, so it cannot change),
printed, logged to the trainer's loggers (:meth:`TeacherTrust.log_choice`) and saved in the checkpoint.

Strategies take the choice through one hook,
:meth:`~lightning_mtkd.strategies.distillation.DistillationModule.trust_teachers` (``{task: [teachers, best first]}``
and ``{task: {teacher: score}}``). By default it keeps the choice, and each task then learns from its assigned
teacher unless that one was dropped (:class:`~lightning_mtkd.TaskSpecificDistiller`), or from the teachers kept
(:class:`~lightning_mtkd.FusionDistiller` fuses those only; other strategies take the one named after the task,
else the best kept).
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
    scores: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, bool],
    tolerance: float,
    standard_errors: Mapping[str, Mapping[str, float]] | None = None,
    z: float = 2.0,
) -> dict[str, list[str]]:
    r"""Per task, the teachers not clearly worse than the task's best teacher.

    Teacher :math:`k` is dropped for task :math:`t` when its score falls short of the best teacher's
    :math:`s^*_t` by more than :math:`\epsilon |s^*_t| + z\,\mathrm{SE}_{kt}` (short: lower for a score,
    higher for an error such as MAE), with :math:`\epsilon` the relative ``tolerance`` and
    :math:`\mathrm{SE}_{kt}` the standard error of the paired per-sample difference between :math:`k` and the
    best teacher (``standard_errors``; 0 where not given). A small validation split thus drops a teacher only
    when the evidence is clear. The best teacher comes first, the others in their order.

    Example:
        >>> trusted_teachers({"left": {"left": 0.90, "multitask": 0.94}}, {"left": True}, tolerance=0.01)
        {'left': ['multitask']}
        >>> trusted_teachers({"left": {"left": 0.90, "multitask": 0.94}}, {"left": True}, 0.0, {"left": {"left": 0.03}})
        {'left': ['multitask', 'left']}
    """
    choice = {}
    for task, by_teacher in scores.items():
        if not by_teacher:
            continue
        sign = 1.0 if higher_is_better[task] else -1.0
        best_name = max(by_teacher, key=lambda name: sign * by_teacher[name])
        best = by_teacher[best_name]
        errors = (standard_errors or {}).get(task, {})
        kept = [
            name
            for name, score in by_teacher.items()
            if name != best_name and sign * (best - score) <= tolerance * abs(best) + z * errors.get(name, 0.0)
        ]
        choice[task] = [best_name, *kept]
    return choice


class TeacherTrust(L.Callback):
    """Choose, per task, the teachers a multi-teacher strategy distils from, by their scores on validation data.

    At ``setup`` of a fit (before the strategy sets up its feature hints and fusion gates, so these follow the
    choice), every teacher runs once over the validation loader; per task, a teacher is dropped only when it
    is clearly worse than the best one: by more than ``tolerance`` (relative) plus ``z`` standard errors of
    their paired per-sample difference (:meth:`~lightning_mtkd.tasks.Task.per_sample_score`: correct or not
    for classification, absolute error for regression, a per-sample stand-in for multi-label and dense
    metrics; :func:`trusted_teachers`). The choice goes to the module's ``trust_teachers``. A module
    without that method (one teacher per task) is left as it is. The scores and the choice are kept in
    :attr:`scores` and :attr:`choice`, printed, logged to the loggers (``trust/<task>/<teacher>``: the
    teacher's score, ``trust/<task>/<teacher>_kept``: 1 or 0) and saved in the checkpoint (the callback's state
    and ``checkpoint["teacher_trust"]``). The choice is a deterministic function of the frozen teachers and
    the validation data, so every DDP rank (each reads the whole validation loader here) and a resumed run
    make the same one; a resumed run whose choice differs from the checkpoint's is warned about.

    TaskSpecificDistiller and FusionDistiller add this callback themselves (``teacher_trust=True``, their
    default); add it to the trainer yourself to change its settings.

    Args:
        tolerance: Relative margin within which a teacher counts as good as the best one, on top of the
            statistical one (0.005: half a point of a 95 % accuracy); a large value keeps every teacher.
        z: How many standard errors of the paired difference a teacher must fall short by to be dropped
            (2: about 98 % one-sided confidence that it is worse). 0 with ``tolerance=0`` keeps only the best.
        max_batches: Validation batches read to score the teachers (``None``: all).

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_mtkd.callbacks.TeacherTrust
              init_args: {tolerance: 0.0, z: 2.0}
    """

    def __init__(self, tolerance: float = 0.0, z: float = 2.0, max_batches: int | None = None) -> None:
        if not (tolerance >= 0 and math.isfinite(tolerance)):
            raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}.")
        if not (z >= 0 and math.isfinite(z)):
            raise ValueError(f"z must be a finite number of standard errors >= 0, got {z}.")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 (or None for the whole split), got {max_batches}.")
        self.tolerance = float(tolerance)
        self.z = float(z)
        self.max_batches = max_batches
        #: ``{task: {teacher: validation score}}`` (the task's primary metric).
        self.scores: dict[str, dict[str, float]] = {}
        #: ``{task: {teacher: standard error of its paired difference with the task's best teacher}}``.
        self.standard_errors: dict[str, dict[str, float]] = {}
        #: ``{task: [trusted teachers, best first]}``.
        self.choice: dict[str, list[str]] = {}
        self._restored: dict[str, list[str]] | None = None

    # ------------------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        if stage != "fit" or not hasattr(pl_module, "trust_teachers"):
            return
        loader = _val_loader(trainer)
        if loader is None:
            rank_zero_warn("TeacherTrust: no validation loader, so every teacher is trusted. Give a val split.")
            return
        self.scores = self.score_teachers(pl_module, loader)
        higher = {task: pl_module.tasks[task].higher_is_better for task in self.scores}
        self.standard_errors = self._paired_errors(higher)
        self.choice = trusted_teachers(self.scores, higher, self.tolerance, self.standard_errors, self.z)
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
        return {"scores": self.scores, "choice": self.choice, "tolerance": self.tolerance, "z": self.z}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = {task: list(names) for task, names in state_dict.get("choice", {}).items()}

    # ------------------------------------------------------------------------------ scoring
    def _paired_errors(self, higher: Mapping[str, bool]) -> dict[str, dict[str, float]]:
        """Per task and teacher, the standard error of its per-sample difference with the best teacher's."""
        errors: dict[str, dict[str, float]] = {}
        for task, by_teacher in getattr(self, "_per_sample", {}).items():
            sign = 1.0 if higher[task] else -1.0
            best = max(self.scores[task], key=lambda name: sign * self.scores[task][name])
            if best not in by_teacher:
                continue
            reference = torch.cat(by_teacher[best])
            for name, values in by_teacher.items():
                difference = torch.cat(values) - reference
                difference = difference[~difference.isnan()]
                count = len(difference)
                errors.setdefault(task, {})[name] = float(difference.std() / math.sqrt(count)) if count > 1 else 0.0
        return errors

    @torch.no_grad()
    def score_teachers(self, module: Any, loader: DataLoader) -> dict[str, dict[str, float]]:
        """``{task: {teacher: score}}``: each teacher's primary metric on each task it outputs, over ``loader``."""
        teachers = module.teachers
        if not teachers.activate(needed=True):
            return {}
        metrics: dict[str, dict[str, Any]] = {}
        self._per_sample: dict[str, dict[str, list[torch.Tensor]]] = {}
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
                    # NaN for missing labels keeps every teacher's values aligned sample by sample (paired).
                    values = task.per_sample_score(output, batch["targets"][task_name])
                    self._per_sample.setdefault(task_name, {}).setdefault(name, []).append(values.cpu())
        return {
            task: {name: float(metric.compute()) for name, metric in by_teacher.items()}
            for task, by_teacher in metrics.items()
        }


def _val_loader(trainer: L.Trainer) -> Any:
    """The fit's validation loader, before the validation loop has loaded it (``None`` if there is none)."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "val_dataloader"):
        try:
            return datamodule.val_dataloader()
        except (NotImplementedError, ValueError):
            return None
    source = trainer.fit_loop.epoch_loop.val_loop._data_source  # plain loaders passed to fit (no public accessor)
    return source.dataloader() if source.is_defined() else None
