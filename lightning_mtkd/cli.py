"""The ``lightning-mtkd`` command: LightningCLI with ``class_path`` as the only registry.

lightning-mtkd fit  --config configs/multimnist/teacher.yaml
lightning-mtkd fit  --config configs/multimnist/shared.yaml
lightning-mtkd test --config configs/multimnist/shared.yaml --ckpt_path best
"""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType, LightningCLI

from lightning_mtkd.data.base import MultiTaskDataModule
from lightning_mtkd.strategies.base import MultiTaskModule


def main(args: ArgsType = None, run: bool = True) -> LightningCLI:
    """Run the CLI (``args`` as for LightningCLI; ``run=False`` only builds the objects)."""
    return LightningCLI(
        MultiTaskModule,
        MultiTaskDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
