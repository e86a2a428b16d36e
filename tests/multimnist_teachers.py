"""Small MultiMNIST data and briefly trained teachers, built once per test process (shared by strategy tests)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import lightning as L
import pytest
import torch
from conftest import TASKS, quick_trainer

from lightning_mtkd import DistillationModule, MultiTaskModule, Task
from lightning_mtkd.data import MultiMNISTDataModule
from lightning_mtkd.models import ConvBackbone, MultiTaskNet


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run on one intra-op thread: on a shared 2-core machine, two threads contend and run ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """A test on one intra-op thread (use with ``pytestmark = pytest.mark.usefixtures("single_thread")``)."""
    with one_thread():
        yield


@functools.lru_cache(maxsize=1)
def small_multimnist() -> MultiMNISTDataModule:
    """512 training composites of real MNIST digits, batch 16 (32 steps an epoch)."""
    dm = MultiMNISTDataModule(num_train=512, num_val=64, num_test=32, train_digits=500, val_digits=200,
                              test_digits=200, batch_size=16)
    dm.setup()
    return dm


def mnist_net(widths: tuple[int, int], hidden: int, heads: tuple[str, ...] = ("left", "right")) -> MultiTaskNet:
    return MultiTaskNet(ConvBackbone(widths=widths, hidden=hidden), {name: 10 for name in heads})


@functools.cache
def mnist_teacher(heads: tuple[str, ...] = ("left", "right"), hidden: int = 32, steps: int = 80) -> MultiTaskNet:
    """A teacher trained for a few dozen steps on its tasks: better than chance, far from perfect."""
    import tempfile

    L.seed_everything(len(heads) + hidden)
    module = MultiTaskModule(mnist_net((6, 12), hidden, heads), [t for t in TASKS if t.name in heads])
    with tempfile.TemporaryDirectory() as tmp, one_thread():
        quick_trainer(tmp, max_steps=steps, max_epochs=-1, limit_val_batches=0).fit(module, small_multimnist())
    return module.model.eval()


def fit_and_measure(module: DistillationModule, tmp_path, steps: int = 200) -> tuple[dict, dict]:
    """Validation metrics on held-out batches before and after ``steps`` steps of fitting."""
    dm = small_multimnist()

    def measure() -> dict:
        trainer = quick_trainer(tmp_path, limit_val_batches=4)
        return trainer.validate(module, dm, verbose=False)[0]

    with one_thread():
        before = measure()
        quick_trainer(tmp_path, max_steps=steps, max_epochs=-1, limit_val_batches=0).fit(module, dm)
        return before, measure()


class GradProbe(L.Callback):
    """Records which parameters hold a non-zero gradient before the first optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[int, bool] = {}

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if not self.grads:
            self.grads = {id(p): p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters()}


def single_task(name: str) -> list[Task]:
    return [t for t in TASKS if t.name == name]

