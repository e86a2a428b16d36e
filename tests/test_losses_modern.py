"""Modern distillation losses against independent references: closed forms, naive loops, the authors' formulas."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mtkd.losses import (
    ContrastiveMemory,
    CRDEmbed,
    crd_loss,
    dist_loss,
    dkd_loss,
    dkd_terms,
    feature_distance,
    kl_loss,
    logit_mse_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
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
    assert dkd_loss(STUDENT, TEACHER, LABELS.int()).item() == pytest.approx(1.6577660, rel=1e-5)  # any int dtype


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


# ----------------------------------------------------------------------------------------------------- RKD
def _smooth_l1(a: float, b: float) -> float:
    diff = abs(a - b)
    return 0.5 * diff**2 if diff < 1 else diff - 0.5


def _rkd_distance_by_loops(student: Tensor, teacher: Tensor) -> float:
    """Park et al.'s psi_D one pair at a time; mean over all B² entries, as in their code."""
    n = student.shape[0]

    def normalised(x: Tensor) -> list[list[float]]:
        d = [[(x[i] - x[j]).norm().item() for j in range(n)] for i in range(n)]
        mean = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[value / mean for value in row] for row in d]

    ds, dt = normalised(student.flatten(1)), normalised(teacher.flatten(1))
    return sum(_smooth_l1(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / n**2


def _rkd_angle_by_loops(student: Tensor, teacher: Tensor) -> float:
    """Park et al.'s psi_A one triplet at a time (angle at x_i; 0 when two points coincide), mean over B³."""
    n = student.shape[0]

    def cosine(x: Tensor, i: int, j: int, k: int) -> float:
        if i in (j, k):
            return 0.0
        return F.cosine_similarity(x[j] - x[i], x[k] - x[i], dim=0).item()

    s, t = student.flatten(1), teacher.flatten(1)
    terms = [_smooth_l1(cosine(s, i, j, k), cosine(t, i, j, k)) for i in range(n) for j in range(n) for k in range(n)]
    return sum(terms) / n**3


def test_rkd_terms_match_naive_loops_with_different_widths():
    generator = torch.Generator().manual_seed(8)
    student, teacher = torch.randn(5, 3, generator=generator), torch.randn(5, 2, 2, 2, generator=generator)
    assert rkd_distance_loss(student, teacher).item() == pytest.approx(
        _rkd_distance_by_loops(student, teacher), rel=1e-5
    )
    assert rkd_angle_loss(student, teacher).item() == pytest.approx(_rkd_angle_by_loops(student, teacher), rel=1e-5)
    expected = 25 * rkd_distance_loss(student, teacher) + 50 * rkd_angle_loss(student, teacher)
    torch.testing.assert_close(rkd_loss(student, teacher), expected)


def test_rkd_golden_value():
    # Right triangle (0,0), (3,0), (0,4) against an equilateral one of side 1. By hand: distances 3, 4, 5 (mean 4)
    # vs 1, 1, 1, so psi_D = (0.75, 1, 1.25) vs 1 (each pair twice): smooth-L1 sum 2 (0.03125 + 0 + 0.03125) / 9
    # = 0.013889. Angles: cosines 0, 0.6, 0.8 at the vertices vs 0.5 (each twice, on the off-diagonal of i's
    # 3 x 3 slice): sum of 0.5 d² = 2 (0.125 + 0.005 + 0.045) / 27 = 0.012963.
    student = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 3**0.5 / 2]])
    assert rkd_distance_loss(student, teacher).item() == pytest.approx(0.125 / 9, rel=1e-5)
    assert rkd_angle_loss(student, teacher).item() == pytest.approx(0.35 / 27, rel=1e-5)


def test_rkd_ignores_rotation_scale_and_translation_of_the_teacher():
    generator = torch.Generator().manual_seed(9)
    student = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    moved = 3.0 * student @ _orthogonal(4, seed=10) + 2.0
    assert rkd_loss(student, moved).item() == pytest.approx(0.0, abs=1e-10)


def test_rkd_gradient_reaches_only_the_student_and_the_loss_falls():
    torch.manual_seed(11)
    inputs, teacher = torch.randn(8, 6), torch.randn(8, 10, requires_grad=True)
    student = nn.Linear(6, 4)
    rkd_loss(student(inputs), teacher).backward()  # the teacher is not detached by the caller
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert teacher.grad is None
    _loss_falls(lambda features: rkd_loss(features, teacher), nn.Linear(6, 4), inputs, lr=0.05)


def test_rkd_edge_cases_and_errors():
    one = torch.randn(1, 3)
    assert rkd_loss(one, torch.randn(1, 5)).item() == 0.0  # no pair: 0, not NaN
    with pytest.raises(ValueError, match="equal B"):
        rkd_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="equal B"):
        rkd_distance_loss(torch.randn(4), torch.randn(4))


# ----------------------------------------------------------------------------------------------------- CRD
def _crd_by_loops(
    student: Tensor, teacher: Tensor, memory: ContrastiveMemory, index: Tensor, negatives: Tensor, t: float
) -> Tensor:
    """-log(e^{pos/t} / sum e^{./t}) one sample at a time, student anchor on the teacher bank and vice versa."""

    def side(anchor: Tensor, bank: Tensor) -> Tensor:
        losses = []
        for b in range(anchor.shape[0]):
            positive = torch.exp(anchor[b] @ bank[index[b]] / t)
            negatives_sum = sum(torch.exp(anchor[b] @ bank[n] / t) for n in negatives[b])
            losses.append(-torch.log(positive / (positive + negatives_sum)))
        return torch.stack(losses).mean()

    return side(student, memory.teacher_memory) + side(teacher, memory.student_memory)


def _crd_case(seed: int = 12) -> tuple[ContrastiveMemory, Tensor, Tensor, Tensor, Tensor]:
    torch.manual_seed(seed)
    memory = ContrastiveMemory(num_samples=10, dim=4)
    student, teacher = F.normalize(torch.randn(3, 4), dim=1), F.normalize(torch.randn(3, 4), dim=1)
    index = torch.tensor([2, 7, 4])
    return memory, student, teacher, index, memory.sample_negatives(index, k=5)


def test_crd_loss_matches_the_softmax_over_one_positive_and_k_negatives():
    memory, student, teacher, index, negatives = _crd_case()
    loss = crd_loss(student, teacher, memory.student_memory, memory.teacher_memory, index, negatives, 0.5)
    torch.testing.assert_close(loss, _crd_by_loops(student, teacher, memory, index, negatives, 0.5))


def test_crd_gradients_reach_both_embeddings_never_the_banks():
    memory, student, teacher, index, negatives = _crd_case()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    banks = memory.student_memory.clone().requires_grad_(True), memory.teacher_memory.clone().requires_grad_(True)
    crd_loss(student, teacher, *banks, index, negatives).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is not None and teacher.grad.abs().sum() > 0  # trains the teacher's projection head
    assert banks[0].grad is None and banks[1].grad is None


def test_crd_bad_inputs_are_named():
    memory, student, teacher, index, negatives = _crd_case()
    banks = memory.student_memory, memory.teacher_memory
    with pytest.raises(ValueError, match="temperature"):
        crd_loss(student, teacher, *banks, index, negatives, temperature=0.0)
    with pytest.raises(ValueError, match="CRDEmbed"):
        crd_loss(student, teacher[:, :3], *banks, index, negatives)
    with pytest.raises(ValueError, match="memory banks"):
        crd_loss(student, teacher, banks[0], banks[1][:, :3], index, negatives)
    with pytest.raises(ValueError, match="negatives_index"):
        crd_loss(student, teacher, *banks, index, negatives[:2])


def test_crd_embed_projects_any_features_to_unit_vectors():
    head = CRDEmbed(in_features=12, dim=5)
    embed = head(torch.randn(4, 3, 2, 2))
    assert embed.shape == (4, 5)
    torch.testing.assert_close(embed.norm(dim=1), torch.ones(4))


# ------------------------------------------------------------------------------------- contrastive memory
def test_memory_banks_are_unit_buffers_and_resume_exactly():
    memory, student, teacher, index, _ = _crd_case()
    assert sorted(memory.state_dict()) == ["student_memory", "teacher_memory"]
    assert list(memory.parameters()) == []
    torch.testing.assert_close(memory.student_memory.norm(dim=1), torch.ones(10))
    memory.update(index.int(), student, teacher)  # any integer dtype
    resumed = ContrastiveMemory(num_samples=10, dim=4)
    resumed.load_state_dict(memory.state_dict())
    assert torch.equal(resumed.student_memory, memory.student_memory)
    assert torch.equal(resumed.teacher_memory, memory.teacher_memory)


def test_memory_update_is_the_momentum_average_renormalised_row_by_row():
    memory, student, teacher, index, _ = _crd_case()
    before_s, before_t = memory.student_memory.clone(), memory.teacher_memory.clone()
    memory.update(index, student, teacher)
    for bank, before, embed in ((memory.student_memory, before_s, student), (memory.teacher_memory, before_t, teacher)):
        for row in range(10):
            expected = before[row]
            if row in index.tolist():
                mixed = 0.5 * before[row] + 0.5 * embed[index.tolist().index(row)]
                expected = mixed / mixed.norm()
            torch.testing.assert_close(bank[row], expected)


def test_memory_update_averages_a_sample_seen_twice_and_accepts_a_one_process_gather():
    memory, student, teacher, _, _ = _crd_case()
    row_before = memory.student_memory[5].clone()
    index = torch.tensor([5, 1, 5])
    memory.update(index, student, teacher, all_gather=lambda x: x)  # Lightning's all_gather on one process
    mixed = 0.5 * row_before + 0.5 * (student[0] + student[2]) / 2
    torch.testing.assert_close(memory.student_memory[5], mixed / mixed.norm())


def test_negatives_are_uniform_over_the_other_rows_and_reproducible():
    memory = ContrastiveMemory(num_samples=5, dim=2)
    index = torch.tensor([0, 2, 4])
    negatives = memory.sample_negatives(index, k=2000, generator=torch.Generator().manual_seed(0))
    assert negatives.shape == (3, 2000)
    assert not (negatives == index.unsqueeze(1)).any()
    for row, positive in enumerate(index.tolist()):
        counts = torch.bincount(negatives[row], minlength=5).float() / 2000
        others = [i for i in range(5) if i != positive]
        torch.testing.assert_close(counts[others], torch.full((4,), 0.25), atol=0.04, rtol=0)
    again = memory.sample_negatives(index, k=2000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(negatives, again)


def test_memory_bad_inputs_are_named():
    with pytest.raises(ValueError, match="num_samples >= 2"):
        ContrastiveMemory(num_samples=1, dim=4)
    with pytest.raises(ValueError, match="momentum"):
        ContrastiveMemory(num_samples=4, dim=4, momentum=1.0)
    memory = ContrastiveMemory(num_samples=4, dim=4)
    with pytest.raises(ValueError, match=r"embeddings \(B, 4\)"):
        memory.update(torch.tensor([0, 1]), torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="k"):
        memory.sample_negatives(torch.tensor([0]), k=0)


def _all_gather(tensor: Tensor) -> Tensor:
    """What ``LightningModule.all_gather`` returns under DDP: ``(world, B, ...)``."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def _global_batch() -> tuple[ContrastiveMemory, Tensor, Tensor, Tensor]:
    """Same bank and batch in every process; sample 7 appears on both ranks' halves."""
    torch.manual_seed(13)
    memory = ContrastiveMemory(num_samples=10, dim=4)
    index = torch.tensor([3, 7, 1, 7, 0, 9])
    return memory, index, F.normalize(torch.randn(6, 4), dim=1), F.normalize(torch.randn(6, 4), dim=1)


def _update_on_rank(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One of two gloo processes: update the banks with this rank's half of the batch, gathering the rest."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        memory, index, student, teacher = _global_batch()
        half = slice(rank * 3, (rank + 1) * 3)
        memory.update(index[half], student[half], teacher[half], all_gather=_all_gather)
        torch.save(memory.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.ddp
def test_memory_update_on_two_gloo_ranks_equals_one_process_with_the_whole_batch(tmp_path):
    # ~13 s on two shared cores, nearly all of it each process importing lightning_mtkd (and with it Lightning)
    mp.spawn(_update_on_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    memory, index, student, teacher = _global_batch()
    memory.update(index, student, teacher)
    for rank in range(2):
        banks = torch.load(tmp_path / f"rank{rank}.pt")
        for name, bank in memory.state_dict().items():
            torch.testing.assert_close(banks[name], bank, rtol=0, atol=1e-7, msg=f"{name} on rank {rank}")
