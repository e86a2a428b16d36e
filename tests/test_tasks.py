import math

import pytest
import torch
import torch.nn.functional as F

from lightning_mtkd import Task
from lightning_mtkd.tasks import as_tasks


def test_classification_loss_masks_missing_labels():
    task = Task("digit", num_classes=3)
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, -100, 2, -100])
    expected = F.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    torch.testing.assert_close(task.supervised_loss(logits, labels), expected)


@pytest.mark.parametrize(
    ("task", "target"),
    [
        (Task("c", num_classes=3), torch.full((4,), -100)),
        (Task("m", kind="multilabel", num_classes=2), torch.full((4, 2), -100.0)),
        (Task("r", kind="regression", num_classes=1), torch.full((4,), math.nan)),
    ],
)
def test_all_missing_gives_zero_loss_and_no_nan_gradient(task, target):
    output = torch.randn(4, task.num_classes, requires_grad=True)
    loss = task.supervised_loss(output, target)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(output.grad).all()


def test_regression_and_multilabel_losses():
    reg = Task("r", kind="regression", num_classes=2)
    out, target = torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, math.nan]])
    assert reg.supervised_loss(out, target).item() == pytest.approx(1.0)
    ml = Task("m", kind="multilabel", num_classes=2)
    logits, labels = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, -100.0]])
    assert ml.supervised_loss(logits, labels).item() == pytest.approx(math.log(2))


def test_metrics_follow_the_kind_and_skip_missing():
    task = Task("c", num_classes=3)
    metric = task.make_metrics()["acc"]
    metric.update(*task.metric_inputs(torch.eye(3)[[0, 1, 2]], torch.tensor([0, -100, 1])))
    assert metric.compute().item() == pytest.approx(0.5)
    assert set(Task("r", kind="regression", num_classes=1).make_metrics()) == {"mae", "mse"}
    assert set(Task("m", kind="multilabel", num_classes=4).make_metrics()) == {"f1"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": ""}, "non-empty"),
        ({"name": "a.b"}, "'.'"),
        ({"name": "a", "kind": "ranking"}, "unknown kind"),
        ({"name": "a", "num_classes": 1}, "at least 2"),
        ({"name": "a", "weight": -1.0}, "weight"),
    ],
)
def test_bad_task_specs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Task(**kwargs)


def test_duplicate_and_empty_task_lists():
    with pytest.raises(ValueError, match="twice"):
        as_tasks([Task("a"), {"name": "a"}])
    with pytest.raises(ValueError, match="empty"):
        as_tasks([])


def test_check_target_names_range_dtype_and_shape():
    task = Task("left", num_classes=10)
    with pytest.raises(ValueError, match=r"\[0, 9\].*found values in \[0, 12\]"):
        task.check_target(torch.zeros(2, 10), torch.tensor([0, 12]))
    with pytest.raises(TypeError, match="integers"):
        task.check_target(torch.zeros(2, 10), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        task.check_target(torch.zeros(2, 10), torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="num_classes=10"):
        task.check_target(torch.zeros(2, 7), torch.tensor([0, 1]))
