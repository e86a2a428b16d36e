import math

import pytest
import torch
from conftest import TASKS, conv_net, quick_trainer

from lightning_mtkd import MultiTaskModule, SharedDistiller, Task
from lightning_mtkd.callbacks import NonFiniteLossGuard
from lightning_mtkd.data import MultiTaskDataModule, MultiTaskDataset


def poisoned_datamodule():
    torch.manual_seed(0)
    inputs = torch.randn(32, 1, 12, 12)
    inputs[5] = math.inf  # exactly one batch (whatever the shuffle) holds the poisoned sample
    targets = {"left": torch.randint(0, 10, (32,)), "right": torch.randint(0, 10, (32,))}
    dataset = MultiTaskDataset(inputs, targets)
    return MultiTaskDataModule(dataset, dataset, batch_size=8)


def test_raise_names_the_bad_terms_and_tasks(tmp_path):
    module = SharedDistiller(conv_net(), conv_net(), TASKS)
    trainer = quick_trainer(tmp_path, callbacks=[NonFiniteLossGuard()], limit_val_batches=0)
    with pytest.raises(FloatingPointError, match=r"step \d+: .*left/loss.*kd/left.*NaN or infinite"):
        trainer.fit(module, poisoned_datamodule())


def test_skip_leaves_weights_unchanged_and_counts(tmp_path):
    guard = NonFiniteLossGuard(policy="skip")
    module = MultiTaskModule(conv_net(), TASKS)
    trainer = quick_trainer(tmp_path, callbacks=[guard], limit_val_batches=0)
    trainer.fit(module, poisoned_datamodule())
    assert guard.skipped_batches == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())  # (BN running stats saw the inf)
    assert trainer.callback_metrics["train/skipped_batches"].item() == 1.0


def test_regression_nan_target_is_a_missing_label_not_a_failure(tmp_path):
    tasks = [Task("y", kind="regression", num_classes=1)]
    net = conv_net()
    net.heads = torch.nn.ModuleDict({"y": torch.nn.Linear(16, 1)})
    targets = torch.randn(16)
    targets[::2] = math.nan
    dataset = MultiTaskDataset(torch.randn(16, 1, 12, 12), {"y": targets})
    trainer = quick_trainer(tmp_path, callbacks=[NonFiniteLossGuard()], limit_val_batches=0)
    trainer.fit(MultiTaskModule(net, tasks), MultiTaskDataModule(dataset, batch_size=8))
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
