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


def test_per_sample_scores_of_every_kind_by_hand():
    """Each sample's share of the primary metric (its mean is the metric for acc and MAE); NaN without a label."""
    nan = float("nan")
    classification = Task("c", num_classes=3)
    logits = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0]])
    assert classification.per_sample_score(logits, torch.tensor([0, 2, -100])).tolist()[:2] == [1.0, 0.0]
    regression = Task("r", kind="regression", num_classes=1)
    scores = regression.per_sample_score(torch.tensor([[1.0], [2.0]]), torch.tensor([[1.5], [nan]]))
    assert scores[0] == 0.5 and scores[1].isnan()
    multilabel = Task("m", kind="multilabel", num_classes=4)
    scores = multilabel.per_sample_score(torch.tensor([[1.0, -1, 1, -1]]), torch.tensor([[1, 0, 0, -100]]))
    assert scores.tolist() == pytest.approx([2 / 3])  # two of its three present labels right
    segmentation = Task("s", kind="segmentation", num_classes=2)
    maps = torch.tensor([[[[1.0, 0], [0, 1]], [[0.0, 1], [1, 0]]]])  # (1, 2, 2, 2): class 0, 1 / 1, 0
    assert segmentation.per_sample_score(maps, torch.tensor([[[0, 0], [1, -100]]])).tolist() == pytest.approx([2 / 3])
    depth = Task("d", kind="depth", num_classes=1)
    depth_maps = torch.tensor([[[1.0, 2], [nan, 4]], [[nan, nan], [nan, nan]]])  # the second image: no label
    scores = depth.per_sample_score(torch.ones(2, 1, 2, 2), depth_maps)
    assert scores[0] == pytest.approx(4 / 3) and scores[1].isnan()
    normals = Task("n", kind="normals", num_classes=3)
    target = torch.tensor([1.0, 0, 0]).reshape(1, 3, 1, 1).repeat(1, 1, 1, 2)
    preds = torch.stack([torch.tensor([1.0, 0, 0]), torch.tensor([1.0, 1, 0])], dim=-1).reshape(1, 3, 1, 2)
    assert normals.per_sample_score(preds, target).tolist() == pytest.approx([22.5])  # (0° + 45°) / 2
