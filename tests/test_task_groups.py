"""Losses of many tasks computed together equal the same losses computed task by task."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_mtkd import Task
from lightning_mtkd.task_groups import TaskGroups
from lightning_mtkd.weighting import StaticWeighting
from lightning_mtkd.weighting.base import term_task


def many_tasks() -> dict[str, Task]:
    tasks = [Task(f"attr{i}", num_classes=2) for i in range(5)]  # one stacked group
    tasks += [Task("digit", num_classes=10), Task("shape", num_classes=10, ignore_value=-1)]  # apart: ignore value
    tasks += [Task(f"tags{i}", kind="multilabel", num_classes=3) for i in range(2)]
    tasks += [Task(f"size{i}", kind="regression", num_classes=1) for i in range(3)]
    tasks += [Task("solo", kind="regression", num_classes=2)]  # a group of one
    return {t.name: t for t in tasks}


def batch(tasks: dict[str, Task], size: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    outputs, labels = {}, {}
    for name, task in tasks.items():
        outputs[name] = torch.randn(size, task.num_classes, generator=generator, requires_grad=True)
        if task.kind == "classification":
            label = torch.randint(0, task.num_classes, (size,), generator=generator)
            label[::3] = int(task.missing_value)  # some missing
        elif task.kind == "multilabel":
            label = torch.randint(0, 2, (size, task.num_classes), generator=generator)
            label[1] = int(task.missing_value)
        else:
            label = torch.randn(size, generator=generator) if task.num_classes == 1 else torch.randn(size, 2)
            label[2] = math.nan
        labels[name] = label
    labels["attr4"] = torch.full((size,), -100)  # a task with no label at all: exactly 0
    return outputs, labels


def test_supervised_losses_of_groups_equal_each_tasks_own():
    tasks = many_tasks()
    outputs, labels = batch(tasks)
    grouped = TaskGroups(tasks).supervised_losses(outputs, labels)
    assert list(grouped) == list(tasks)
    for name, task in tasks.items():
        torch.testing.assert_close(grouped[name], task.supervised_loss(outputs[name], labels[name]), msg=name)
    assert grouped["attr4"].item() == 0.0
    # Gradients reach each head as they do task by task.
    sum(grouped.values()).backward()
    by_task = {n: o.grad.clone() for n, o in outputs.items()}
    for o in outputs.values():
        o.grad = None
    sum(t.supervised_loss(outputs[n], labels[n]) for n, t in tasks.items()).backward()
    for name in tasks:
        torch.testing.assert_close(by_task[name], outputs[name].grad, msg=name)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_default_distillation_losses_of_groups_equal_each_tasks_own(temperature):
    tasks = many_tasks()
    student, labels = batch(tasks, seed=1)
    teacher, _ = batch(tasks, seed=2)
    teacher = {n: t.detach() for n, t in teacher.items() if n != "solo"}  # a task without a teacher target
    kd_losses = {"digit": "dkd"}  # a task's own loss keeps its own path
    grouped = TaskGroups(tasks).distillation_losses(student, teacher, temperature, kd_losses, labels)
    assert set(grouped) == set(teacher)
    for name in teacher:
        expected = tasks[name].distillation_loss(student[name], teacher[name], temperature, kd_losses.get(name),
                                                 labels[name])
        torch.testing.assert_close(grouped[name], expected, msg=name)


def test_static_weighting_sums_every_term_with_its_weight():
    tasks = {"a": Task("a", num_classes=2, weight=2.0), "b": Task("b", num_classes=2, weight=0.5)}
    weighting = StaticWeighting()
    weighting.setup_tasks(tasks)
    task_losses = {"a": torch.tensor(1.0), "b": torch.tensor(3.0)}
    terms = {"kd/a": torch.tensor(0.5), "kd/b": torch.tensor(2.0), "hint": torch.tensor(4.0)}
    alpha = 0.25
    expected = sum((1 - alpha) * tasks[n].weight * v for n, v in task_losses.items())
    term_weight = {n: tasks[term_task(n)].weight if term_task(n) in tasks else 1.0 for n in terms}
    expected += sum(alpha * term_weight[n] * v for n, v in terms.items())
    for _ in range(2):  # the factors are made once and reused
        torch.testing.assert_close(weighting.combine(task_losses, terms, alpha), torch.tensor(float(expected)))
