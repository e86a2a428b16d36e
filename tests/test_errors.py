"""Bad input gets a clear error that names the problem and the fix."""

import pytest
import torch
from conftest import TASKS, BareTensorNet, conv_net, quick_trainer, random_datamodule

from lightning_mtkd import MultiTaskModule, SharedDistiller, Task
from lightning_mtkd.data import MultiTaskDataModule, MultiTaskDataset
from lightning_mtkd.models import MultiTaskNet, ConvBackbone


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
    with pytest.raises(FileNotFoundError, match=r"nope.ckpt' does not exist.*Train the teacher first"):
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
    dataset = MultiTaskDataset(torch.randn(8, 1, 12, 12), {"left": torch.full((8,), 11), "right": torch.zeros(8, dtype=torch.long)})
    module = MultiTaskModule(conv_net(), TASKS)
    with pytest.raises(ValueError, match=r"Task 'left': labels must lie in \[0, 9\]"):
        fit(module, tmp_path, MultiTaskDataModule(dataset, dataset, batch_size=4))
