import math

import pytest
import torch
import torch.nn.functional as F

from lightning_mtkd.losses import binary_soft_target_kd, feature_distance, masked_mean, soft_target_kd


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0, 10.0])
def test_soft_target_kd_matches_kl_div_by_hand(temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    reference = (
        F.kl_div(
            F.log_softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1), reduction="batchmean"
        )
        * temperature**2
    )
    torch.testing.assert_close(soft_target_kd(student, teacher, temperature), reference)


def test_soft_target_kd_golden_value_and_zero_for_equal_logits():
    student = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    teacher = torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 1.0]])
    # by hand: T² · mean(KL) = 4 · (0.3203 + 0.0617) / 2
    assert soft_target_kd(student, teacher, 2.0).item() == pytest.approx(0.764, abs=1e-3)
    assert soft_target_kd(teacher, teacher, 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_gradient_reaches_only_the_student():
    student = torch.randn(4, 10, requires_grad=True)
    teacher = torch.randn(4, 10, requires_grad=True)
    soft_target_kd(student, teacher.detach(), 4.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_binary_kd_is_bernoulli_kl():
    torch.manual_seed(1)
    student, teacher, temperature = torch.randn(5, 3), torch.randn(5, 3), 2.0
    p, q = torch.sigmoid(teacher / temperature), torch.sigmoid(student / temperature)
    kl = p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())
    torch.testing.assert_close(binary_soft_target_kd(student, teacher, temperature), kl.mean() * temperature**2)


def test_feature_distances_against_closed_forms():
    s, t = torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0]])
    # normalised: (0.6, 0.8) vs (0.8, 0.6)
    assert feature_distance(s, t, "l2").item() == pytest.approx(0.08)
    assert feature_distance(s, t, "l1").item() == pytest.approx(0.4)
    assert feature_distance(s, t, "cosine").item() == pytest.approx(1 - 0.96)
    maps = torch.randn(2, 3, 4, 4)
    assert feature_distance(maps, maps * 5, "l2").item() == pytest.approx(0.0, abs=1e-6)


def test_feature_distance_names_mismatched_shapes():
    with pytest.raises(ValueError, match="adaptor"):
        feature_distance(torch.zeros(2, 3), torch.zeros(2, 4))


def test_masked_mean_is_zero_not_nan_when_empty():
    values = torch.tensor([1.0, 2.0])
    assert masked_mean(values, torch.tensor([False, False])).item() == 0.0
    assert masked_mean(values, torch.tensor([True, False])).item() == 1.0


def test_invalid_temperature():
    with pytest.raises(ValueError, match="temperature"):
        soft_target_kd(torch.zeros(1, 2), torch.zeros(1, 2), 0.0)
    assert math.isfinite(soft_target_kd(torch.zeros(1, 2), torch.zeros(1, 2), 1e-3).item())
