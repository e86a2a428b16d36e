"""The main job: teacher → distilled student on MultiMNIST, compared with the same student from scratch.

    python -m lightning_mtkd.demo            # or: make demo

Trains (or reuses, when a checkpoint of the same config exists) a multi-task conv teacher, then
trains one small student from labels alone and one with :class:`SharedDistiller`, and prints a
per-task test-accuracy table with parameter counts. Model selection uses the validation split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from rich.console import Console
from rich.table import Table

from lightning_mtkd import MultiTaskModule, SharedDistiller, Task
from lightning_mtkd.data import MultiMNISTDataModule
from lightning_mtkd.models import ConvBackbone, MultiTaskNet, count_parameters

TASKS = [Task("left", num_classes=10), Task("right", num_classes=10)]
HEADS = {"left": 10, "right": 10}

#: Small data (5,000 composites from 1,000 digits): the regime where a student overfits without a teacher
#: (shared/MEASUREMENTS.md). The teacher is regularised with dropout; the student is ~15× smaller.
DEFAULTS: dict[str, Any] = {
    "teacher": {"widths": [32, 64], "hidden": 256, "dropout": 0.5, "epochs": 20, "seed": 1},
    "student": {"widths": [8, 16], "hidden": 64, "epochs": 20},
    "data": {"num_train": 5000, "num_val": 1000, "num_test": 2000, "batch_size": 128},
    "distill": {"temperature": 4.0, "alpha": 0.5, "hint_weight": 1.0},
    "seed": 1,
}


def _trainer(epochs: int, name: str, root: str, progress: bool) -> L.Trainer:
    checkpoint = ModelCheckpoint(dirpath=os.path.join(root, name), filename="best", monitor="val/loss", mode="min")
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        callbacks=[checkpoint] + ([RichProgressBar(leave=False)] if progress else []),
        enable_progress_bar=progress,
        enable_model_summary=False,
        deterministic=True,
    )


def _fit_and_test(
    module: L.LightningModule, dm: MultiMNISTDataModule, epochs: int, name: str, root: str, progress: bool
) -> dict[str, float]:
    trainer = _trainer(epochs, name, root, progress)
    trainer.fit(module, dm)
    result = trainer.test(module, dm, ckpt_path="best", verbose=False)[0]
    return {task.name: result[f"test/{task.name}/acc"] for task in TASKS}


def teacher_checkpoint(config: dict[str, Any], root: str, dm: MultiMNISTDataModule, progress: bool) -> str:
    """Path of the teacher trained with this config, training it first if no such checkpoint exists."""
    key = hashlib.sha256(json.dumps([config["teacher"], config["data"]], sort_keys=True).encode())
    path = os.path.join(root, f"teacher-{key.hexdigest()[:12]}.ckpt")
    if os.path.exists(path):
        print(f"Reusing teacher checkpoint {path}")
        return path
    spec = config["teacher"]
    L.seed_everything(spec["seed"], workers=True)
    backbone = ConvBackbone(widths=spec["widths"], hidden=spec["hidden"], dropout=spec["dropout"])
    teacher = MultiTaskModule(MultiTaskNet(backbone, HEADS), TASKS)
    trainer = _trainer(spec["epochs"], "teacher", root, progress)
    trainer.fit(teacher, dm)
    shutil.copyfile(trainer.checkpoint_callback.best_model_path, path)  # the best epoch on validation
    return path


def run(config: dict[str, Any] = DEFAULTS, root: str = ".cache/demo", progress: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    os.makedirs(root, exist_ok=True)
    dm = MultiMNISTDataModule(**config["data"], seed=0)
    teacher_path = teacher_checkpoint(config, root, dm, progress)
    teacher = MultiTaskModule.load_from_checkpoint(teacher_path, weights_only=True)
    teacher_acc = _fit_and_test_teacher(teacher, dm)

    def student() -> MultiTaskNet:
        spec = config["student"]
        return MultiTaskNet(ConvBackbone(widths=spec["widths"], hidden=spec["hidden"]), HEADS)

    epochs = config["student"]["epochs"]
    L.seed_everything(config["seed"], workers=True)
    scratch = MultiTaskModule(student(), TASKS)
    scratch_acc = _fit_and_test(scratch, dm, epochs, "scratch", root, progress)
    L.seed_everything(config["seed"], workers=True)
    distilled = SharedDistiller(student(), teacher_path, TASKS, **config["distill"])
    distilled_acc = _fit_and_test(distilled, dm, epochs, "shared", root, progress)
    rows = {
        "teacher": (teacher_acc, count_parameters(teacher.model)),
        "scratch student": (scratch_acc, count_parameters(scratch.model)),
        "distilled student (SharedDistiller)": (distilled_acc, count_parameters(distilled.model)),
    }
    return {"rows": rows, "seconds": time.perf_counter() - started}


def _fit_and_test_teacher(teacher: MultiTaskModule, dm: MultiMNISTDataModule) -> dict[str, float]:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    result = trainer.test(teacher, dm, verbose=False)[0]
    return {task.name: result[f"test/{task.name}/acc"] for task in TASKS}


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".cache/demo", help="where checkpoints go (the teacher is reused from here)")
    parser.add_argument("--epochs", type=int, help="override the student and teacher epochs (quick looks)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    config = json.loads(json.dumps(DEFAULTS))
    if args.epochs:
        config["teacher"]["epochs"] = config["student"]["epochs"] = args.epochs
    print_table(run(config, args.root, progress=not args.no_progress))


if __name__ == "__main__":
    main()
