r"""The template every strategy fills in: ``MultiTaskModule`` and the one shared step.

``MultiTaskModule`` trains one multi-task network from labels alone (teachers, scratch baselines) and runs
the step every strategy shares; :class:`~lightning_mtkd.strategies.distillation.DistillationModule` (its
own file) adds the frozen teachers and the hooks a strategy overrides.

The shared step, in order:

1. teacher outputs and hooked features, under ``torch.inference_mode()`` — before the student, so
   the allocator reuses the teacher's freed activations (~15% faster on CPU, measured);
2. student outputs and hooked features;
3. ``teacher_targets`` → the per-task teacher outputs (also the teacher's logged metrics, and the
   pseudo-labels of ``pseudo_label_missing``);
4. per-task supervised losses, masked for missing labels;
5. ``distillation_loss`` → named terms (``"kd/left"``, ``"hint"``);
6. the weighting plug-in turns them into the total;
7. torchmetrics per stage and task, logged as ``stage/task/metric``.

Without teachers (this class) steps 1, 3 and 5 are empty.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtkd.bookkeeping import TaskMetrics
from lightning_mtkd.checkpoints import (
    CLASS_KEY,
    as_module,
    check_checkpoint_class,
    exposed_parameters,
    save_init_arguments,
    upgrade_state_dict,
)
from lightning_mtkd.config import build_callable, class_path
from lightning_mtkd.inputs import batch_size, call_model
from lightning_mtkd.models.hooks import FeatureTap
from lightning_mtkd.strategies.checks import check_batch
from lightning_mtkd.strategies.step import (
    FeaturePair,
    HintDistance,
    ModelOutputs,
    Step,
)
from lightning_mtkd.task_groups import TaskGroups
from lightning_mtkd.tasks import Task, as_tasks
from lightning_mtkd.weighting.base import StaticWeighting, Weighting

STAGES = ("train", "val", "test")

# The step's types live in strategies/step.py; strategies import them from here too.
__all__ = ["FeaturePair", "HintDistance", "ModelOutputs", "MultiTaskModule", "Step", "STAGES"]


class MultiTaskModule(L.LightningModule):
    """Plain multi-task training from labels alone: trains teachers and the scratch baselines.

    Args:
        model: Any ``nn.Module`` whose forward returns ``{task_name: Tensor}``.
        tasks: The tasks to train; each needs a key in the model's output and in the batch's ``targets``.
        weighting: How task losses are combined (default :class:`StaticWeighting`, ``Task.weight``).
        optimizer: Optimizer factory, called with the parameter groups.
        scheduler: Optional LR-scheduler factory (stepped per epoch, monitoring ``val/loss``).
        unpack_inputs: Pass a dict input as keyword arguments (``model(**input)``, as Hugging Face models
            take ``input_ids``/``attention_mask``) and a tuple as positional ones; ``False`` passes it whole.

    Batches are dicts ``{"input": Tensor or dict/tuple of Tensors, "targets": {task: Tensor}, "index": LongTensor}``.

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
        unpack_inputs: bool = True,
    ) -> None:
        super().__init__()
        # Once, for the whole class chain: a strategy's (or a user's subclass's) own arguments included.
        save_init_arguments(self, inspect.currentframe())
        self.tasks: dict[str, Task] = as_tasks(tasks)
        # Tasks of one kind and width have their losses computed together: a few kernels however many tasks.
        self.task_groups = TaskGroups(self.tasks)
        # Errors name the argument the user passes: a strategy takes its network as `student`.
        self.model = as_module(model, "student" if "student" in exposed_parameters(type(self)) else "model")
        chosen = as_module(weighting, "weighting") if weighting is not None else StaticWeighting()
        self.weighting: Weighting = cast(Weighting, chosen)
        self.weighting.setup_tasks(self.tasks)
        # None: a checkpoint whose optimizer was a function it could not record (a lambda); needed only to train.
        self.optimizer_factory = build_callable(optimizer, "optimizer") if optimizer is not None else None
        self.scheduler_factory = build_callable(scheduler, "scheduler") if scheduler is not None else None
        self.unpack_inputs = unpack_inputs
        for stage in STAGES:
            setattr(self, f"{stage}_metrics", self._make_metrics(stage))
        self._student_tap: FeatureTap | None = None
        self._checked_stages: set[str] = set()

    def _make_metrics(self, stage: str, who: str = "") -> TaskMetrics:
        # Grouped, vectorised task metrics and loss-term means: no per-task work or log call in a step.
        return TaskMetrics(self.tasks, stage, who)

    # ------------------------------------------------------------------------------ forward passes
    def forward(self, inputs: Any) -> dict[str, Tensor]:
        return call_model(self.model, inputs, self.unpack_inputs)

    def student_forward(self, inputs: Any) -> ModelOutputs:
        """The student's outputs (checked against the tasks) and the features its taps recorded."""
        outputs = self.task_outputs(self(inputs), "student")
        features = self._student_tap.pop() if self._student_tap is not None else {}
        return ModelOutputs(outputs, features)

    def teacher_forward(self, batch: Mapping[str, Any]) -> dict[str, ModelOutputs]:
        """Outputs of every teacher, by teacher name; none without a teacher."""
        return {}

    def task_outputs(self, output: Any, who: str, required: bool = True, task: str | None = None) -> dict[str, Tensor]:
        """A model's output as ``{task: Tensor}``; a single-task model named after its task may return a
        bare Tensor, or a Hugging Face output object whose ``logits`` are the task's."""
        if isinstance(output, Tensor) and task in self.tasks:
            return {task: output}
        if isinstance(output, Mapping) and task in self.tasks and task not in output and "logits" in output:
            return {task: output["logits"]}
        if isinstance(output, Tensor):
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
        self._check_batch_contract(batch, stage)
        step = self.forward_step(batch, stage)
        if stage not in self._checked_stages:
            self._check_first_batch(step)
            self._checked_stages.add(stage)

        # Losses may train on stand-ins for missing labels (pseudo-labels); metrics always use the real labels.
        supervised = self.supervision_targets(step)
        task_losses = self.task_groups.supervised_losses(step.student.outputs, supervised)
        distilling = bool(step.teachers)
        distill_terms = {**self.distillation_loss(step), **step.terms} if distilling else {}
        loss = self.weighting.combine(task_losses, distill_terms, self.distillation_alpha if distilling else 0.0)
        if step.losses:
            loss = loss + sum(step.losses.values())
            step.logs.update(step.losses)

        self._update_metrics(step)
        self._log_terms(step, loss, task_losses, distill_terms)
        # Kept for callbacks that act between backward and the optimizer step (NonFiniteLossGuard).
        self.step_terms = {
            "loss": loss,
            **{f"{name}/loss": value for name, value in task_losses.items()},
            **distill_terms,
        }
        return self.step_terms

    def forward_step(self, batch: Mapping[str, Any], stage: str = "train") -> Step:
        """The forward half of the shared step: teachers first (see the module docstring), the student, then
        :meth:`teacher_targets`. Also handy to call a strategy's hooks by hand on one batch."""
        step = Step(stage, batch, ModelOutputs({}), self.teacher_forward(batch))
        step.student = self.student_forward(batch["input"])
        if step.teachers:
            step.targets = self.teacher_targets(step)
        return step

    #: The share of the distillation terms; 0 without teachers.
    distillation_alpha: float = 0.0

    def teacher_targets(self, step: Step) -> dict[str, Tensor]:
        """Per task, the teacher output the student distils (no teachers here)."""
        return {}

    def distillation_loss(self, step: Step) -> dict[str, Tensor]:
        """The strategy's hook: named distillation terms (``"kd/<task>"`` per task, ``"<name>"`` shared)."""
        return {}

    def supervision_targets(self, step: Step) -> Mapping[str, Tensor]:
        """The targets the supervised losses train on (default: the labels as they are)."""
        return step.labels

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Tensor]:
        return self.shared_step(batch, "train")

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Tensor]:
        return self.shared_step(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Tensor]:
        return self.shared_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        inputs = batch["input"] if isinstance(batch, Mapping) and "input" in batch else batch
        return self.task_outputs(self(inputs), "student")

    # ------------------------------------------------------------------------------ checks
    def _check_batch_contract(self, batch: Any, stage: str) -> None:
        if stage not in self._checked_stages:
            check_batch(batch, self.tasks, self.model if self.unpack_inputs else None)

    def _check_first_batch(self, step: Step) -> None:
        """First batch of each stage: labels fit their tasks, and teachers cover what the strategy needs."""
        for name, task in self.tasks.items():
            task.check_target(step.student.outputs[name], step.labels[name])
        if step.teachers:
            self.check_teacher_outputs(step)

    def check_teacher_outputs(self, step: Step) -> None:
        """Raise if the teachers' outputs cannot serve this strategy (default: no check)."""

    # ------------------------------------------------------------------------------ metrics and logs
    def _update_metrics(self, step: Step) -> None:
        metrics: TaskMetrics = getattr(self, f"{step.stage}_metrics")
        metrics.update(step.student.outputs, step.labels, module=self)

    def _log_terms(
        self, step: Step, loss: Tensor, task_losses: Mapping[str, Tensor], distill_terms: Mapping[str, Tensor]
    ) -> None:
        stage, size = step.stage, batch_size(step.batch)
        on_step = stage == "train"
        # Evaluation losses are averaged over all ranks at epoch end (one reduction, not one per step).
        sync = stage != "train"
        # Not on the progress bar while training: the bar reads its values on the host after every batch, a sync
        # per step on a GPU; the validation loss shows there once per epoch.
        self.log(
            f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=not on_step, batch_size=size, sync_dist=sync
        )
        # The named terms (`{stage}/{task}/loss`, `{stage}/{task}/kd`, `{stage}/hint`, step.logs): batch-weighted
        # epoch means, summed over processes, added as one vector per step and logged once per epoch.
        metrics: TaskMetrics = getattr(self, f"{stage}_metrics")
        metrics.update_terms(task_losses, distill_terms, step.logs, size, module=self)

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CLASS_KEY] = class_path(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_class(self, checkpoint)
        upgrade_state_dict(checkpoint)

    # ------------------------------------------------------------------------------ optimisation
    def on_fit_start(self) -> None:
        self.weighting.attach(self)

    def on_train_epoch_end(self) -> None:
        self.weighting.on_train_epoch_end()
        weights = self.weighting.current_weights()
        if weights:
            self.log_dict({f"train/{task}/weight": w for task, w in weights.items()})

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameter groups: the model, then any trainable weighting state."""
        groups = [{"params": list(self.model.parameters()), "name": "model"}]
        weighting = [p for p in self.weighting.parameters() if p.requires_grad]
        if weighting:
            groups.append({"params": weighting, "name": "weighting"})
        return groups

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError(
                "this module was loaded from a checkpoint whose optimizer could not be recorded (a lambda or local "
                "function); pass `optimizer=` (e.g. functools.partial(torch.optim.Adam, lr=1e-3)) to train it."
            )
        optimizer = self.optimizer_factory(self.param_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss"}}


def __getattr__(name: str) -> Any:
    # DistillationModule lived here until it got its own file; code and checkpoints that name it here still work.
    if name == "DistillationModule":
        from lightning_mtkd.strategies.distillation import DistillationModule

        return DistillationModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
