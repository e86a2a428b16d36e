"""Modern distillation losses against independent references: closed forms, naive loops, the authors' formulas."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from lightning_mtkd.losses import feature_distance


def _orthogonal(size: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q


def _loss_falls(loss_fn: Callable[[Tensor], Tensor], student: nn.Module, inputs: Tensor, steps: int = 15) -> None:
    """A few SGD steps on a tiny student lower the loss (solo-learn's check that a loss can be optimised)."""
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    first = loss_fn(student(inputs)).item()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(student(inputs)).backward()
        optimizer.step()
    last = loss_fn(student(inputs)).item()
    assert last < 0.9 * first, f"loss did not fall: {first:.4f} -> {last:.4f}"


# ----------------------------------------------------------------------------------------------------- CKA
def _cka_by_hsic(x: Tensor, y: Tensor) -> Tensor:
    """Kornblith et al.'s definition: HSIC with the centering matrix H, on float64."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)

    def hsic(k: Tensor, l_: Tensor) -> Tensor:
        return torch.trace(k @ h @ l_ @ h) / (n - 1) ** 2

    k, l_ = x @ x.T, y @ y.T
    return hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_))


def test_cka_matches_the_hsic_definition_with_different_widths():
    torch.manual_seed(0)
    student, teacher = torch.randn(7, 3, 2, 2), torch.randn(7, 5)
    expected = 1 - _cka_by_hsic(student, teacher)
    torch.testing.assert_close(feature_distance(student, teacher, "cka").double(), expected, rtol=1e-5, atol=1e-6)


def test_cka_of_one_dimensional_features_is_one_minus_squared_correlation():
    # by hand: centred x = (-1.5, -.5, .5, 1.5), y = (-1.5, .5, -.5, 1.5); Pearson r = 4 / 5 = 0.8; CKA = r² = 0.64
    x, y = torch.tensor([[1.0], [2.0], [3.0], [4.0]]), torch.tensor([[1.0], [3.0], [2.0], [4.0]])
    assert feature_distance(x, y, "cka").item() == pytest.approx(0.36, abs=1e-6)


def test_cka_is_zero_for_identical_features_and_invariant_to_rotation_and_scale():
    torch.manual_seed(1)
    student, teacher = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    assert feature_distance(student, student, "cka").item() == pytest.approx(0.0, abs=1e-12)
    reference = feature_distance(student, teacher, "cka")
    rotated_student = 3.0 * student @ _orthogonal(5, seed=2)
    rotated_teacher = 0.2 * teacher @ _orthogonal(6, seed=3)
    torch.testing.assert_close(feature_distance(rotated_student, teacher, "cka"), reference)
    torch.testing.assert_close(feature_distance(student, rotated_teacher, "cka"), reference)


def test_cka_edge_cases_and_errors():
    assert feature_distance(torch.randn(1, 4), torch.randn(1, 3), "cka").item() == 1.0  # nothing to compare
    assert feature_distance(torch.ones(4, 2), torch.randn(4, 3), "cka").item() == 1.0  # constant: not NaN
    with pytest.raises(ValueError, match="batch sizes differ"):
        feature_distance(torch.randn(4, 3), torch.randn(5, 3), "cka")
    with pytest.raises(ValueError, match="cka"):
        feature_distance(torch.randn(4, 3), torch.randn(4, 3), "nope")  # type: ignore[arg-type]


def test_cka_gradient_reaches_only_the_student_and_the_loss_falls():
    torch.manual_seed(4)
    inputs, teacher = torch.randn(10, 6), torch.randn(10, 9, requires_grad=True)
    student = nn.Linear(6, 4)
    feature_distance(student(inputs), teacher.detach(), "cka").backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert teacher.grad is None
    _loss_falls(lambda features: feature_distance(features, teacher.detach(), "cka"), nn.Linear(6, 4), inputs)
