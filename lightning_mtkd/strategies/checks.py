"""The checks of the shared step's first batch and of a strategy's settings: clear errors, never deep ones.

Each runs once (per stage, or at construction), so it may read values on the host.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from lightning_mtkd.data.base import is_task_batch_dict
from lightning_mtkd.inputs import check_keywords
from lightning_mtkd.tasks import Task
from lightning_mtkd.teachers import TEACHER

if TYPE_CHECKING:
    from lightning_mtkd.strategies.distillation import DistillationModule
    from lightning_mtkd.strategies.step import Step


def check_batch(batch: Any, tasks: Mapping[str, Task], keyword_model: nn.Module | None = None) -> None:
    """A batch is ``{"input", "targets", "index"}`` with a target for every task (and, for a model called with
    keyword inputs, input keys it takes)."""
    if is_task_batch_dict(batch):
        raise TypeError(
            f"the batch is a dict of per-task batches {list(batch)} (a CombinedLoader of one loader per task): "
            "merge them into one batch first, as PerTaskDataModule does (lightning_mtkd.data.merge_task_batches "
            "in your DataModule's on_before_batch_transfer)."
        )
    if not isinstance(batch, Mapping) or "input" not in batch or "targets" not in batch:
        keys = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise KeyError(
            f"a batch must be a dict with 'input' and 'targets' (and 'index'); got {keys}. "
            "Wrap your dataset with lightning_mtkd.data.MultiTaskDataset or return that dict."
        )
    missing = [name for name in tasks if name not in batch["targets"]]
    if missing:
        raise KeyError(
            f"the batch has no target for task(s) {missing} (it has {list(batch['targets'])}). Give every task "
            "a target; mark a missing label with the task's ignore value (-100, or NaN for regression)."
        )
    if keyword_model is not None:
        check_keywords(keyword_model, batch["input"], "the student")


def check_teacher_coverage(module: DistillationModule, step: Step) -> None:
    """Every task has a teacher target (from *the* teacher where one multi-task teacher is needed), every
    teacher teaches something, and teachers called with keyword inputs take the batch's keys."""
    if module.unpack_inputs:
        for name, teacher in module.teachers.modules().items():
            check_keywords(teacher, step.inputs, f"teacher {name!r}")
    produced = {name: list(out.outputs) for name, out in step.teachers.items()}
    if module.requires_multitask_teacher:
        missing = [name for name in module.tasks if name not in produced[TEACHER]]
        if missing:
            raise KeyError(
                f"the teacher outputs no {missing} (it outputs {produced[TEACHER]}). {type(module).__name__} needs "
                "a multi-task teacher trained on every task in `tasks`."
            )
    for name in module.tasks:
        if name not in step.targets and not module.online:  # a task no peer predicts learns from labels alone
            raise KeyError(
                f"no teacher outputs task {name!r} (teachers output {produced}). Use a teacher trained on "
                f"{name!r}, or remove the task from `tasks`."
            )
    for name, outputs in produced.items():
        if len(produced) > 1 and not any(task in outputs for task in module.tasks):
            raise KeyError(
                f"teacher {name!r} outputs {outputs}, none of the tasks {list(module.tasks)}: it would teach "
                "nothing. Drop it, or name a single-task teacher after the task it was trained on."
            )


def per_task_kd_losses(kd_loss: Any, tasks: Mapping[str, Task]) -> dict[str, Any]:
    """``{task: loss name}`` from one name or a dict, each checked against its task's kind."""
    if isinstance(kd_loss, Mapping):
        unknown = [name for name in kd_loss if name not in tasks]
        if unknown:
            raise ValueError(f"kd_loss names unknown task(s) {unknown}; the tasks are {list(tasks)}.")
        chosen = dict(kd_loss)
    else:
        chosen = dict.fromkeys(tasks, kd_loss)
    for name, loss in chosen.items():
        tasks[name].check_kd_loss(loss)
    return {name: loss for name, loss in chosen.items() if loss is not None}
