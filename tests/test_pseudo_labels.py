"""Missing labels: pseudo-labels from the teacher (`pseudo_label_missing`) and hiding labels (`hide_labels`)."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from conftest import TASKS, conv_net, hook_step, quick_trainer, random_datamodule
from test_reliability import DISTILLERS, STRATEGIES, _teacher_kwargs, teacher_net

from lightning_mtkd import SharedDistiller, Task
from lightning_mtkd.cli import main
from lightning_mtkd.data import MultiTaskDataModule, MultiTaskDataset, hide_labels

M = -100  # a missing classification label


# ------------------------------------------------------------------------------ Task.fill_missing, per kind
def _with_missing(kind):
    """``(task, teacher output, target with missing entries, expected filled target)`` for one task kind."""
    torch.manual_seed(0)
    if kind == "classification":
        task, out = Task("t", num_classes=3), torch.randn(4, 3)
        target = torch.tensor([2, M, 0, M])
        expected = target.clone()
        expected[[1, 3]] = torch.stack([out[1].argmax(), out[3].argmax()])
    elif kind == "multilabel":
        task, out = Task("t", kind="multilabel", num_classes=3), torch.randn(4, 3)
        target = torch.tensor([[1, 0, M], [M, M, M], [0, 1, 1], [1, M, 0]])
        expected = torch.where(target == M, (torch.sigmoid(out) > 0.5).long(), target)
    elif kind == "regression":
        task, out = Task("t", kind="regression", num_classes=2), torch.randn(4, 2)
        target = torch.tensor([[1.0, math.nan], [2.0, 3.0], [math.nan, math.nan], [0.5, 0.5]])
        expected = torch.where(target.isnan(), out, target)
    elif kind == "regression (B,)":
        task, out = Task("t", kind="regression", num_classes=1), torch.randn(4, 1)
        target = torch.tensor([1.0, math.nan, 3.0, math.nan])
        expected = torch.tensor([1.0, out[1, 0].item(), 3.0, out[3, 0].item()])
    elif kind == "segmentation":
        task, out = Task("t", kind="segmentation", num_classes=3), torch.randn(2, 3, 2, 2)
        target = torch.tensor([[[0, M], [2, 1]], [[M, M], [1, 0]]])
        expected = torch.where(target == M, out.argmax(dim=1), target)
    elif kind == "depth":
        task, out = Task("t", kind="depth", num_classes=1), torch.rand(2, 1, 2, 2)
        target = torch.tensor([[[1.0, math.nan], [2.0, 3.0]], [[math.nan, 1.0], [1.0, 1.0]]])  # (B, H, W)
        expected = torch.where(target.isnan(), out[:, 0], target)
    else:  # normals: a pixel with any missing component takes the teacher's whole vector
        task, out = Task("t", kind="normals", num_classes=3), torch.randn(1, 3, 1, 2)
        target = torch.tensor([[[[0.0, 1.0]], [[1.0, math.nan]], [[0.0, 0.0]]]])
        expected = target.clone()
        expected[0, :, 0, 1] = out[0, :, 0, 1]
    return task, out, target, expected


KINDS = ["classification", "multilabel", "regression", "regression (B,)", "segmentation", "depth", "normals"]


@pytest.mark.parametrize("kind", KINDS)
def test_fill_missing_replaces_exactly_the_missing_entries_by_the_teachers_pseudo_label(kind):
    task, teacher_output, target, expected = _with_missing(kind)
    filled = task.fill_missing(target, teacher_output)
    assert filled.shape == target.shape and filled.dtype == target.dtype
    torch.testing.assert_close(filled, expected, rtol=0, atol=0)
    assert task.valid_mask(filled).all()  # nothing is missing any more
    present = task.valid_mask(target)
    if kind == "normals":  # a normal is labelled only as a whole vector
        present = present.all(dim=1, keepdim=True).expand_as(target)
    assert torch.equal(filled[present], target[present])  # labelled entries untouched


# ------------------------------------------------------------------------------ the training step
def _batch():
    torch.manual_seed(1)
    x = torch.randn(6, 1, 12, 12)
    targets = {"left": torch.tensor([1, M, 3, M, 5, 6]), "right": torch.full((6,), M)}  # `right`: all missing
    return {"input": x, "targets": targets, "index": torch.arange(6)}


def _module(flag):
    torch.manual_seed(2)
    module = SharedDistiller(conv_net(), teacher_net(), TASKS, hint_weight=0.0, alpha=0.5, pseudo_label_missing=flag)
    module.setup("fit")
    return module


def _cross_entropy(logits, labels):
    """Mean negative log-likelihood of ``labels``, written out (the reference the step must match)."""
    return -logits.log_softmax(dim=1).gather(1, labels[:, None]).mean()


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_training_loss_with_pseudo_labels_equals_a_hand_computed_reference():
    batch = _batch()
    module = _module(True)
    terms = module.shared_step(batch, "train")

    with torch.no_grad():
        teacher = teacher_net()(batch["input"])
    student = module.model(batch["input"])
    y = batch["targets"]["left"]
    left_filled = torch.tensor([1, int(teacher["left"][1].argmax()), 3, int(teacher["left"][3].argmax()), 5, 6])
    expected_left = _cross_entropy(student["left"], left_filled)
    expected_right = _cross_entropy(student["right"], teacher["right"].argmax(dim=1))
    torch.testing.assert_close(terms["left/loss"], expected_left)
    torch.testing.assert_close(terms["right/loss"], expected_right)
    kd = terms["kd/left"] + terms["kd/right"]
    torch.testing.assert_close(terms["loss"], 0.5 * (expected_left + expected_right) + 0.5 * kd)

    # Metrics count the real labels only: accuracy over the four labelled `left` samples.
    labelled = y != M
    accuracy = (student["left"].argmax(1)[labelled] == y[labelled]).float().mean()
    torch.testing.assert_close(module.train_metrics["left"].compute()["train/left/acc"], accuracy)

    # Without the flag: the missing labels are masked out, and a task with no label has loss exactly 0.
    plain = _module(False).shared_step(batch, "train")
    torch.testing.assert_close(plain["left/loss"], _cross_entropy(student["left"][labelled], y[labelled]))
    assert plain["right/loss"] == 0


def test_pseudo_labels_are_for_training_only_and_need_teachers():
    module = _module(True)
    batch = _batch()
    step = module.forward_step(batch, "train")

    def targets(module, stage, teachers=step.teachers):
        return module.supervision_targets(hook_step(module, step.student, teachers, batch, stage))

    assert targets(module, "val") is batch["targets"]
    assert targets(module, "test") is batch["targets"]
    assert targets(module, "train", {}) is batch["targets"]  # a student evaluated alone
    assert (targets(module, "train")["right"] != M).all()
    assert targets(_module(False), "train") is batch["targets"]
    with pytest.raises(TypeError, match="pseudo_label_missing must be True or False"):
        SharedDistiller(conv_net(), teacher_net(), TASKS, pseudo_label_missing="yes")


@pytest.mark.parametrize("flag", [False, True])
def test_a_task_with_every_label_missing_trains_without_nan(flag, tmp_path):
    dm = random_datamodule(n=64, batch_size=16)
    dm.hide_labels = {"right": 1.0}
    module = SharedDistiller(conv_net(), teacher_net(), TASKS, pseudo_label_missing=flag)
    trainer = quick_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    trainer.fit(module, dm)
    assert (dm.splits["train"].targets["right"] == M).all()
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
    assert all(torch.isfinite(p).all() for p in module.parameters())
    right_loss = trainer.callback_metrics["train/right/loss"]
    assert (right_loss > 0) if flag else (right_loss == 0)


@pytest.mark.parametrize("name", DISTILLERS)
def test_every_strategy_accepts_the_flag_and_its_checkpoint_keeps_it(name, tmp_path):
    module = functools.partial(STRATEGIES[name], pseudo_label_missing=True)()
    assert module.hparams["pseudo_label_missing"] is True
    dm = random_datamodule(n=32, batch_size=16)
    dm.hide_labels = {"left": 0.5}
    trainer = quick_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, dm)
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    reloaded = type(module).load_from_checkpoint(path, weights_only=True, **_teacher_kwargs(module))
    assert reloaded.pseudo_label_missing is True and reloaded.hparams["pseudo_label_missing"] is True
    assert STRATEGIES[name]().pseudo_label_missing is False  # off by default


def test_flag_and_hidden_labels_come_from_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).parents[1] / "configs" / "multimnist" / "shared.yaml"
    options = ["--model.init_args.pseudo_label_missing=true", "--data.init_args.hide_labels={right: 0.5}"]
    cli = main(["--config", str(config), *options, "--trainer.logger=false"], run=False)
    assert cli.model.pseudo_label_missing is True
    assert cli.datamodule.hide_labels == {"right": 0.5}


# ------------------------------------------------------------------------------ hiding labels
def _dataset(n=100):
    generator = torch.Generator().manual_seed(0)
    targets = {"a": torch.randint(0, 10, (n,), generator=generator), "b": torch.rand(n, generator=generator)}
    return MultiTaskDataset(torch.randn(n, 3, generator=generator), targets)


def test_hide_labels_hides_a_seeded_fraction_of_one_tasks_training_labels():
    dataset = _dataset()
    original = {name: target.clone() for name, target in dataset.targets.items()}
    hidden = hide_labels(dataset, {"a": 0.3, "b": 0.5}, seed=4)
    missing_a, missing_b = hidden.targets["a"] == M, hidden.targets["b"].isnan()
    assert int(missing_a.sum()) == 30 and int(missing_b.sum()) == 50
    assert torch.equal(hidden.targets["a"][~missing_a], original["a"][~missing_a])  # the rest untouched
    assert not torch.equal(missing_a, missing_b[: len(missing_a)])  # independent subsets per task
    assert all(torch.equal(dataset.targets[k], original[k]) for k in original)  # the input data set is untouched
    assert hidden.inputs is dataset.inputs
    assert torch.equal(hide_labels(dataset, {"a": 0.3}, seed=4).targets["a"] == M, missing_a)  # deterministic
    assert not torch.equal(hide_labels(dataset, {"a": 0.3}, seed=5).targets["a"] == M, missing_a)
    assert not (hide_labels(dataset, {"a": 0.0}).targets["a"] == M).any()
    assert (hide_labels(dataset, {"a": 1.0}).targets["a"] == M).all()


def test_datamodule_hides_training_labels_only():
    train, val = _dataset(), _dataset(20)
    dm = MultiTaskDataModule(train, val, val, batch_size=10, seed=1, hide_labels={"a": 0.5})
    dm.setup()
    assert int((dm.splits["train"].targets["a"] == M).sum()) == 50
    assert not (dm.splits["val"].targets["a"] == M).any() and not (dm.splits["test"].targets["a"] == M).any()
    first = dm.splits["train"].targets["a"].clone()
    dm.setup()  # a second setup hides the same samples, not more
    assert torch.equal(dm.splits["train"].targets["a"], first)


def test_hide_labels_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"hide_labels\['a'\] = 1.5: the fraction of training labels to hide"):
        MultiTaskDataModule(_dataset(), hide_labels={"a": 1.5})
    with pytest.raises(KeyError, match=r"hide_labels names task\(s\) \['c'\], but the data has targets for"):
        MultiTaskDataModule(_dataset(), _dataset(), hide_labels={"c": 0.5}).setup()
    with pytest.raises(TypeError, match="hide_labels needs the train split as an in-memory MultiTaskDataset"):
        hide_labels(torch.utils.data.TensorDataset(torch.zeros(3)), {"a": 0.5})
