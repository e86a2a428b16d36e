"""The main job: teacher → distilled student on MultiMNIST, compared with the same student from scratch.

    python -m lightning_mtkd.demo            # or: make demo

Trains (or reuses, when a checkpoint of the same config exists) a multi-task conv teacher, then
trains one small student from labels alone and one with :class:`SharedDistiller`, and prints a
per-task test-accuracy table with parameter counts.

The helpers here (:func:`conv_net`, :func:`train_or_reuse`, :func:`fit_and_test`) are the recipe that
``benchmarks/quality.py`` runs for every strategy, so the demo and the benchmark measure the same way:
the same budget and optimizer for every student, the epoch with the lowest validation loss (model
selection on the validation split only), and the test split read once per run.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from rich.console import Console
from rich.table import Table

from lightning_mtkd import DistillationModule, MultiTaskModule, SharedDistiller, Task
from lightning_mtkd.callbacks import TeacherCache
from lightning_mtkd.data import MultiMNISTDataModule
from lightning_mtkd.models import ConvBackbone, MultiTaskNet, count_parameters

TASKS = [Task("left", num_classes=10), Task("right", num_classes=10)]

#: Small data (5,000 composites from 1,000 digits): the regime where a student overfits without a teacher
#: (shared/MEASUREMENTS.md). Why these numbers (seed sweeps, README "Does distillation pay?"):
#: - the teacher has three conv stages (95.5–96.2 / 94.1–95.1 % across runs): with two (94.7 / 93.0 %) the
#:   19K student came within a point of it and soft targets had nothing left to teach;
#: - students train at lr 3e-3 (at 1e-3 the scratch student was still improving at the end, and soft targets
#:   only slowed it; at 5e-3 it lost a point), for 30 epochs: distilled students still improved at epoch 20
#:   (their best validation epoch was the last), the scratch student barely did (+0.3 points), and model
#:   selection keeps every row's best epoch, so the longer budget is fair to all (patient distillation,
#:   Beyer et al., CVPR 2022);
#: - α = 0.9 (mostly soft targets), T = 4, no hint term.
DEFAULTS: dict[str, Any] = {
    "teacher": {"widths": [32, 64, 128], "hidden": 256, "dropout": 0.5, "epochs": 30, "seed": 1},
    "student": {"widths": [8, 16], "hidden": 64, "epochs": 30, "lr": 3e-3},
    "data": {"num_train": 5000, "num_val": 1000, "num_test": 2000, "batch_size": 128},
    "distill": {"temperature": 4.0, "alpha": 0.9, "hint_weight": 0.0},
    "seed": 1,
}


def conv_net(spec: dict[str, Any], tasks: list[Task] = TASKS) -> MultiTaskNet:
    """A ``ConvBackbone`` multi-task net from a ``{"widths", "hidden", "dropout"?}`` spec."""
    backbone = ConvBackbone(widths=spec["widths"], hidden=spec["hidden"], dropout=spec.get("dropout", 0.0))
    return MultiTaskNet(backbone, {task.name: task.num_classes for task in tasks})


def student_optimizer(spec: dict[str, Any]) -> dict[str, Any]:
    """Adam at the spec's learning rate: every student row gets exactly this."""
    return {"optimizer": functools.partial(torch.optim.Adam, lr=spec["lr"])}


def trainer(epochs: int, progress: bool, callbacks: list[Any] | None = None) -> L.Trainer:
    callbacks = list(callbacks or [])
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        callbacks=callbacks + ([RichProgressBar(leave=False)] if progress else []),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=progress,
        enable_model_summary=False,
        deterministic=True,
    )


def train_or_reuse(
    name: str,
    make_module: Callable[[], MultiTaskModule],
    spec: dict[str, Any],
    dm: L.LightningDataModule,
    data_config: dict[str, Any],
    root: str,
    progress: bool = True,
) -> str:
    """Checkpoint of the teacher ``name`` trained with ``spec`` (best epoch on ``val/loss``), reused if it exists.

    The checkpoint is keyed by a hash of the name, the spec and the data config: change any and it retrains.
    """
    key = hashlib.sha256(json.dumps([name, spec, data_config], sort_keys=True).encode()).hexdigest()
    path = os.path.join(root, f"{name}-{key[:12]}.ckpt")
    if os.path.exists(path):
        print(f"Reusing {name} checkpoint {path}")
        return path
    L.seed_everything(spec["seed"], workers=True)
    workdir = os.path.join(root, f"{name}-work")
    shutil.rmtree(workdir, ignore_errors=True)
    checkpoint = ModelCheckpoint(dirpath=workdir, filename="best", monitor="val/loss", mode="min")
    trainer(spec["epochs"], progress, [checkpoint]).fit(make_module(), dm)
    shutil.copyfile(checkpoint.best_model_path, path)
    return path


def fit_and_test(
    module: MultiTaskModule,
    dm: L.LightningDataModule,
    epochs: int,
    progress: bool = True,
    cache: TeacherCache | None = None,
    workdir: str = ".cache/runs",
) -> dict[str, float]:
    """Fit for ``epochs``, keep the epoch with the lowest ``val/loss`` (model selection on validation
    only), and return its test metrics (``test/<task>/acc`` …), the test split read once.

    A distillation module runs with ``cache`` (a :class:`TeacherCache`, in memory by default): the
    teachers run once per sample instead of once per sample and epoch.
    """
    if cache is None and isinstance(module, DistillationModule):
        cache = TeacherCache(storage="memory")
    shutil.rmtree(workdir, ignore_errors=True)
    best = ModelCheckpoint(dirpath=workdir, filename="best", monitor="val/loss", mode="min")
    run = trainer(epochs, progress, [best] + ([cache] if cache is not None else []))
    run.fit(module, dm)
    return run.test(module, dm, ckpt_path="best", verbose=False, weights_only=True)[0]


def evaluate_checkpoint(path: str, dm: L.LightningDataModule) -> tuple[MultiTaskModule, dict[str, float]]:
    """A trained ``MultiTaskModule`` (a teacher) loaded from ``path``, and its metrics on ``dm``'s test split."""
    module = MultiTaskModule.load_from_checkpoint(path, weights_only=True)
    return module, trainer(1, False).test(module, dm, verbose=False)[0]


def demo_datamodule(config: dict[str, Any]) -> MultiMNISTDataModule:
    return MultiMNISTDataModule(**config["data"], seed=0)


def multitask_teacher(config: dict[str, Any], dm: L.LightningDataModule, root: str, progress: bool) -> str:
    spec = config["teacher"]
    make = lambda: MultiTaskModule(conv_net(spec), TASKS)  # noqa: E731 - a one-line factory
    return train_or_reuse("teacher", make, spec, dm, config["data"], root, progress)


def run(config: dict[str, Any] = DEFAULTS, root: str = ".cache/demo", progress: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    os.makedirs(root, exist_ok=True)
    dm = demo_datamodule(config)
    teacher_path = multitask_teacher(config, dm, root, progress)
    teacher, teacher_result = evaluate_checkpoint(teacher_path, dm)

    spec = config["student"]
    L.seed_everything(config["seed"], workers=True)
    scratch = MultiTaskModule(conv_net(spec), TASKS, **student_optimizer(spec))
    scratch_result = fit_and_test(scratch, dm, spec["epochs"], progress)
    L.seed_everything(config["seed"], workers=True)
    distilled = SharedDistiller(conv_net(spec), teacher_path, TASKS, **config["distill"], **student_optimizer(spec))
    distilled_result = fit_and_test(distilled, dm, spec["epochs"], progress)

    def accuracy(result: dict[str, float]) -> dict[str, float]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description="Teacher → distilled student on MultiMNIST, against scratch.")
    parser.add_argument("--root", default=".cache/demo", help="where checkpoints go (the teacher is reused from here)")
    parser.add_argument("--epochs", type=int, help="override the student and teacher epochs (quick looks)")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of the two student runs")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    config = json.loads(json.dumps(DEFAULTS))
    config["seed"] = args.seed
    if args.epochs:
        config["teacher"]["epochs"] = config["student"]["epochs"] = args.epochs
    print_table(run(config, args.root, progress=not args.no_progress))


if __name__ == "__main__":
    main()
