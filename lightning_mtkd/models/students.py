"""Several separate networks (one per task or group of tasks) seen as one multi-task model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lightning_mtkd.config import RecordsInitArgs


class TaskStudents(RecordsInitArgs, nn.ModuleDict):
    """Independent networks, one per task or group of tasks, whose outputs are merged into one dict.

    Each network stays a separate module (``students["left"]``) that can be run, saved and deployed
    alone; together they satisfy the model contract (``forward`` returns ``{task: Tensor}``), so one
    LightningModule and one shared step train them all. Feature paths are prefixed by the network's
    name (``"left.backbone"``).

    Args:
        students: ``{name: network}``. A network named after a task predicts that task; it may return
            a bare Tensor or a dict that contains the task.
        groups: ``{name: [tasks]}`` for networks that predict several tasks (they return a dict);
            by default each network predicts the task it is named after.

    Example:
        >>> import torch
        >>> students = TaskStudents({"a": nn.Linear(4, 3), "b": nn.Linear(4, 1)})
        >>> {k: tuple(v.shape) for k, v in students(torch.zeros(2, 4)).items()}
        {'a': (2, 3), 'b': (2, 1)}
    """

    def __init__(self, students: Mapping[str, nn.Module], groups: Mapping[str, list[str]] | None = None) -> None:
        super().__init__(dict(students))
        groups = dict(groups or {})
        unknown = [name for name in groups if name not in students]
        if unknown:
            raise KeyError(f"groups names student(s) {unknown}, but the students are {list(students)}.")
        self.task_groups: dict[str, list[str]] = {name: list(groups.get(name, [name])) for name in students}

    def tasks_of(self, name: str) -> list[str]:
        """The tasks the network ``name`` predicts."""
        return self.task_groups[name]

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        # The inputs go to every student as they came: one Tensor, or keyword inputs (input_ids=..., ...).
        merged: dict[str, Tensor] = {}
        for name, student in self.items():
            output = student(*args, **kwargs)
            tasks = self.task_groups[name]
            if isinstance(output, Tensor):
                if len(tasks) != 1:
                    raise TypeError(
                        f"student {name!r} returned a bare Tensor but predicts tasks {tasks}; return a dict "
                        "{task: Tensor} from a network that predicts several tasks."
                    )
                merged[tasks[0]] = output
                continue
            missing = [task for task in tasks if task not in output]
            if missing:
                raise KeyError(
                    f"student {name!r} outputs no {missing} (it outputs {list(output)}); give it a head per task."
                )
            merged.update({task: output[task] for task in tasks})
        return merged
