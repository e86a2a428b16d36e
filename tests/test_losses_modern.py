"""Modern distillation losses against independent references: closed forms, naive loops, the authors' formulas."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mtkd.losses import (
    dist_loss,
    dkd_loss,
    dkd_terms,
    feature_distance,
    kl_loss,
    logit_mse_loss,
    sigmoid_mse_loss,
    soft_target_kd,
    standardize_logits,
)

#: Small logits shared by the golden values (plain-Python evaluations of the papers' definitions, see each test).
STUDENT = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.5, -0.5, 1.5, 0.0]])
TEACHER = torch.tensor([[3.0, 1.0, 0.0, -2.0], [0.0, 0.0, 2.0, 1.0]])
LABELS = torch.tensor([0, 2])


def _orthogonal(size: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q


def _loss_falls(
    loss_fn: Callable[[Tensor], Tensor], student: nn.Module, inputs: Tensor, steps: int = 15, lr: float = 0.5
) -> None:
    """A few SGD steps on a tiny student lower the loss (solo-learn's check that a loss can be optimised)."""
    optimizer = torch.optim.SGD(student.parameters(), lr=lr)
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


# ----------------------------------------------------------------------------------------------------- DKD
def _authors_dkd(student: Tensor, teacher: Tensor, target: Tensor, alpha: float, beta: float, t: float) -> Tensor:
    """mdistiller's ``dkd_loss`` (Zhao et al.'s code), transcribed: masks by ``- 1000 * gt_mask``, sums / batch."""
    gt_mask = torch.zeros_like(student).scatter_(1, target.unsqueeze(1), 1).bool()

    def cat_mask(probs: Tensor) -> Tensor:
        return torch.stack([(probs * gt_mask).sum(1), (probs * ~gt_mask).sum(1)], dim=1)

    pred_student = cat_mask(F.softmax(student / t, dim=1))
    pred_teacher = cat_mask(F.softmax(teacher / t, dim=1))
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * t**2 / target.shape[0]
    teacher_part2 = F.softmax(teacher / t - 1000.0 * gt_mask, dim=1)
    log_student_part2 = F.log_softmax(student / t - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_student_part2, teacher_part2, reduction="sum") * t**2 / target.shape[0]
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 8.0), (0.5, 2.0)])
def test_dkd_matches_the_authors_code(temperature, alpha, beta):
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 6, 5, generator=generator, dtype=torch.float64) * 3
    target = torch.randint(0, 5, (6,), generator=generator)
    expected = _authors_dkd(student, teacher, target, alpha, beta, temperature)
    torch.testing.assert_close(dkd_loss(student, teacher, target, alpha, beta, temperature), expected)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_kd_decomposes_into_tckd_plus_weighted_nckd(temperature):
    """Zhao et al.'s eq. (4), per sample: KL(p_t || p_s) = TCKD + (1 - p^t_target) NCKD."""
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 8, 6, generator=generator) * 2
    target = torch.randint(0, 6, (8,), generator=generator)
    tckd, nckd = dkd_terms(student, teacher, target, temperature)
    p_teacher = F.softmax(teacher / temperature, dim=1)
    kl = F.kl_div(F.log_softmax(student / temperature, dim=1), p_teacher, reduction="none").sum(dim=1)
    p_target = p_teacher.gather(1, target.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(tckd + (1 - p_target) * nckd, kl)


def test_dkd_golden_value():
    # Plain Python (math.exp/log) on the paper's definitions b = (p_y, 1 - p_y), p~ = p / (1 - p_y):
    # T² · mean_b(TCKD + 8 NCKD) = 1.6577659608735746 at T = 4, 1.5473785507173712 at T = 1.
    assert dkd_loss(STUDENT, TEACHER, LABELS).item() == pytest.approx(1.6577660, rel=1e-5)
    assert dkd_loss(STUDENT, TEACHER, LABELS, temperature=1.0).item() == pytest.approx(1.5473786, rel=1e-5)


def test_dkd_masks_missing_labels_and_is_zero_not_nan_when_all_are_missing():
    generator = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 5, 4, generator=generator)
    target = torch.tensor([1, -100, 3, -100, 0])
    present = target != -100
    expected = dkd_loss(student[present], teacher[present], target[present])
    torch.testing.assert_close(dkd_loss(student, teacher, target), expected)
    tckd, nckd = dkd_terms(student, teacher, target)
    assert (tckd[~present] == 0).all() and (nckd[~present] == 0).all()

    student.requires_grad_(True)
    loss = dkd_loss(student, teacher, torch.full((5,), -100))
    loss.backward()
    assert loss.item() == 0.0 and student.grad is not None and torch.isfinite(student.grad).all()


def test_dkd_on_dense_logits_is_the_per_pixel_loss():
    generator = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 2, 4, 3, 3, generator=generator)
    target = torch.randint(0, 4, (2, 3, 3), generator=generator)
    target[0, 0, 0] = -100
    flat_s, flat_t = (x.permute(0, 2, 3, 1).reshape(-1, 4) for x in (student, teacher))
    flat_target = target.reshape(-1)
    torch.testing.assert_close(dkd_loss(student, teacher, target), dkd_loss(flat_s, flat_t, flat_target))


def test_dkd_bad_inputs_are_named():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="integers"):
        dkd_loss(logits, logits, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        dkd_loss(logits, logits, torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="shapes differ"):
        dkd_loss(logits, torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="C >= 2"):
        dkd_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="temperature"):
        dkd_loss(logits, logits, torch.tensor([0, 1]), temperature=0.0)


# ---------------------------------------------------------------------------------------------------- DIST
def _dist_by_loops(student: Tensor, teacher: Tensor, beta: float, gamma: float, t: float) -> Tensor:
    """The paper's definition with torch.corrcoef, one sample and one class at a time."""
    prob_s, prob_t = F.softmax(student / t, dim=1), F.softmax(teacher / t, dim=1)
    inter = [torch.corrcoef(torch.stack([prob_s[b], prob_t[b]]))[0, 1] for b in range(prob_s.shape[0])]
    intra = [torch.corrcoef(torch.stack([prob_s[:, c], prob_t[:, c]]))[0, 1] for c in range(prob_s.shape[1])]
    return t**2 * (beta * (1 - torch.stack(inter).mean()) + gamma * (1 - torch.stack(intra).mean()))


@pytest.mark.parametrize(("beta", "gamma", "temperature"), [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_matches_pearson_correlations_by_loops(beta, gamma, temperature):
    generator = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(2, 6, 5, generator=generator, dtype=torch.float64) * 2
    expected = _dist_by_loops(student, teacher, beta, gamma, temperature)
    torch.testing.assert_close(dist_loss(student, teacher, beta, gamma, temperature), expected, rtol=1e-6, atol=1e-7)


def test_dist_golden_value_and_zero_for_equal_logits():
    student = torch.cat([STUDENT, torch.tensor([[0.0, 1.0, 0.0, 2.0]])])
    teacher = torch.cat([TEACHER, torch.tensor([[-1.0, 2.0, 0.5, 0.5]])])
    # Plain Python (math) Pearson correlations of the softmax rows and columns: 1.2186473573313839 at T = 1,
    # 3.7463282296061515 at T = 2 (T² included).
    assert dist_loss(student, teacher).item() == pytest.approx(1.2186474, rel=1e-5)
    assert dist_loss(student, teacher, temperature=2.0).item() == pytest.approx(3.7463282, rel=1e-5)
    assert dist_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_dist_counts_pixels_as_samples():
    generator = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(2, 3, 4, 2, 2, generator=generator)
    flat_s, flat_t = (x.permute(0, 2, 3, 1).reshape(-1, 4) for x in (student, teacher))
    torch.testing.assert_close(dist_loss(student, teacher), dist_loss(flat_s, flat_t))


def test_dist_bad_inputs_are_named():
    with pytest.raises(ValueError, match="shapes differ"):
        dist_loss(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="temperature"):
        dist_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=-1.0)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        dist_loss(torch.zeros(3), torch.zeros(3))


# --------------------------------------------------------------------------------- logit standardisation
def test_standardize_logits_is_the_z_score_with_unbiased_std():
    logits = torch.tensor([[1.0, 2.0, 4.0, 9.0], [0.0, 0.0, 1.0, -1.0]])
    mean = logits.sum(1, keepdim=True) / 4
    std = ((logits - mean) ** 2).sum(1, keepdim=True).div(3).sqrt()
    torch.testing.assert_close(standardize_logits(logits), (logits - mean) / (std + 1e-7))
    torch.testing.assert_close(standardize_logits(logits, base_temperature=2.0), (logits - mean) / (std + 1e-7) / 2)
    dense = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(standardize_logits(dense).mean(dim=1), torch.zeros(2, 3, 3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss", ["kl", "dkd"])
def test_standardized_kd_ignores_the_teachers_shift_and_scale(loss):
    def distill(teacher: Tensor, standardize: bool) -> Tensor:
        if loss == "kl":
            return kl_loss(STUDENT, teacher, temperature=2.0, standardize=standardize)
        return dkd_loss(STUDENT, teacher, LABELS, temperature=2.0, standardize=standardize)

    reference = distill(TEACHER, standardize=True)
    torch.testing.assert_close(distill(TEACHER + 7.0, standardize=True), reference)
    torch.testing.assert_close(distill(TEACHER * 5.0, standardize=True), reference)
    torch.testing.assert_close(distill(TEACHER * 0.3 - 2.0, standardize=True), reference)
    assert not torch.allclose(distill(TEACHER * 5.0, standardize=False), distill(TEACHER, standardize=False))


def test_standardized_kl_golden_value_and_plain_kl_is_soft_target_kd():
    # Plain Python (math): z-score each row (unbiased std), softmax at T = 2, batch-mean KL, times T²:
    # 0.194827424752594.
    assert kl_loss(STUDENT, TEACHER, 2.0, standardize=True).item() == pytest.approx(0.1948274, rel=1e-5)
    torch.testing.assert_close(kl_loss(STUDENT, TEACHER, 3.0), soft_target_kd(STUDENT, TEACHER, 3.0))


def test_standardize_bad_inputs_are_named():
    with pytest.raises(ValueError, match="at least 2 classes"):
        standardize_logits(torch.zeros(4, 1))
    with pytest.raises(ValueError, match="temperature"):
        standardize_logits(torch.zeros(4, 3), base_temperature=0.0)


# ------------------------------------------------------------------------------------------------ MSE
def test_mse_losses_against_closed_forms():
    student, teacher = torch.tensor([[1.0, -2.0], [0.0, 3.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # (1 + 4 + 1 + 4) / 4
    assert logit_mse_loss(student, teacher).item() == pytest.approx(2.5)
    expected = ((torch.sigmoid(student) - torch.sigmoid(teacher)) ** 2).mean()
    torch.testing.assert_close(sigmoid_mse_loss(student, teacher), expected)
    for loss in (logit_mse_loss, sigmoid_mse_loss):
        with pytest.raises(ValueError, match="shapes differ"):
            loss(torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------------------- all logit losses together
LOGIT_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "kl": lambda s, t: kl_loss(s, t, temperature=4.0),
    "kl_standardized": lambda s, t: kl_loss(s, t, temperature=2.0, standardize=True),
    "dkd": lambda s, t: dkd_loss(s, t, torch.arange(s.shape[0]) % s.shape[1]),
    "dkd_standardized": lambda s, t: dkd_loss(s, t, torch.arange(s.shape[0]) % s.shape[1], standardize=True),
    "dist": dist_loss,
    "logit_mse": logit_mse_loss,
    "sigmoid_mse": sigmoid_mse_loss,
}


@pytest.mark.parametrize("name", list(LOGIT_LOSSES))
def test_logit_loss_gradient_reaches_only_the_student(name):
    torch.manual_seed(6)
    student, teacher = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    LOGIT_LOSSES[name](student, teacher).backward()  # the teacher is *not* detached by the caller here
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize(("name", "lr"), [("dkd", 0.02), ("dist", 0.5), ("kl_standardized", 0.5)])
def test_logit_loss_falls_under_sgd(name, lr):
    torch.manual_seed(7)
    inputs, teacher = torch.randn(12, 5), torch.randn(12, 4) * 3
    # DKD at T = 4 carries T² · beta = 128 in its gradient: a smaller step
    _loss_falls(lambda logits: LOGIT_LOSSES[name](logits, teacher), nn.Linear(5, 4), inputs, lr=lr)
