"""The ``lightning-mtkd`` command: LightningCLI with ``class_path`` as the only registry.

    lightning-mtkd fit  --config configs/multimnist/teacher.yaml
    lightning-mtkd fit  --config configs/multimnist/shared.yaml [--config configs/logger/wandb.yaml]
    lightning-mtkd test --config configs/multimnist/shared.yaml --ckpt_path checkpoints/multimnist/shared.ckpt
    lightning-mtkd export --ckpt_path checkpoints/multimnist/shared.ckpt --format onnx --output student.onnx \\
        --input_shape=[1,36,36]
    lightning-mtkd cache --config configs/multimnist/shared.yaml [--splits train val] [--cache_dir DIR]

``fit``/``validate``/``test``/``predict`` are LightningCLI's; ``export`` (:mod:`lightning_mtkd.export`) and
``cache`` (:func:`cache_main`) are dispatched before it. Every run gets a
:class:`~lightning_mtkd.callbacks.DistillationReport` (options under ``--report.*``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, cast

import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback

from lightning_mtkd.callbacks.guard import NonFiniteLossGuard
from lightning_mtkd.callbacks.report import DistillationReport, run_directory
from lightning_mtkd.callbacks.teacher_cache import TeacherCache
from lightning_mtkd.callbacks.teacher_cache.stores import Split
from lightning_mtkd.data.base import MultiTaskDataModule
from lightning_mtkd.strategies.base import MultiTaskModule
from lightning_mtkd.strategies.distillation import DistillationModule


class SaveConfigToRun(SaveConfigCallback):
    """Writes ``config.yaml`` into the run's own directory and records the full config in every logger.

    Lightning's default writes into ``trainer.log_dir``, which for W&B is the shared ``save_dir``, so a
    second W&B run in the same place would stop on the first run's ``config.yaml``.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            directory = run_directory(trainer)
            path = os.path.join(directory, self.config_filename)
            if os.path.isfile(path) and not self.overwrite:
                raise RuntimeError(
                    f"{path} exists: a previous run used this directory. Give a new `--trainer.default_root_dir` "
                    "or logger version, or delete the file."
                )
            os.makedirs(directory, exist_ok=True)
            self.parser.save(self.config, path, skip_none=False, overwrite=self.overwrite, multifile=self.multifile)
            self.save_config(trainer, pl_module, stage)
        self.already_saved = True

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # The module's hyper-parameters reach the loggers through Lightning; this adds trainer, data and seed.
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"cli": config})


class MTKDCLI(LightningCLI):
    """LightningCLI plus the always-on distillation report (``--report.*``) and NaN/inf guard (``--guard.*``)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(DistillationReport, "report")
        parser.add_lightning_class_args(NonFiniteLossGuard, "guard")


def main(args: ArgsType = None, run: bool = True) -> LightningCLI | Any:
    """Run the CLI (``args`` as for LightningCLI; ``run=False`` only builds the objects).

    ``export`` as the first argument runs :func:`lightning_mtkd.export.main` instead, ``cache`` :func:`cache_main`.
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)) and argv and argv[0] == "export":
        from lightning_mtkd.export import main as export_main

        return export_main(list(argv[1:]))
    if isinstance(argv, (list, tuple)) and argv and argv[0] == "cache":
        return cache_main(list(argv[1:]))
    return MTKDCLI(
        MultiTaskModule,
        MultiTaskDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveConfigToRun,
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


class _FillCache(Callback):
    """Fills the teacher cache from inside a loop hook, where the module is set up and on its device."""

    def __init__(self, cache: TeacherCache, splits: Sequence[str]) -> None:
        self.cache, self.splits = cache, cast(list[Split], list(splits))
        self.filled: dict[str, dict[str, Any]] = {}

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not isinstance(pl_module, DistillationModule) or not pl_module.teachers.active:
            raise RuntimeError(
                "lightning-mtkd cache: the run's teachers are not available (see the warning above): give "
                "`--model.init_args.teacher` a checkpoint path that exists."
            )
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            raise TypeError("lightning-mtkd cache needs the run's `data:` (a LightningDataModule) in the config.")
        loaders = {split: getattr(datamodule, f"{split}_dataloader")() for split in self.splits}
        self.filled = self.cache.fill(trainer, pl_module, loaders)


def cache_main(argv: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``lightning-mtkd cache --config RUN.yaml [--splits train val] [--cache_dir DIR]``: compute the teachers'
    outputs for every sample of the run's splits once, into the :class:`TeacherCache` files that later runs reuse.

    The config is the run's own (any ``--section.key=value`` overrides too): its model (a distillation strategy
    with its teachers), its data and its trainer's precision and accelerator, which the files' fingerprint
    covers with the features the strategy taps. A later run with the same teachers, features, data and precision
    — another seed, another strategy that reads the same features — finds the files through
    ``TeacherCache(cache_dir=…)`` (``storage: disk`` maps them, ``memory``/``auto`` read them in) and runs no
    teacher forward over the data (a few samples at setup only, to learn the outputs' layout). The cache
    directory and feature dtype default to the run's ``TeacherCache`` callback's if the config has one. Runs in
    one process on the trainer's first device.

    Returns ``{split: {"path", "complete", "computed_batches", "megabytes", "seconds"}}``, also printed.
    """
    parser = argparse.ArgumentParser(prog="lightning-mtkd cache", description=cache_main.__doc__)
    parser.add_argument("--splits", nargs="+", choices=("train", "val", "test"), default=["train", "val"])
    parser.add_argument("--cache_dir", default=None, help="default: the config's TeacherCache's, else its default")
    parser.add_argument("--feature_dtype", choices=("same", "float16", "bfloat16"), default=None)
    options, rest = parser.parse_known_args(list(argv))
    started = time.perf_counter()
    cli = main(rest, run=False)
    module, datamodule, configured = cli.model, cli.datamodule, None
    if not isinstance(module, DistillationModule):
        raise TypeError(
            f"lightning-mtkd cache caches a distillation strategy's teacher outputs; the config's model is a "
            f"{type(module).__name__}."
        )
    for callback in getattr(cli.trainer, "callbacks", []):
        if isinstance(callback, TeacherCache):
            configured = callback
    default = configured or TeacherCache()
    cache = TeacherCache(
        storage="disk",
        cache_dir=options.cache_dir or default.cache_dir,
        feature_dtype=options.feature_dtype or default.feature_dtype,
        splits=options.splits,
        allow_random_transforms=default.allow_random_transforms,
    )
    filled = fill_cache(module, datamodule, cache, options.splits, cli.trainer.accelerator, cli.trainer.precision)
    seconds = time.perf_counter() - started
    for split, info in filled.items():
        info["seconds"] = seconds
        state = "already complete, reused" if info["computed_batches"] == 0 else f"{info['computed_batches']} batches"
        print(f"teacher cache ({split}): {info['path']} ({info['megabytes']:.1f} MB, {state})")
    print(f"lightning-mtkd cache: done in {seconds:.1f} s")
    return filled


def fill_cache(
    module: DistillationModule,
    datamodule: Any,
    cache: TeacherCache,
    splits: Sequence[str],
    accelerator: Any = "auto",
    precision: Any = "32-true",
) -> dict[str, dict[str, Any]]:
    """Fill ``cache`` for ``splits`` of ``datamodule`` with ``module``'s teachers, in one process on one device of
    ``accelerator``, under the trainer ``precision`` the runs that read the files will use (it is part of their
    fingerprint). What ``lightning-mtkd cache`` does once it has built the run's objects. A memory ``cache`` keeps
    its filled arrays: a ``fit`` with it as a callback then starts cached."""
    filler = _FillCache(cache, splits)
    trainer = Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,  # the files are filled in on_validation_start; one batch keeps the loop short
        callbacks=[filler],
    )
    try:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    finally:
        if cache.storage != "memory":  # files flushed and closed; a memory cache stays filled for a later fit
            cache.teardown(trainer, module, "validate")
    return filler.filled


def console_main() -> None:
    """The ``lightning-mtkd`` console script: exit status 0 on success, 1 with one clear line on failure.

    ``main`` returns the CLI object (what tests and notebooks want), which a console script must not hand
    to ``sys.exit``: a non-integer exits with status 1. Errors of the run itself (a bad config value, a
    missing checkpoint, a batch that does not fit the tasks) are printed as one line naming the problem and
    the fix; ``LIGHTNING_MTKD_TRACEBACK=1`` shows the full traceback instead. Argument errors keep
    jsonargparse's usage message and status 2.
    """
    try:
        main()
    except (ValueError, KeyError, TypeError, RuntimeError, FileNotFoundError, ImportError) as error:
        if os.environ.get("LIGHTNING_MTKD_TRACEBACK"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"lightning-mtkd: error: {message}", file=sys.stderr)
        print("(set LIGHTNING_MTKD_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    console_main()
