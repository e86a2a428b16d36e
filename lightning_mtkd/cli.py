"""The ``lightning-mtkd`` command: LightningCLI with ``class_path`` as the only registry.

    lightning-mtkd fit  --config configs/multimnist/teacher.yaml
    lightning-mtkd fit  --config configs/multimnist/shared.yaml [--config configs/logger/wandb.yaml]
    lightning-mtkd test --config configs/multimnist/shared.yaml --ckpt_path checkpoints/multimnist/shared.ckpt
    lightning-mtkd export --ckpt_path checkpoints/multimnist/shared.ckpt --format onnx --output student.onnx \\
        --input_shape=[1,36,36]

``fit``/``validate``/``test``/``predict`` are LightningCLI's; ``export`` is dispatched before it
(:mod:`lightning_mtkd.export`) because it builds no Trainer. Every run gets a
:class:`~lightning_mtkd.callbacks.DistillationReport` (options under ``--report.*``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback

from lightning_mtkd.callbacks.guard import NonFiniteLossGuard
from lightning_mtkd.callbacks.report import DistillationReport, run_directory
from lightning_mtkd.data.base import MultiTaskDataModule
from lightning_mtkd.strategies.base import MultiTaskModule


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

    ``export`` as the first argument runs :func:`lightning_mtkd.export.main` instead.
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)) and argv and argv[0] == "export":
        from lightning_mtkd.export import main as export_main

        return export_main(list(argv[1:]))
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
