"""Bad input gets a clear error that names the problem and the fix."""

import pytest
import torch
from conftest import TASKS, BareTensorNet, conv_net, quick_trainer, random_datamodule

from lightning_mtkd import MultiTaskModule, SharedDistiller, Task, TransferDistiller
from lightning_mtkd.data import MultiTaskDataModule, MultiTaskDataset
from lightning_mtkd.models import ConvBackbone, MultiTaskNet


def fit(module, tmp_path, dm=None):
    quick_trainer(tmp_path, max_steps=1, limit_val_batches=1).fit(module, dm or random_datamodule())


def test_task_the_student_does_not_output(tmp_path):
    tasks = [*TASKS, Task("colour", num_classes=3)]
    targets = {name: torch.zeros(8, dtype=torch.long) for name in ("left", "right", "colour")}
    dataset = MultiTaskDataset(torch.randn(8, 1, 12, 12), targets)
    module = MultiTaskModule(conv_net(), tasks)
    with pytest.raises(KeyError, match=r"student outputs no \['colour'\]"):
        fit(module, tmp_path, MultiTaskDataModule(dataset, dataset, batch_size=4))


def test_task_the_teacher_does_not_output(tmp_path):
    teacher = MultiTaskNet(ConvBackbone(widths=(4, 8), hidden=16), {"left": 10})
    module = SharedDistiller(conv_net(), teacher, TASKS)
    with pytest.raises(KeyError, match=r"teacher outputs no \['right'\]"):
        fit(module, tmp_path)


def test_batch_missing_a_target(tmp_path):
    dataset = MultiTaskDataset(torch.randn(8, 1, 12, 12), {"left": torch.zeros(8, dtype=torch.long)})
    module = MultiTaskModule(conv_net(), TASKS)
    with pytest.raises(KeyError, match=r"no target for task\(s\) \['right'\]"):
        fit(module, tmp_path, MultiTaskDataModule(dataset, dataset, batch_size=4))


def test_feature_path_that_names_no_module(tmp_path):
    module = SharedDistiller(conv_net(), conv_net(), TASKS, student_feature="backbone.trunk")
    with pytest.raises(ValueError, match=r"student: no submodule at feature path 'backbone.trunk'"):
        fit(module, tmp_path)


def test_teacher_checkpoint_that_does_not_exist(tmp_path):
    module = SharedDistiller(conv_net(), str(tmp_path / "nope.ckpt"), TASKS)
    with pytest.raises(FileNotFoundError, match=r"nope.ckpt' does not exist.*Train it first"):
        fit(module, tmp_path)


def test_teacher_file_that_is_no_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, path)
    module = SharedDistiller(conv_net(), str(path), TASKS)
    with pytest.raises(ValueError, match="not a lightning-mtkd checkpoint"):
        fit(module, tmp_path)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SharedDistiller(conv_net(), conv_net(), TASKS, temperature=temperature)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_must_lie_in_unit_interval(alpha):
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        SharedDistiller(conv_net(), conv_net(), TASKS, alpha=alpha)


def test_model_returning_a_tensor(tmp_path):
    module = MultiTaskModule(BareTensorNet(), TASKS)
    with pytest.raises(TypeError, match=r"bare Tensor.*dict\[task_name, Tensor\]"):
        fit(module, tmp_path)


def test_labels_out_of_range(tmp_path):
    dataset = MultiTaskDataset(
        torch.randn(8, 1, 12, 12), {"left": torch.full((8,), 11), "right": torch.zeros(8, dtype=torch.long)}
    )
    module = MultiTaskModule(conv_net(), TASKS)
    with pytest.raises(ValueError, match=r"Task 'left': labels must lie in \[0, 9\]"):
        fit(module, tmp_path, MultiTaskDataModule(dataset, dataset, batch_size=4))


def test_checkpoint_from_another_strategy(tmp_path, teacher_ckpt):
    # A MultiTaskModule checkpoint resumed into a SharedDistiller: not its class.
    module = SharedDistiller(conv_net(), teacher_ckpt, TASKS)
    with pytest.raises(ValueError, match=r"written by lightning_mtkd.strategies.base.MultiTaskModule.*SharedDistiller"):
        quick_trainer(tmp_path, max_steps=1).fit(module, random_datamodule(), ckpt_path=teacher_ckpt)


def test_teacher_checkpoint_trained_on_another_task_set(tmp_path):
    other = [Task("colour", num_classes=10)]
    teacher = MultiTaskModule(MultiTaskNet(ConvBackbone(widths=(4, 8), hidden=16), {"colour": 10}), other)
    trainer = quick_trainer(tmp_path, max_steps=1)
    dataset = MultiTaskDataset(torch.randn(8, 1, 12, 12), {"colour": torch.zeros(8, dtype=torch.long)})
    trainer.fit(teacher, MultiTaskDataModule(dataset, dataset, batch_size=4))
    trainer.save_checkpoint(tmp_path / "colour.ckpt")
    module = SharedDistiller(conv_net(), str(tmp_path / "colour.ckpt"), TASKS)
    with pytest.raises(KeyError, match=r"teacher outputs no \['left', 'right'\] \(it outputs \['colour'\]\)"):
        fit(module, tmp_path)


def test_batch_that_is_not_a_dict(tmp_path):
    module = MultiTaskModule(conv_net(), TASKS)
    with pytest.raises(KeyError, match="must be a dict with 'input' and 'targets'"):
        module.shared_step((torch.zeros(2, 1, 12, 12), torch.zeros(2)), "train")


def test_empty_split(tmp_path):
    empty = MultiTaskDataset(torch.zeros(0, 1, 12, 12), {"left": torch.zeros(0), "right": torch.zeros(0)})
    with pytest.raises(ValueError, match="'val' split is empty"):
        MultiTaskDataModule(random_datamodule().splits.get("train") or empty, empty).setup()


def test_target_count_mismatch():
    with pytest.raises(ValueError, match="task 'left' has 3 targets for 4 inputs"):
        MultiTaskDataset(torch.zeros(4, 2), {"left": torch.zeros(3)})


def test_hint_settings():
    with pytest.raises(ValueError, match="hint_weight must be >= 0"):
        SharedDistiller(conv_net(), conv_net(), TASKS, hint_weight=-1.0)
    for strategy in (SharedDistiller, TransferDistiller):
        with pytest.raises(ValueError, match="hint_weight must be >= 0"):
            strategy({"left": conv_net(), "right": conv_net()} if strategy is TransferDistiller else conv_net(),
                     conv_net(), TASKS, hint_weight=-0.5)


def test_regression_targets_must_be_float():
    task = Task("depth", kind="regression", num_classes=1)
    with pytest.raises(TypeError, match="floating point"):
        task.check_target(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))
