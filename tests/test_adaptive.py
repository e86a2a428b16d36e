"""AdaptiveDistiller: KD weights follow the student–teacher gap, smoothly and within bounds, and persist."""

import copy
import math

import lightning as L
import pytest
import torch
from conftest import TASKS, conv_net, mlp_net, quick_trainer

from lightning_mtkd import AdaptiveDistiller
from lightning_mtkd.data import MultiTaskDataModule, MultiTaskDataset
from lightning_mtkd.strategies.adaptive import adaptive_kd_targets, teacher_gap
from lightning_mtkd.weighting import UncertaintyWeighting


def test_update_by_hand_lagging_task_rises_caught_up_task_falls_within_bounds():
    module = AdaptiveDistiller(conv_net(), conv_net(), TASKS, momentum=0.5, gap_temperature=0.05, max_weight=1.5)
    # left: student 0.9 = teacher 0.9 (gap 0); right: student 0.7 vs teacher 0.875 (relative gap 0.2)
    gaps = module.update_kd_weights(torch.tensor([0.9, 0.7]), torch.tensor([0.9, 0.875]))
    assert gaps.tolist() == pytest.approx([0.0, 0.2])
    target = [2 / (1 + math.exp(4)), 2 * math.exp(4) / (1 + math.exp(4))]  # 2 softmax((0, 0.2) / 0.05)
    expected = [0.5 * 1 + 0.5 * target[0], min(0.5 * 1 + 0.5 * target[1], 1.5)]
    assert module.kd_weight.tolist() == pytest.approx(expected)
    assert expected[0] < 1 < expected[1] < 1.5  # the lagging task's weight rose, the other fell
    for _ in range(20):  # repeated, the weights settle at the target, clipped to the bounds
        module.update_kd_weights(torch.tensor([0.9, 0.7]), torch.tensor([0.9, 0.875]))
    assert module.kd_weight.tolist() == pytest.approx([max(target[0], 0.1), 1.5], rel=1e-4)


def test_gap_and_targets_by_hand():
    # lower is better (MAE): a student above the teacher lags
    assert teacher_gap(torch.tensor(3.0), torch.tensor(2.0), higher_is_better=False).item() == pytest.approx(0.5)
    assert teacher_gap(torch.tensor(0.5), torch.tensor(0.8), higher_is_better=True).item() == pytest.approx(0.375)
    equal = adaptive_kd_targets(torch.tensor([0.1, 0.1]), torch.tensor([2.0, 0.5]), 0.05)
    assert equal.tolist() == pytest.approx([2.0, 0.5])  # equal gaps keep the configured weights


def test_adaptive_temperature_follows_the_weights_within_bounds():
    module = AdaptiveDistiller(
        conv_net(), conv_net(), TASKS, momentum=0.0, adaptive_temperature=True, temperature=4.0,
        min_temperature=2.0, max_temperature=6.0,
    )
    module.update_kd_weights(torch.tensor([0.9, 0.5]), torch.tensor([0.9, 0.9]))
    factor = module.kd_weight / 1.0
    assert module.kd_temperature.tolist() == pytest.approx((4.0 * factor).clamp(2.0, 6.0).tolist())
    assert module.kd_temperature.tolist() == pytest.approx([2.0, 6.0])


def teacher_labelled_data(teacher, n=48, seed=0):
    """Labels are the teacher's own predictions: the teacher scores 100% on both tasks."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 1, 12, 12, generator=generator)
    with torch.no_grad():
        targets = {name: out.argmax(1) for name, out in teacher.eval()(inputs).items()}
    dataset = MultiTaskDataset(inputs, targets)
    return MultiTaskDataModule(dataset, dataset, dataset, batch_size=16)


def test_fit_student_matching_teacher_on_left_and_lagging_on_right(tmp_path):
    L.seed_everything(0)
    teacher = mlp_net(in_features=144, hidden=(32,))  # no batch norm: a training step at lr 0 changes nothing
    student = copy.deepcopy(teacher)  # identical on `left` …
    torch.nn.init.normal_(student.heads["right"].weight, std=1.0)  # … and lagging on `right`
    module = AdaptiveDistiller(
        student, teacher, TASKS, momentum=0.5, min_weight=0.25, max_weight=4.0, adaptive_temperature=True,
        weighting=UncertaintyWeighting(), optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
    )
    trainer = quick_trainer(tmp_path, max_epochs=1, limit_train_batches=1)  # the sanity check must not update
    data = teacher_labelled_data(teacher)
    trainer.fit(module, data)
    metrics = dict(trainer.callback_metrics)
    assert metrics["val/left/acc"] == metrics["val/left/teacher_acc"] == 1.0
    lag = 1.0 - metrics["val/right/acc"].item()
    assert lag > 0.5
    target = 2 * torch.softmax(torch.tensor([0.0, lag]) / 0.05, dim=0)
    expected = (0.5 + 0.5 * target).clamp(0.25, 4.0)
    assert module.kd_weight.tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    left, right = module.kd_weight.tolist()
    assert 0.25 <= left < 1.0 < right <= 4.0
    assert metrics["val/right/kd_weight"].item() == pytest.approx(right)
    assert metrics["val/left/kd_temperature"].item() < 4.0 < metrics["val/right/kd_temperature"].item()

    trainer.validate(module, data, verbose=False)  # evaluating alone does not move the weights
    assert module.kd_weight.tolist() == pytest.approx(expected.tolist(), rel=1e-5)

    path = tmp_path / "adaptive.ckpt"
    trainer.save_checkpoint(path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["kd_weight"], module.kd_weight)
    reloaded = AdaptiveDistiller.load_from_checkpoint(path, weights_only=True, teacher=teacher)
    assert torch.equal(reloaded.kd_weight, module.kd_weight)
    assert torch.equal(reloaded.kd_temperature, module.kd_temperature)
    x = torch.randn(4, 1, 12, 12)
    reloaded.setup("fit")
    terms = reloaded.distillation_loss(reloaded.forward_step({"input": x, "targets": {}}))
    T = reloaded.kd_temperature[1].item()
    plain = TASKS[1].distillation_loss(reloaded.model(x)["right"], teacher(x)["right"], T)
    assert terms["kd/right"].item() == pytest.approx(right * plain.item(), rel=1e-5)  # weight × KD at T_right


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_weight": -0.1}, "bounds must be >= 0"),
        ({"max_weight": -1.0}, "bounds must be >= 0"),
        ({"min_weight": 2.0, "max_weight": 1.0}, "swap them"),
        ({"momentum": 1.0}, "momentum must lie in"),
        ({"gap_temperature": 0.0}, "gap_temperature must be > 0"),
        ({"kd_weights": {"middle": 1.0}}, "unknown task"),
        ({"kd_weights": {"left": 20.0}}, "within the bounds"),
        ({"adaptive_temperature": True, "min_temperature": 5.0}, "min_temperature <= temperature"),
    ],
)
def test_bad_arguments_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveDistiller(conv_net(), conv_net(), TASKS, **kwargs)
