"""The main job: teacher → distilled student on MultiMNIST, compared with the same student from scratch.

    python -m lightning_mtkd.demo            # or: make demo

Trains (or reuses, when a checkpoint of the same config exists) a multi-task conv teacher, then
trains one small student from labels alone and one with :class:`SharedDistiller`, and prints a
per-task test-accuracy table with parameter counts.

The recipe (models, budgets, soft-target settings) and the helpers that run it live in
:mod:`lightning_mtkd.recipe`, shared with ``benchmarks/quality.py`` and ``configs/multimnist/``, so the
demo and the benchmark measure the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import lightning as L
from rich.console import Console
from rich.table import Table

from lightning_mtkd.models import count_parameters
from lightning_mtkd.recipe import (
    RECIPE,
    TASKS,
    conv_net,
    datamodule,
    evaluate_checkpoint,
    fit_and_test,
    multitask_teacher,
    student_optimizer,
)
from lightning_mtkd.strategies import MultiTaskModule, SharedDistiller


def run(config: dict[str, Any] = RECIPE, root: str = ".cache/demo", progress: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    os.makedirs(root, exist_ok=True)
    dm = datamodule(config)
    spec = config["student"]
    print(f"1/3 the teacher ({config['teacher']['epochs']} epochs, trained once and reused from {root})", flush=True)
    teacher_path = multitask_teacher(config, dm, root, progress)
    teacher, teacher_result = evaluate_checkpoint(teacher_path, dm)

    print(f"2/3 the student from labels alone ({spec['epochs']} epochs)", flush=True)
    L.seed_everything(config["seed"], workers=True)
    scratch = MultiTaskModule(conv_net(spec), TASKS, **student_optimizer(spec))
    scratch_result = fit_and_test(scratch, dm, spec["epochs"], progress)
    print(f"3/3 the same student distilled by SharedDistiller ({spec['epochs']} epochs)", flush=True)
    L.seed_everything(config["seed"], workers=True)
    distilled = SharedDistiller(conv_net(spec), teacher_path, TASKS, **config["distill"], **student_optimizer(spec))
    distilled_result = fit_and_test(distilled, dm, spec["epochs"], progress)

    def accuracy(result: Mapping[str, float]) -> dict[str, float]:
        return {task.name: result[f"test/{task.name}/acc"] for task in TASKS}

    rows = {
        "teacher": (accuracy(teacher_result), count_parameters(teacher.model)),
        "scratch student": (accuracy(scratch_result), count_parameters(scratch.model)),
        "distilled student (SharedDistiller)": (accuracy(distilled_result), count_parameters(distilled.model)),
    }
    return {"rows": rows, "seconds": time.perf_counter() - started}


def print_table(result: dict[str, Any], console: Console | None = None) -> None:
    table = Table(title="MultiMNIST test accuracy (%)")
    for column in ["model", *[t.name for t in TASKS], "mean", "parameters"]:
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, (accuracy, params) in result["rows"].items():
        values = [100 * accuracy[t.name] for t in TASKS]
        table.add_row(name, *[f"{v:.1f}" for v in values], f"{sum(values) / len(values):.2f}", f"{params:,}")
    (console or Console()).print(table)
    print(f"wall time: {result['seconds']:.0f} s")


def quiet() -> None:
    """Keep Lightning's notices that do not apply here (no GPU, logger tips, seeds) out of the table's way.

    The documented way: raise the level of Lightning's console loggers. A deprecation inside Lightning's
    own pytree helper is filtered by its message; our own warnings still show.
    """
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def main() -> None:
    parser = argparse.ArgumentParser(description="Teacher → distilled student on MultiMNIST, against scratch.")
    parser.add_argument("--root", default=".cache/demo", help="where checkpoints go (the teacher is reused from here)")
    parser.add_argument("--epochs", type=int, help="override the student and teacher epochs (quick looks)")
    parser.add_argument("--seed", type=int, default=RECIPE["seed"], help="seed of the two student runs")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    quiet()
    config = json.loads(json.dumps(RECIPE))
    config["seed"] = args.seed
    if args.epochs:
        config["teacher"]["epochs"] = config["student"]["epochs"] = args.epochs
    print_table(run(config, args.root, progress=not args.no_progress))


if __name__ == "__main__":
    main()
