"""Tiny module-scope models and data shared by the tests (picklable, so ddp_spawn can use them)."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from torch import Tensor, nn

from lightning_mtkd import MultiTaskModule, Task
from lightning_mtkd.data import MultiTaskDataModule, MultiTaskDataset
from lightning_mtkd.models import ConvBackbone, MLPBackbone, MultiTaskNet

os.environ.setdefault("WANDB_MODE", "offline")
# nbmake runs notebooks/ in a Jupyter kernel, a separate process: pytest's `pythonpath = ["."]` does not reach it,
# the environment does. Put this checkout first so the kernel imports the package under test (decisive in a second
# worktree or an uninstalled checkout; a no-op for `make test`'s editable install). `pytest notebooks/` alone skips
# this file: set PYTHONPATH=. there.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))

TASKS = [Task("left", num_classes=10), Task("right", num_classes=10)]
HEADS = {"left": 10, "right": 10}


def conv_net(widths: tuple[int, int] = (4, 8), hidden: int = 16) -> MultiTaskNet:
    return MultiTaskNet(ConvBackbone(widths=widths, hidden=hidden), HEADS)


def mlp_net(in_features: int = 12, hidden: tuple[int, ...] = (16,)) -> MultiTaskNet:
    return MultiTaskNet(MLPBackbone(in_features=in_features, hidden=hidden), HEADS)


def random_datamodule(
    n: int = 64, shape: tuple[int, ...] = (1, 12, 12), batch_size: int = 16, seed: int = 0
) -> MultiTaskDataModule:
    generator = torch.Generator().manual_seed(seed)

    def split(size: int) -> MultiTaskDataset:
        inputs = torch.randn(size, *shape, generator=generator)
        targets = {t.name: torch.randint(0, 10, (size,), generator=generator) for t in TASKS}
        return MultiTaskDataset(inputs, targets)

    return MultiTaskDataModule(split(n), split(n // 2), split(n // 2), batch_size=batch_size)


def quick_trainer(tmp_path, **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    return L.Trainer(**options)


class BareTensorNet(nn.Module):
    """A model that breaks the contract: it returns a Tensor, not a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(144, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x.flatten(1))


def hook_step(module, student, teachers, batch, stage: str = "train"):
    """A Step built from hand-made outputs, with the strategy's own teacher targets: to call its hooks by hand."""
    from lightning_mtkd import Step

    step = Step(stage, batch, student, teachers)
    step.targets = module.teacher_targets(step)
    return step


@pytest.fixture
def teacher_ckpt(tmp_path) -> str:
    """A (briefly trained) conv teacher saved as a MultiTaskModule checkpoint."""
    L.seed_everything(0)
    module = MultiTaskModule(conv_net((8, 16), 32), TASKS)
    trainer = quick_trainer(tmp_path, max_steps=2)
    trainer.fit(module, random_datamodule())
    path = str(tmp_path / "teacher.ckpt")
    trainer.save_checkpoint(path)
    return path
