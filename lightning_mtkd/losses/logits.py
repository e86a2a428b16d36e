r"""Logit distillation losses beyond Hinton's soft targets, as pure functions.

Every function is stateless and vectorised (no loop over samples, no host sync). The teacher is a
fixed target: each loss detaches the teacher's logits itself, so gradients reach only the student
whatever the caller passes. Classes are on dimension 1.

Which loss applies to which task kind (see :class:`lightning_mtkd.Task`):

=====================================  ==============  ============  ==========  =================
loss                                   classification  segmentation  multilabel  regression, depth,
                                       ``(B, C)``      ``(B, C,      ``(B, L)``  normals
                                                       H, W)``
=====================================  ==============  ============  ==========  =================
:func:`kl_loss`                        yes             per pixel     no [1]_     no
:func:`dkd_loss` (needs labels)        yes             per pixel     no [2]_     no
:func:`dist_loss`                      yes             pixels as     no          no
                                                       samples
:func:`logit_mse_loss`                 yes             yes           yes         yes [3]_
:func:`sigmoid_mse_loss`               no              no            yes         no
=====================================  ==============  ============  ==========  =================

``standardize=True`` (:func:`kl_loss`, :func:`dkd_loss`) keeps the rows of its loss.

.. [1] independent sigmoids: use :func:`lightning_mtkd.losses.binary_soft_target_kd` (per-label
   Bernoulli KL). Logit standardisation is not offered there: z-scoring across labels would couple
   labels that the model treats as independent.
.. [2] DKD splits a softmax into the target class and the *distribution over the other classes*;
   a single sigmoid has no such distribution, so a binary DKD would reduce to the binary KL.
.. [3] for real-valued outputs KL does not apply; MSE between outputs is the usual regression KD.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_mtkd.losses.functional import masked_mean, soft_target_kd

#: Label of a missing target, as in :func:`torch.nn.functional.cross_entropy` and ``lightning_mtkd.tasks``
#: (restated, not imported: ``tasks`` imports this package).
IGNORE_INDEX = -100

#: Added to the standard deviation in :func:`standardize_logits`, as in Sun et al.'s code.
STANDARDIZE_EPS = 1e-7

#: Added to the norms' product in :func:`dist_loss`'s Pearson correlation, as in Huang et al.'s code.
PEARSON_EPS = 1e-8


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")


def _check_logits(student: Tensor, teacher: Tensor, min_classes: int = 1) -> None:
    """Same shapes, ``(B, C, ...)``, at least ``min_classes`` classes on dimension 1."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"logit shapes differ: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}; "
            "student and teacher heads must predict the same classes."
        )
    if student.dim() < 2 or student.shape[1] < min_classes:
        raise ValueError(
            f"logits must be (B, C) or (B, C, H, W) with C >= {min_classes} classes on dimension 1, "
            f"got shape {tuple(student.shape)}."
        )


def standardize_logits(logits: Tensor, base_temperature: float = 1.0) -> Tensor:
    r"""Z-score each sample's logits over the classes (dimension 1), divided by a base temperature.

    .. math::
        \mathcal{Z}(z; \tau) = \frac{z - \bar z}{\tau\,(\sigma(z) + \epsilon)}, \qquad
        \bar z = \tfrac{1}{C}\textstyle\sum_c z_c,\;
        \sigma(z) = \sqrt{\tfrac{1}{C-1}\textstyle\sum_c (z_c - \bar z)^2},\; \epsilon = 10^{-7}

    (Sun et al., *Logit Standardization in Knowledge Distillation*, CVPR 2024; the unbiased standard
    deviation and :math:`\epsilon` follow the authors' code). The softmax of the result no longer
    depends on the logits' shift or scale, so the student only has to match the teacher's *ranking
    and relative gaps*, not its logit range. Works on ``(B, C)`` and dense ``(B, C, H, W)`` logits.

    :func:`kl_loss` and :func:`dkd_loss` take ``standardize=True``: they z-score both sides and keep
    dividing by their ``temperature``, which then plays the part of the paper's base temperature
    :math:`\tau` (so ``base_temperature`` stays 1 there).

    Example:
        >>> standardize_logits(torch.tensor([[1.0, 2.0, 3.0]])).round(decimals=4)
        tensor([[-1.,  0.,  1.]])
        >>> standardize_logits(torch.tensor([[10.0, 20.0, 30.0]]), base_temperature=2.0).round(decimals=4)
        tensor([[-0.5000,  0.0000,  0.5000]])
    """
    _check_temperature(base_temperature)
    if logits.dim() < 2 or logits.shape[1] < 2:
        raise ValueError(f"standardising needs at least 2 classes on dimension 1, got shape {tuple(logits.shape)}.")
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (base_temperature * (std + STANDARDIZE_EPS))


def kl_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0, standardize: bool = False) -> Tensor:
    r"""Hinton's soft-target KD (:func:`~lightning_mtkd.losses.soft_target_kd`), optionally on standardised logits.

    .. math::
        \mathcal{L} = T^2\,\mathrm{mean}_b\, \mathrm{KL}\big(\sigma(g(z^t_b)/T)\,\|\,\sigma(g(z^s_b)/T)\big),
        \qquad g = \mathcal{Z}(\cdot\,; 1) \text{ if } \texttt{standardize} \text{ else the identity}

    With ``standardize=True`` this is the KD loss of Sun et al. (CVPR 2024) with base temperature
    :math:`T` (:func:`standardize_logits`). Shapes ``(B, C)`` or ``(B, C, H, W)`` (mean over pixels).

    Example:
        >>> teacher = torch.tensor([[2.0, 0.0, -1.0]])
        >>> kl_loss(teacher * 10 + 3, teacher, temperature=2.0, standardize=True).abs().item() < 1e-6
        True
    """
    _check_temperature(temperature)
    _check_logits(student, teacher)
    teacher = teacher.detach()
    if standardize:
        student, teacher = standardize_logits(student), standardize_logits(teacher)
    return soft_target_kd(student, teacher, temperature)


def _target_mask(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(one-hot mask of the target class, like logits; present labels, like target)``; missing rows are all False."""
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"class labels must be integers (torch.long), got {target.dtype}.")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"labels must have shape {expected} for logits {tuple(logits.shape)} (classes on dimension 1), "
            f"got {tuple(target.shape)}."
        )
    present = target != ignore_index
    safe_target = target.masked_fill(~present, 0).long().unsqueeze(1)  # scatter_ wants int64
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, safe_target, True)
    return mask & present.unsqueeze(1), present


def _split_target_mass(log_probs: Tensor, target_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(log p_target, log(1 - p_target))`` per sample, the second from the other classes (no cancellation)."""
    log_target = log_probs.masked_fill(~target_mask, 0.0).sum(dim=1)
    log_rest = log_probs.masked_fill(target_mask, float("-inf")).logsumexp(dim=1)
    return log_target, log_rest


def _non_target_log_probs(scaled_logits: Tensor, target_mask: Tensor) -> Tensor:
    """Log-softmax over the non-target classes; 0 (not -inf) at the target, so products there stay finite."""
    masked = scaled_logits.masked_fill(target_mask, float("-inf"))
    return F.log_softmax(masked, dim=1).masked_fill(target_mask, 0.0)


def dkd_terms(
    student: Tensor,
    teacher: Tensor,
    target: Tensor,
    temperature: float = 4.0,
    standardize: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    r"""The two parts of decoupled KD, per sample and unscaled: ``(tckd, nckd)``, each shaped like ``target``.

    With :math:`p = \sigma(z/T)`, :math:`t` the labelled class, :math:`b = (p_t, 1 - p_t)` the binary
    target/non-target split and :math:`\tilde p_c = p_c / (1 - p_t)` (:math:`c \neq t`) the
    distribution over the other classes (Zhao et al., *Decoupled Knowledge Distillation*, CVPR 2022):

    .. math::
        \mathrm{TCKD} = \mathrm{KL}(b^t\,\|\,b^s), \qquad
        \mathrm{NCKD} = \mathrm{KL}(\tilde p^t\,\|\,\tilde p^s), \qquad
        \mathrm{KL}(p^t\,\|\,p^s) = \mathrm{TCKD} + (1 - p^t_t)\,\mathrm{NCKD}

    the last identity being the paper's eq. (4). No :math:`T^2` and no weighting here; entries of
    missing labels (``ignore_index``) are 0. Shapes: logits ``(B, C)`` with labels ``(B,)``, or dense
    ``(B, C, H, W)`` with ``(B, H, W)``; labels must lie in ``[0, C)`` (not checked: that needs a host sync).
    """
    _check_temperature(temperature)
    _check_logits(student, teacher, min_classes=2)
    teacher = teacher.detach()
    if standardize:
        student, teacher = standardize_logits(student), standardize_logits(teacher)
    target_mask, present = _target_mask(student, target, ignore_index)
    scaled_student, scaled_teacher = student / temperature, teacher / temperature

    log_target_s, log_rest_s = _split_target_mass(F.log_softmax(scaled_student, dim=1), target_mask)
    log_target_t, log_rest_t = _split_target_mass(F.log_softmax(scaled_teacher, dim=1), target_mask)
    tckd = log_target_t.exp() * (log_target_t - log_target_s) + log_rest_t.exp() * (log_rest_t - log_rest_s)

    log_other_s = _non_target_log_probs(scaled_student, target_mask)
    log_other_t = _non_target_log_probs(scaled_teacher, target_mask)
    other_t = log_other_t.exp().masked_fill(target_mask, 0.0)
    nckd = (other_t * (log_other_t - log_other_s)).sum(dim=1)

    zero = tckd.new_zeros(())
    return torch.where(present, tckd, zero), torch.where(present, nckd, zero)


def dkd_loss(
    student: Tensor,
    teacher: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    standardize: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    r"""Decoupled knowledge distillation (Zhao et al., *Decoupled Knowledge Distillation*, CVPR 2022).

    .. math::
        \mathcal{L}_{DKD} = T^2 \cdot \mathrm{mean}_{b \,:\, y_b \text{ present}}
        \big(\alpha\,\mathrm{TCKD}_b + \beta\,\mathrm{NCKD}_b\big)

    with the terms of :func:`dkd_terms`. Plain KD weights NCKD by :math:`1 - p^t_t`, which shrinks it
    exactly when the teacher is confident; DKD frees that weight (the authors' configs: ``beta`` 8 at
    :math:`T = 4` on CIFAR-100, 0.5 at :math:`T = 1` on ImageNet). They also ramp the loss up linearly
    over the first epochs (20 on CIFAR-100): that schedule belongs to the strategy's KD weight, not
    here. With ``standardize=True`` both logits are z-scored first (:func:`standardize_logits`; Sun et
    al., CVPR 2024, applied it to DKD too).

    Samples (or pixels, for dense ``(B, C, H, W)`` logits with ``(B, H, W)`` labels) with a missing
    label contribute nothing; the loss is 0, not NaN, when every label is missing.

    Example:
        >>> logits, labels = torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([0])
        >>> dkd_loss(logits, logits, labels).item()
        0.0
        >>> dkd_loss(torch.zeros(1, 3), logits, torch.tensor([-100])).item()
        0.0
    """
    tckd, nckd = dkd_terms(student, teacher, target, temperature, standardize, ignore_index)
    present = target != ignore_index
    return masked_mean(alpha * tckd + beta * nckd, present) * temperature**2


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of the rows of two ``(N, M)`` matrices (over M), ``(N,)``, as in DIST's code."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + PEARSON_EPS)


def dist_loss(
    student: Tensor, teacher: Tensor, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0
) -> Tensor:
    r"""DIST: the student matches the teacher's class and sample rankings by correlation.

    Huang et al., *Knowledge Distillation from A Stronger Teacher*, NeurIPS 2022.
    With :math:`Y = \sigma(Z/T) \in \mathbb{R}^{B \times C}` (softmax over classes) and
    :math:`\rho` the Pearson correlation,

    .. math::
        \mathcal{L}_{DIST} = T^2\Big(\beta\,\frac{1}{B}\sum_b \big(1 - \rho(Y^s_{b,:}, Y^t_{b,:})\big)
        + \gamma\,\frac{1}{C}\sum_c \big(1 - \rho(Y^s_{:,c}, Y^t_{:,c})\big)\Big)

    the inter-class term (each sample's class ranking) and the intra-class term (each class's ranking
    of the samples). Matching correlations rather than probabilities lets the student ignore the
    teacher's scale and shift, which helps when the teacher is much stronger. :math:`T^2` and the
    :math:`\epsilon = 10^{-8}` in the correlation's denominator follow the authors' code.

    Shapes: ``(B, C)``; dense ``(B, C, H, W)`` logits count every pixel as a sample (``B·H·W`` rows),
    so the intra-class term correlates each class over all pixels of the batch. With one sample the
    intra-class term is the constant 1 (no gradient).

    Example:
        >>> logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
        >>> round(dist_loss(logits, logits).item(), 6)
        0.0
    """
    _check_temperature(temperature)
    _check_logits(student, teacher, min_classes=2)
    teacher = teacher.detach()
    if student.dim() > 2:  # pixels become samples: (B, C, H, W) -> (B·H·W, C)
        student = student.movedim(1, -1).reshape(-1, student.shape[1])
        teacher = teacher.movedim(1, -1).reshape(-1, teacher.shape[1])
    prob_s = F.softmax(student / temperature, dim=1)
    prob_t = F.softmax(teacher / temperature, dim=1)
    inter_class = 1 - _pearson(prob_s, prob_t).mean()
    intra_class = 1 - _pearson(prob_s.T, prob_t.T).mean()
    return temperature**2 * (beta * inter_class + gamma * intra_class)


def logit_mse_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""Mean squared error between student and teacher outputs, over every element.

    .. math::
        \mathcal{L} = \mathrm{mean}_{b,c,\dots}\,(z^s_{bc\dots} - z^t_{bc\dots})^2

    Regression on the logits (Ba & Caruana, *Do Deep Nets Really Need to be Deep?*, NeurIPS 2014), which
    soft-target KD approaches at high temperature for zero-mean logits (Hinton et al., 2015, sec. 2.1;
    compared in Kim et al., *Comparing Kullback-Leibler Divergence and Mean Squared Error Loss in
    Knowledge Distillation*, IJCAI 2021). For regression outputs, where KL does not apply, it is the
    usual distillation loss; on multilabel logits it is per-label MSE.
    Any shape, as long as student and teacher agree.

    Example:
        >>> logit_mse_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])).item()
        2.5
    """
    if student.shape != teacher.shape:
        raise ValueError(f"output shapes differ: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}.")
    return F.mse_loss(student, teacher.detach())


def sigmoid_mse_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""Per-label MSE between sigmoid probabilities, for multilabel heads.

    .. math::
        \mathcal{L} = \mathrm{mean}_{b,l}\,\big(\mathrm{sigmoid}(z^s_{bl}) - \mathrm{sigmoid}(z^t_{bl})\big)^2

    The bounded, probability-space counterpart of :func:`logit_mse_loss` for independent sigmoid outputs
    (the Brier score against the teacher's soft labels): a label on which the teacher is already sure
    (:math:`|z^t|` large) cannot dominate the loss as it can in logit space. Any shape, as long as
    student and teacher agree.

    Example:
        >>> sigmoid_mse_loss(torch.zeros(1, 2), torch.tensor([[0.0, 100.0]])).item()
        0.125
    """
    if student.shape != teacher.shape:
        raise ValueError(f"output shapes differ: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}.")
    return F.mse_loss(torch.sigmoid(student), torch.sigmoid(teacher.detach()))
