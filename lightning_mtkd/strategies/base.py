"""The two base LightningModules and the one shared step every strategy goes through.

``MultiTaskModule`` trains one multi-task network from labels (teachers, scratch baselines).
``DistillationModule`` adds frozen teacher(s); a strategy overrides :meth:`distillation_loss`
(and, if it needs trainable adaptors, :meth:`adaptor_specs`) and nothing else.

The shared step, in order:

1. teacher outputs and hooked features, under ``torch.inference_mode()`` — before the student,
   so the allocator reuses the teacher's freed activations (~15% faster on CPU, see
   ``shared/MEASUREMENTS.md``);
2. student outputs and hooked features;
3. per-task supervised losses, masked for missing labels (or, with ``pseudo_label_missing``, with the
   teacher's prediction standing in for them while training);
4. ``distillation_loss(...)`` → named terms (``"kd/left"``, ``"hint"``);
5. the weighting plug-in turns them into the total;
6. torchmetrics per stage and task, logged as ``stage/task/metric``.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection

from lightning_mtkd.config import build_module, class_path, hparams_from_locals
from lightning_mtkd.data.base import merge_task_batches
from lightning_mtkd.models.adaptors import Adaptor
from lightning_mtkd.models.hooks import FeatureTap
from lightning_mtkd.tasks import Task, as_tasks
from lightning_mtkd.weighting.base import StaticWeighting, Weighting

STAGES = ("train", "val", "test")

#: The name under which a single teacher is kept.
TEACHER = "teacher"

#: What a student's checkpoint records for a teacher that was given as a module (its weights are never saved).
UNSAVED_TEACHER = "<teacher given as a module: not saved>"


@dataclass
class ModelOutputs:
    """What one forward pass of a teacher or the student produced."""

    outputs: dict[str, Tensor]
    features: dict[str, Any] = field(default_factory=dict)


class TeacherOutputSource(Protocol):
    """Something that can stand in for the teachers' forward pass (the teacher-output cache)."""

    def teacher_outputs(self, module: DistillationModule, batch: Mapping[str, Any]) -> dict[str, ModelOutputs]:
        """The teachers' outputs for ``batch``; may call ``module.run_teachers(batch)`` for what it lacks."""
        ...


def _save_config_hparams(module: L.LightningModule, local_vars: dict[str, Any]) -> None:
    """Store hyper-parameters as LightningCLI would (plain config dicts) so checkpoints reload anywhere.

    Under LightningCLI the parsed config is given to ``save_hyperparameters`` already; from Python
    the constructor's arguments are turned into the same form (see :mod:`lightning_mtkd.config`).
    """
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    if _given_hyperparameters.get() is not None:
        module.save_hyperparameters()
    else:
        module.save_hyperparameters(hparams_from_locals(module, local_vars))


def _as_module(value: nn.Module | dict, role: str) -> nn.Module:
    if isinstance(value, nn.Module):
        return value
    if isinstance(value, dict) and "class_path" in value:
        return build_module(value)
    raise ValueError(
        f"{role}: this checkpoint does not record how to build the {role} (it was a module without a recorded "
        f"config). Pass it explicitly, e.g. `load_from_checkpoint(path, {role}=my_model)`."
    )


class MultiTaskModule(L.LightningModule):
    """Plain multi-task training from labels alone: trains teachers and the scratch baselines.

    Args:
        model: Any ``nn.Module`` whose forward returns ``{task_name: Tensor}``.
        tasks: The tasks to train; each needs a key in the model's output and in the batch's ``targets``.
        weighting: How task losses are combined (default :class:`StaticWeighting`, ``Task.weight``).
        optimizer: Optimizer factory, called with the parameter groups.
        scheduler: Optional LR-scheduler factory (stepped per epoch, monitoring ``val/loss``).

    Batches are dicts ``{"input": Tensor, "targets": {task: Tensor}, "index": LongTensor}``.

    YAML::

        model:
          class_path: lightning_mtkd.MultiTaskModule
          init_args:
            model: {class_path: lightning_mtkd.models.MultiTaskNet, init_args: {...}}
            tasks: [{name: left, num_classes: 10}, {name: right, num_classes: 10}]
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: list[Task],
        weighting: Weighting | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        _save_config_hparams(self, locals())
        self._init_shared(model, tasks, weighting, optimizer, scheduler)

    def _init_shared(
        self,
        model: nn.Module | dict,
        tasks: list[Task],
        weighting: Weighting | None,
        optimizer: OptimizerCallable,
        scheduler: LRSchedulerCallable | None,
    ) -> None:
        self.tasks: dict[str, Task] = as_tasks(tasks)
        self.model = _as_module(model, "model")
        self.weighting = weighting if weighting is not None else StaticWeighting()
        self.weighting.setup_tasks(self.tasks)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        for stage in STAGES:
            setattr(self, f"{stage}_metrics", self._make_metrics(stage))
        self.student_feature_paths: list[str] = []
        self._student_tap: FeatureTap | None = None
        self._checked_stages: set[str] = set()

    def _make_metrics(self, stage: str, who: str = "") -> nn.ModuleDict:
        return nn.ModuleDict(
            {
                name: MetricCollection(task.make_metrics(), prefix=f"{stage}/{name}/{who}")
                for name, task in self.tasks.items()
            }
        )

    # ------------------------------------------------------------------------------ forward passes
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.model(x)

    def student_forward(self, inputs: Tensor) -> ModelOutputs:
        """The student's outputs (checked against the tasks) and the features its taps recorded."""
        if self._student_tap is None and self.student_feature_paths:
            self._student_tap = FeatureTap(self.model, self.student_feature_paths, owner="student")
        outputs = self._task_outputs(self.model(inputs), "student")
        features = self._student_tap.pop() if self._student_tap is not None else {}
        return ModelOutputs(outputs, features)

    def teacher_forward(self, batch: Mapping[str, Any]) -> dict[str, ModelOutputs]:
        """Outputs of every teacher, by teacher name; none without a teacher."""
        return {}

    def _task_outputs(self, output: Any, who: str, required: bool = True, task: str | None = None) -> dict[str, Tensor]:
        if isinstance(output, Tensor):
            if task in self.tasks:  # a single-task teacher named after its task
                return {task: output}
            raise TypeError(
                f"{who} returned a bare Tensor of shape {tuple(output.shape)}, but multi-task models must return "
                f"dict[task_name, Tensor] with keys {list(self.tasks)} (a single-task teacher may return a Tensor if "
                "it is named after its task)."
            )
        if not isinstance(output, Mapping):
            raise TypeError(f"{who} returned {type(output).__name__}; it must return dict[task_name, Tensor].")
        if required:
            missing = [name for name in self.tasks if name not in output]
            if missing:
                raise KeyError(
                    f"{who} outputs no {missing} (it outputs {list(output)}). Every task in `tasks` needs a head of "
                    "that name in the model."
                )
        return dict(output)

    # ------------------------------------------------------------------------------ the shared step
    def shared_step(self, batch: Mapping[str, Any], stage: str) -> dict[str, Tensor]:
        """One step for any stage; returns ``{"loss": total, **named terms}``."""
        batch = merge_task_batches(batch, self.tasks)  # one data set per task: a CombinedLoader's dict of batches
        inputs, targets = self._unpack(batch)
        teachers = self.teacher_forward(batch)
        student = self.student_forward(inputs)
        if stage not in self._checked_stages:
            self._check_batch(student, teachers, targets)
            self._checked_stages.add(stage)

        # Losses may train on stand-ins for missing labels (pseudo-labels); metrics always use the real labels.
        supervised = self.supervision_targets(stage, targets, teachers)
        task_losses = {
            name: task.supervised_loss(student.outputs[name], supervised[name]) for name, task in self.tasks.items()
        }
        distill_terms = self.distillation_loss(student, teachers, batch) if teachers else {}
        loss = self.weighting.combine(task_losses, distill_terms, self.distillation_alpha if teachers else 0.0)

        self._update_metrics(stage, student, teachers, targets)
        self._log_terms(stage, loss, task_losses, distill_terms, batch_size=inputs.shape[0])
        # Kept for callbacks that act between backward and the optimizer step (NonFiniteLossGuard).
        self.step_terms = {
            "loss": loss,
            **{f"{name}/loss": value for name, value in task_losses.items()},
            **distill_terms,
        }
        return self.step_terms

    def distillation_loss(
        self, student: ModelOutputs, teachers: dict[str, ModelOutputs], batch: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        """The strategy's hook: named distillation terms (``"kd/<task>"`` per task, ``"<name>"`` shared)."""
        return {}

    distillation_alpha: float = 0.0

    def supervision_targets(
        self, stage: str, targets: Mapping[str, Tensor], teachers: Mapping[str, ModelOutputs]
    ) -> Mapping[str, Tensor]:
        """The targets the supervised losses train on (default: the labels as they are)."""
        return targets

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Tensor]:
        return self.shared_step(batch, "train")

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Tensor]:
        return self.shared_step(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Tensor]:
        return self.shared_step(batch, "test")

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Tensor]:
        inputs = batch["input"] if isinstance(batch, Mapping) else batch
        return self._task_outputs(self.model(inputs), "student")

    # ------------------------------------------------------------------------------ checks
    def _unpack(self, batch: Mapping[str, Any]) -> tuple[Tensor, Mapping[str, Tensor]]:
        if not isinstance(batch, Mapping) or "input" not in batch or "targets" not in batch:
            keys = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise KeyError(
                f"a batch must be a dict with 'input' and 'targets' (and 'index'); got {keys}. "
                "Wrap your dataset with lightning_mtkd.data.MultiTaskDataset or return that dict."
            )
        targets = batch["targets"]
        missing = [name for name in self.tasks if name not in targets]
        if missing:
            raise KeyError(
                f"the batch has no target for task(s) {missing} (it has {list(targets)}). Give every task a target; "
                "mark a missing label with the task's ignore value (-100, or NaN for regression)."
            )
        return batch["input"], targets

    def _check_batch(
        self, student: ModelOutputs, teachers: Mapping[str, ModelOutputs], targets: Mapping[str, Tensor]
    ) -> None:
        """First batch of each stage: labels fit their tasks, and teachers cover what the strategy needs."""
        for name, task in self.tasks.items():
            task.check_target(student.outputs[name], targets[name])
        if teachers:
            self.check_teacher_outputs(teachers)

    def check_teacher_outputs(self, teachers: Mapping[str, ModelOutputs]) -> None:
        """Raise if the teachers' outputs cannot serve this strategy (default: no check)."""

    # ------------------------------------------------------------------------------ metrics and logs
    def _update_metrics(
        self,
        stage: str,
        student: ModelOutputs,
        teachers: dict[str, ModelOutputs],
        targets: Mapping[str, Tensor],
    ) -> None:
        metrics: nn.ModuleDict = getattr(self, f"{stage}_metrics")
        for name, task in self.tasks.items():
            metrics[name].update(*task.metric_inputs(student.outputs[name].detach(), targets[name]))
            self.log_dict(metrics[name], on_step=False, on_epoch=True)

    def _log_terms(
        self,
        stage: str,
        loss: Tensor,
        task_losses: Mapping[str, Tensor],
        distill_terms: Mapping[str, Tensor],
        batch_size: int,
    ) -> None:
        on_step = stage == "train"
        # Evaluation losses are averaged over all ranks at epoch end (one reduction, not one per step).
        sync = stage != "train"
        self.log(
            f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=batch_size, sync_dist=sync
        )
        named = {f"{stage}/{name}/loss": value for name, value in task_losses.items()}
        for term, value in distill_terms.items():
            kind, _, task = term.partition("/")
            named[f"{stage}/{task}/{kind}" if task else f"{stage}/{kind}"] = value
        self.log_dict(named, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=sync)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        written_by = checkpoint.get("hyper_parameters", {}).get("_class_path")
        if written_by and not _is_subclass_of(type(self), written_by):
            raise ValueError(
                f"this checkpoint was written by {written_by}, but it is being loaded into {class_path(self)}. Load it "
                f"with the class that wrote it (`{written_by.rsplit('.', 1)[-1]}.load_from_checkpoint`, or the config "
                "it was trained with), or start a new fit without `ckpt_path`."
            )

    def on_fit_start(self) -> None:
        self.weighting.attach(self)

    def on_train_epoch_end(self) -> None:
        self.weighting.on_train_epoch_end()
        weights = self.weighting.current_weights()
        if weights:
            self.log_dict({f"train/{task}/weight": w for task, w in weights.items()})

    # ------------------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameter groups: the model, then any trainable weighting state."""
        groups = [{"params": list(self.model.parameters()), "name": "model"}]
        weighting = [p for p in self.weighting.parameters() if p.requires_grad]
        if weighting:
            groups.append({"params": weighting, "name": "weighting"})
        return groups

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.param_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss"}}


class DistillationModule(MultiTaskModule):
    """Multi-task training with frozen teacher(s): the shared step every distillation strategy uses.

    Teacher hygiene lives here, once: teachers are frozen (``requires_grad=False``), in eval mode
    whatever ``train()`` is called with, run under ``torch.inference_mode()``, not in the optimizer
    and not in the checkpoint — they are kept outside the module tree (moved along with it by
    :meth:`_apply`) and reloaded from their own checkpoint path. A teacher's per-task metrics are
    logged beside the student's in every validation and test epoch (``val/left/teacher_acc``),
    from the outputs the step computes anyway.

    By default the distillation term is per-task soft-target KD (Hinton et al., 2015) from each
    task's teacher; strategies override :meth:`distillation_loss` and :meth:`adaptor_specs`.

    Args:
        student: The network being trained; forward returns ``{task: Tensor}``.
        teacher: A module, a path to a ``MultiTaskModule`` checkpoint, or a dict ``{name: module or path}``
            of several teachers (a single-task teacher named after its task may return a bare Tensor).
        tasks: The tasks.
        temperature: Softmax temperature ``T`` of the soft targets (> 0).
        alpha: Weight of distillation against supervision, in [0, 1]:
            ``(1 - alpha) · task loss + alpha · distillation terms``.
        adaptor_lr: Learning rate of the adaptors' parameter group (the optimizer's own if ``None``).
        weighting: Task-weighting plug-in.
        optimizer: Optimizer factory, called with the parameter groups.
        scheduler: Optional LR-scheduler factory.
        pseudo_label_missing: While training, let the teacher's prediction (``Task.pseudo_label``: its
            argmax, ``sigmoid > 0.5``, or its value) stand in for each missing label in the supervised
            losses, so unlabelled samples also get a hard target. Metrics keep the real labels only;
            evaluation is unchanged. Every strategy accepts it.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | str | dict[str, nn.Module | str | None] | None,
        tasks: list[Task],
        temperature: float = 4.0,
        alpha: float = 0.5,
        adaptor_lr: float | None = None,
        weighting: Weighting | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        pseudo_label_missing: bool = False,
    ) -> None:
        super().__init__(student, tasks, weighting, optimizer, scheduler)
        _save_config_hparams(self, {**locals(), "teacher": teacher_config(teacher)})
        self._init_distillation(teacher, temperature, alpha, adaptor_lr, pseudo_label_missing)

    def _init_distillation(
        self,
        teacher: nn.Module | str | dict[str, nn.Module | str | None] | None,
        temperature: float,
        alpha: float,
        adaptor_lr: float | None,
        pseudo_label_missing: bool = False,
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (soft targets are softmax(z / T)), got {temperature}.")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1] (the share of the distillation terms), got {alpha}.")
        if adaptor_lr is not None and adaptor_lr <= 0:
            raise ValueError(f"adaptor_lr must be > 0, got {adaptor_lr}.")
        if not isinstance(pseudo_label_missing, bool):
            raise TypeError(f"pseudo_label_missing must be True or False, got {pseudo_label_missing!r}.")
        self.temperature = float(temperature)
        self.distillation_alpha = float(alpha)
        self.pseudo_label_missing = pseudo_label_missing
        self.adaptor_lr = adaptor_lr
        if isinstance(teacher, dict) and not teacher:
            raise ValueError("no teacher given: pass `teacher=` (a module, a checkpoint path, or a dict of them).")
        # None: loaded from a checkpoint whose teacher was a module; needed only to train or evaluate against it.
        sources = teacher if isinstance(teacher, dict) else {TEACHER: teacher}
        for name, source in sources.items():
            if isinstance(source, str) and not source:
                raise ValueError(f"teacher {name!r}: empty checkpoint path.")
        # Plain dict attributes: not submodules, so never in state_dict(), parameters() or DDP's sync.
        self._teacher_sources: dict[str, nn.Module | str | None] = dict(sources)
        self._teachers: dict[str, nn.Module] = {}
        self._teacher_taps: dict[str, FeatureTap] = {}
        self._use_teachers = True  # set per stage by setup()
        self.teacher_feature_paths: dict[str, list[str]] = {}
        self.adaptors = nn.ModuleDict()
        for stage in ("val", "test"):
            setattr(self, f"{stage}_teacher_metrics", self._make_metrics(stage, who="teacher_"))

    # ------------------------------------------------------------------------------ teachers
    @property
    def teachers(self) -> dict[str, nn.Module]:
        """The frozen teachers by name, loaded (from checkpoint paths) on first use."""
        for name, source in self._teacher_sources.items():
            if name not in self._teachers:
                self._teachers[name] = self._prepare_teacher(name, source)
        return self._teachers

    @property
    def teacher(self) -> nn.Module:
        """The single teacher (strategies with one teacher)."""
        return self.teachers[TEACHER]

    def _prepare_teacher(self, name: str, source: nn.Module | str | None) -> nn.Module:
        if source is None or source == UNSAVED_TEACHER:
            raise RuntimeError(
                f"teacher {name!r} is not available: this module was loaded from a checkpoint of a teacher given as "
                "a module. Pass `teacher=` (a module or checkpoint path) to train or evaluate against it."
            )
        module = load_teacher(source, name) if isinstance(source, str) else source
        module.eval()
        module.requires_grad_(False)
        try:
            device = next(self.model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        return module.to(device)

    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        for teacher in self._teachers.values():  # teachers never leave eval mode
            teacher.eval()
        return self

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> DistillationModule:
        super()._apply(fn, *args, **kwargs)
        for teacher in self._teachers.values():  # move along with the module (.to(), .cuda(), .half())
            teacher._apply(fn, *args, **kwargs)
        return self

    #: Where teacher outputs may come from instead of a forward pass: set by the
    #: :class:`~lightning_mtkd.callbacks.TeacherCache` callback; ``None`` runs the teachers every step.
    teacher_cache: TeacherOutputSource | None = None

    def teacher_forward(self, batch: Mapping[str, Any]) -> dict[str, ModelOutputs]:
        """Every teacher's outputs and tapped features: from the teacher cache if one is attached, else computed."""
        if self.teacher_cache is not None:
            return self.teacher_cache.teacher_outputs(self, batch)
        return self.run_teachers(batch)

    def run_teachers(self, batch: Mapping[str, Any]) -> dict[str, ModelOutputs]:
        """Every teacher's outputs and tapped features, computed under ``torch.inference_mode()``."""
        results: dict[str, ModelOutputs] = {}
        if not self._use_teachers:
            return results
        with torch.inference_mode():
            raw = {
                name: (teacher(batch["input"]), self._pop_teacher_features(name))
                for name, teacher in self.teachers.items()
            }
        for name, (output, features) in raw.items():
            # Inference tensors cannot be saved for backward; a clone outside inference mode can (cheap:
            # logits and a few feature maps).
            outputs = self._task_outputs(output, f"teacher {name!r}", required=False, task=name)
            results[name] = ModelOutputs(_clone_tree(outputs), _clone_tree(features))
        return results

    def _pop_teacher_features(self, name: str) -> dict[str, Any]:
        tap = self._teacher_taps.get(name)
        return tap.pop() if tap is not None else {}

    #: Strategies that distil every task from one multi-task teacher (named ``TEACHER``) set this.
    requires_multitask_teacher: bool = False

    def check_teacher_outputs(self, teachers: Mapping[str, ModelOutputs]) -> None:
        """Every task must be output by at least one teacher (by *the* teacher if one multi-task teacher is needed)."""
        if self.requires_multitask_teacher:
            produced = list(teachers[TEACHER].outputs)
            missing = [name for name in self.tasks if name not in produced]
            if missing:
                raise KeyError(
                    f"the teacher outputs no {missing} (it outputs {produced}). {type(self).__name__} needs a "
                    "multi-task teacher trained on every task in `tasks`."
                )
            return
        for name in self.tasks:
            if self.teacher_for_task(teachers, name) is None:
                produced = {teacher: list(out.outputs) for teacher, out in teachers.items()}
                raise KeyError(
                    f"no teacher outputs task {name!r} (teachers output {produced}). Use a teacher trained on "
                    f"{name!r}, or remove the task from `tasks`."
                )

    def teacher_for_task(self, teachers: Mapping[str, ModelOutputs], task: str) -> ModelOutputs | None:
        """The outputs of the teacher that covers ``task``: the one named after it, else the first that outputs it."""
        if task in teachers and task in teachers[task].outputs:
            return teachers[task]
        return next((out for out in teachers.values() if task in out.outputs), None)

    def supervision_targets(
        self, stage: str, targets: Mapping[str, Tensor], teachers: Mapping[str, ModelOutputs]
    ) -> Mapping[str, Tensor]:
        r"""With ``pseudo_label_missing``, while training: each task's missing labels replaced by its teacher's
        pseudo-label (:meth:`Task.fill_missing`), so the supervised loss of task :math:`t` is

        .. math::
            \mathcal{L}^{sup}_t = \frac{1}{B}\sum_b \ell\big(z^s_{tb},\ y_{tb}\ \text{if present, else}\
            \hat y(z^{\tau(t)}_{tb})\big)

        with :math:`\tau(t)` the task's teacher (:meth:`teacher_for_task`). Without the flag, outside
        training, or without teachers (a student evaluated alone) the labels are returned unchanged.
        """
        if not (self.pseudo_label_missing and stage == "train" and teachers):
            return targets
        filled = dict(targets)
        for name, task in self.tasks.items():
            teacher = self.teacher_for_task(teachers, name)
            if teacher is not None:
                filled[name] = task.fill_missing(targets[name], teacher.outputs[name])
        return filled

    # ------------------------------------------------------------------------------ the strategy hooks
    def distillation_loss(
        self, student: ModelOutputs, teachers: dict[str, ModelOutputs], batch: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        return self.soft_target_terms(student, teachers)

    def soft_target_terms(self, student: ModelOutputs, teachers: Mapping[str, ModelOutputs]) -> dict[str, Tensor]:
        """``{"kd/<task>": soft-target loss}`` for every task some teacher covers."""
        terms = {}
        for name, task in self.tasks.items():
            teacher = self.teacher_for_task(teachers, name)
            if teacher is not None:
                terms[f"kd/{name}"] = task.distillation_loss(
                    student.outputs[name], teacher.outputs[name], self.temperature
                )
        return terms

    def adaptor_specs(self) -> dict[str, tuple[str, str, str]]:
        """Adaptors to build: ``{adaptor_name: (student_feature_path, teacher_name, teacher_feature_path)}``.

        Each is sized from a dry run at ``setup`` and trained in its own parameter group.
        """
        return {}

    # ------------------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        # Fitting needs the teachers (a missing one is an error); evaluating uses them when they are there:
        # a student checkpoint tests and predicts on its own.
        self._use_teachers = stage == "fit" or (stage in ("validate", "test") and self._teachers_loadable())
        if not self._use_teachers:
            return
        specs = self.adaptor_specs()
        # Paths a strategy asked for itself (attention maps) plus those its adaptors read.
        self.student_feature_paths = sorted({*self.student_feature_paths, *(path for path, _, _ in specs.values())})
        for name, paths in self._teacher_paths(specs).items():
            if name not in self._teacher_taps:
                self._teacher_taps[name] = FeatureTap(self.teachers[name], paths, owner=f"teacher {name!r}")
        missing = [name for name in specs if name not in self.adaptors]
        if missing:
            self._build_adaptors(missing, specs)

    def _teacher_paths(self, specs: Mapping[str, tuple[str, str, str]]) -> dict[str, list[str]]:
        paths: dict[str, list[str]] = {name: list(extra) for name, extra in self.teacher_feature_paths.items()}
        for _, teacher, teacher_path in specs.values():
            if teacher not in self._teacher_sources:
                raise KeyError(
                    f"adaptor refers to teacher {teacher!r}, but the teachers are {list(self._teacher_sources)}."
                )
            paths.setdefault(teacher, []).append(teacher_path)
        return paths

    def _teachers_loadable(self) -> bool:
        for name, source in self._teacher_sources.items():
            if source is None or source == UNSAVED_TEACHER or (isinstance(source, str) and not os.path.exists(source)):
                warnings.warn(
                    f"teacher {name!r} is not available ({source!r}); evaluating the student alone.", stacklevel=2
                )
                return False
        return True

    def _build_adaptors(self, names: list[str], specs: Mapping[str, tuple[str, str, str]]) -> None:
        """Size adaptors from one dry run of the student and the teachers on two example inputs."""
        example = self._example_input()
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            student = self.student_forward(example)
            teachers = self.teacher_forward({"input": example})
        self.model.train(was_training)
        for name in names:
            student_path, teacher, teacher_path = specs[name]
            self.adaptors[name] = Adaptor.between(
                _feature_tensor(student.features[student_path]).shape,
                _feature_tensor(teachers[teacher].features[teacher_path]).shape,
                name=f"adaptor {name!r} (student {student_path!r} → teacher {teacher!r} {teacher_path!r})",
            ).to(example.device)

    def _example_input(self) -> Tensor:
        if isinstance(self.example_input_array, Tensor):
            example = self.example_input_array
        else:
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            if datamodule is None:
                raise RuntimeError(
                    "adaptors are sized from a dry run on an example input: use a LightningDataModule, or set "
                    "`module.example_input_array` to a batch of inputs before fitting."
                )
            batch = next(iter(datamodule.train_dataloader()))
            batch = batch[0] if isinstance(batch, tuple) else batch  # a CombinedLoader yields (batch, idx, loader)
            example = merge_task_batches(batch, self.tasks)["input"]
        device = next(self.model.parameters()).device
        return example[:2].to(device)

    def load_state_dict(self, state_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        # Adaptors are sized by a dry run when fitting; a state dict alone (load_from_checkpoint, the weights
        # ddp_spawn hands back to the main process) rebuilds any that this module has not built yet.
        for key in state_dict:
            if key.startswith("adaptors.") and key.endswith(".proj.weight"):
                name = key[len("adaptors.") : -len(".proj.weight")]
                if name not in self.adaptors:
                    self.adaptors[name] = Adaptor.from_state(dict(state_dict), f"adaptors.{name}.")
        return super().load_state_dict(state_dict, *args, **kwargs)

    # ------------------------------------------------------------------------------ optimisation, metrics
    def param_groups(self) -> list[dict[str, Any]]:
        groups = super().param_groups()
        adaptor_params = list(self.adaptors.parameters())
        if adaptor_params:
            group: dict[str, Any] = {"params": adaptor_params, "name": "adaptors"}
            if self.adaptor_lr is not None:
                group["lr"] = self.adaptor_lr
            groups.append(group)
        return groups

    def _update_metrics(
        self,
        stage: str,
        student: ModelOutputs,
        teachers: dict[str, ModelOutputs],
        targets: Mapping[str, Tensor],
    ) -> None:
        super()._update_metrics(stage, student, teachers, targets)
        if stage == "train" or not teachers:
            return
        metrics: nn.ModuleDict = getattr(self, f"{stage}_teacher_metrics")
        for name, task in self.tasks.items():
            teacher = self.teacher_for_task(teachers, name)
            if teacher is not None:
                metrics[name].update(*task.metric_inputs(teacher.outputs[name], targets[name]))
                self.log_dict(metrics[name], on_step=False, on_epoch=True)


def check_hint(hint_weight: float, student_feature: str | None, teacher_feature: str | None) -> None:
    """Validate a strategy's feature-hint settings (shared by the strategies that have a hint term)."""
    if hint_weight < 0:
        raise ValueError(f"hint_weight must be >= 0, got {hint_weight}.")
    if hint_weight > 0 and not (student_feature and teacher_feature):
        raise ValueError("the hint needs `student_feature` and `teacher_feature` paths (or set hint_weight=0).")


def teacher_config(teacher: Any) -> Any:
    """A teacher as stored in hyper-parameters: checkpoint paths kept, modules dropped.

    A module's weights must never enter the student's checkpoint, and rebuilding its architecture
    alone would give a random teacher, so a teacher given as a module is recorded as :data:`UNSAVED_TEACHER`
    (not ``None``: jsonargparse treats a null required argument as missing when the checkpoint reloads).
    """
    if isinstance(teacher, dict):
        return {name: teacher_config(value) for name, value in teacher.items()}
    return teacher if isinstance(teacher, str) else UNSAVED_TEACHER


def load_module(path: str, role: str = "checkpoint") -> MultiTaskModule:
    """The lightning-mtkd module saved at ``path`` (its own class, hyper-parameters and weights; no teacher loaded).

    Loads through the class recorded in the checkpoint: Lightning filters hyper-parameters by the
    signature of the class it is called on, so ``MultiTaskModule.load_from_checkpoint`` would drop a
    strategy's own arguments.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{role}: checkpoint {path!r} does not exist. Train it first (e.g. "
            "`lightning-mtkd fit --config configs/multimnist/teacher.yaml`) or fix the path."
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    recorded = checkpoint.get("hyper_parameters", {}).get("_class_path")
    if "state_dict" not in checkpoint or recorded is None:
        raise ValueError(
            f"{role}: {path!r} is not a lightning-mtkd checkpoint (no state_dict or module class); give a "
            "checkpoint written by MultiTaskModule or a distillation strategy, or pass the network as a module."
        )
    module_path, _, name = recorded.rpartition(".")
    cls = getattr(importlib.import_module(module_path), name, None)
    if not (isinstance(cls, type) and issubclass(cls, MultiTaskModule)):
        raise ValueError(f"{role}: {path!r} records class {recorded!r}, which is not a lightning-mtkd module.")
    return cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)


def load_teacher(path: str, name: str = TEACHER) -> nn.Module:
    """The network inside a ``MultiTaskModule`` (or distilled student) checkpoint, to be frozen for teaching."""
    return load_module(path, role=f"teacher {name!r}").model


def _is_subclass_of(cls: type, path: str) -> bool:
    """Whether ``cls`` is the class recorded at ``path`` (any import path of it) or a user's subclass of it.

    A checkpoint of a base module (a teacher or scratch run) does not resume into a distillation strategy.
    """
    module_path, _, name = path.rpartition(".")
    try:
        recorded = getattr(importlib.import_module(module_path), name)
    except (ImportError, AttributeError, ValueError):
        return False
    if recorded in (MultiTaskModule, DistillationModule):
        return cls is recorded
    return isinstance(recorded, type) and issubclass(cls, recorded)


def _feature_tensor(feature: Any) -> Tensor:
    return feature[0] if isinstance(feature, (tuple, list)) else feature


def _clone_tree(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone_tree(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_clone_tree(v) for v in value)
    return value
