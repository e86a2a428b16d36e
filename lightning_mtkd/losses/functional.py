"""Distillation losses as pure functions.

Every function here is stateless: modules and strategies only hold hyper-parameters and call these.
Each docstring gives the formula and the paper it comes from.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

FeatureDistance = Literal["l2", "cosine", "l1", "cka"]


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is true; ``0`` when nothing is present (never NaN, no host sync)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def soft_target_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    r"""Hinton soft-target distillation loss, scaled by :math:`T^2`.

    .. math::
        \mathcal{L}_{KD} = T^2 \cdot \frac{1}{B}\sum_b \mathrm{KL}\big(\sigma(z^t_b/T)\,\|\,\sigma(z^s_b/T)\big)

    The :math:`T^2` factor keeps the gradient magnitude independent of the temperature
    (Hinton, Vinyals & Dean, *Distilling the Knowledge in a Neural Network*, 2015).
    Classes are on dimension 1, so dense (per-pixel) logits ``(B, C, H, W)`` work too (mean over pixels).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return kl.mean() * temperature**2


def binary_soft_target_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    r"""Soft-target distillation for independent sigmoid outputs (multi-label heads), scaled by :math:`T^2`.

    .. math::
        \mathcal{L} = T^2 \cdot \mathrm{mean}_{b,c}\, \mathrm{BCE}\big(\mathrm{sigmoid}(z^s_{bc}/T),\,
        \mathrm{sigmoid}(z^t_{bc}/T)\big) - H\big(\mathrm{sigmoid}(z^t_{bc}/T)\big)

    i.e. the Bernoulli KL divergence per label, the binary form of Hinton et al. (2015).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    p_teacher = torch.sigmoid(teacher_logits / temperature)
    cross = F.binary_cross_entropy_with_logits(student_logits / temperature, p_teacher, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(teacher_logits / temperature, p_teacher, reduction="none")
    return (cross - entropy).mean() * temperature**2


def feature_distance(student: Tensor, teacher: Tensor, distance: FeatureDistance = "l2") -> Tensor:
    r"""Distance between (adapted) student and teacher features.

    Features are ``(B, C)`` vectors or ``(B, C, ...)`` maps. ``l2``, ``l1`` and ``cosine`` compare each
    sample at each position, after :math:`\hat f = f / \|f\|_2` over channels (dimension 1), averaged over
    batch and positions; they need equal shapes:

    - ``l2``: :math:`\|\hat f_s - \hat f_t\|_2^2` (Li & Bilen, *Knowledge Distillation for Multi-task
      Learning*, ECCV-W 2020; a normalised FitNets hint, Romero et al., ICLR 2015),
    - ``l1``: :math:`\|\hat f_s - \hat f_t\|_1`,
    - ``cosine``: :math:`1 - \cos(f_s, f_t)`.

    ``cka`` compares the two batches as wholes: :math:`1 - \mathrm{CKA}(X, Y)`, the linear centred kernel
    alignment of the features flattened to :math:`X \in \mathbb{R}^{B \times D_s}`,
    :math:`Y \in \mathbb{R}^{B \times D_t}` (Kornblith et al., *Similarity of Neural Network
    Representations Revisited*, ICML 2019), used as a feature-distillation loss by Li, Liu & Bilen
    (*Universal Representation Learning from Multiple Domains for Few-shot Classification*, ICCV 2021):

    .. math::
        \mathrm{CKA}(X, Y) = \frac{\langle K_c, L_c\rangle_F}{\|K_c\|_F\,\|L_c\|_F}, \qquad
        K_c = H X X^\top H,\; L_c = H Y Y^\top H,\; H = I_B - \tfrac{1}{B}\mathbf{1}\mathbf{1}^\top

    It is invariant to orthogonal transforms and isotropic scaling of either side and only the batch
    sizes must agree, so student and teacher widths (and spatial sizes) may differ: no adaptor is
    needed. It lies in [0, 1]; a batch of one sample (nothing to compare) gives 1 with zero gradient.
    """
    if distance == "cka":
        return 1 - _linear_cka(student, teacher)
    if student.shape != teacher.shape:
        raise ValueError(
            f"feature shapes differ: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}; "
            "an adaptor must map the student feature to the teacher's shape first (or use distance='cka')."
        )
    if distance == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=1)).mean()
    s = F.normalize(student, dim=1)
    t = F.normalize(teacher, dim=1)
    if distance == "l2":
        return (s - t).pow(2).sum(dim=1).mean()
    if distance == "l1":
        return (s - t).abs().sum(dim=1).mean()
    raise ValueError(f"unknown feature distance {distance!r}; use 'l2', 'cosine', 'l1' or 'cka'.")


def _linear_cka(student: Tensor, teacher: Tensor) -> Tensor:
    """Linear CKA of two batches of features ``(B, ...)``, widths free (see :func:`feature_distance`)."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"CKA compares the same samples: batch sizes differ, student {student.shape[0]} vs teacher "
            f"{teacher.shape[0]}."
        )
    # Gram matrices are B x B whatever the widths: cheaper than the D_s x D_t cross-covariance for
    # flattened conv maps, where D is much larger than B. Centring the features centres the Grams.
    x = student.flatten(1)
    y = teacher.flatten(1)
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    gram_x, gram_y = x @ x.T, y @ y.T
    alignment = (gram_x * gram_y).sum()
    # A constant batch has a zero Gram: 0/tiny gives CKA 0 (distance 1), never NaN.
    scale = (torch.linalg.matrix_norm(gram_x) * torch.linalg.matrix_norm(gram_y)).clamp_min(torch.finfo(x.dtype).tiny)
    return alignment / scale


def _per_sample(weights: Tensor, like: Tensor) -> Tensor:
    """``(K, B)`` weights shaped to broadcast against ``(K, B, C, ...)`` teacher outputs."""
    return weights.reshape(*weights.shape, *([1] * (like.dim() - 2)))


def fuse_soft_targets(teacher_logits: Tensor, weights: Tensor, temperature: float = 1.0) -> Tensor:
    r"""Fuse several teachers' softmax outputs into one soft target, returned as logits.

    ``teacher_logits`` is ``(K, B, C, ...)`` (K teachers, classes on dimension 2) and ``weights``
    ``(K, B)``, summing to one over K for each sample. The fused target is the mixture

    .. math::
        \tilde p_b = \sum_k w_{kb}\, \sigma(z^k_b / T), \qquad \tilde z_b = T \log \tilde p_b,

    so that :func:`soft_target_kd` with ``teacher_logits=\tilde z`` at the same ``T`` distils the
    mixture. Its gradient equals that of :math:`\sum_k w_k\,\mathrm{KL}(p_k\|q)` (the weighted
    multi-teacher loss of CA-MKD, Zhang, Chen & Wang, ICASSP 2022): the two differ by a constant.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    probs = F.softmax(teacher_logits / temperature, dim=2)
    fused = (_per_sample(weights, probs) * probs).sum(dim=0)
    return temperature * fused.clamp_min(torch.finfo(fused.dtype).tiny).log()


def fuse_binary_soft_targets(teacher_logits: Tensor, weights: Tensor, temperature: float = 1.0) -> Tensor:
    r"""The multi-label form of :func:`fuse_soft_targets`: a mixture of per-label sigmoids, as logits.

    .. math::
        \tilde p_{bc} = \sum_k w_{kb}\, \mathrm{sigmoid}(z^k_{bc} / T), \qquad
        \tilde z_{bc} = T\, \mathrm{logit}(\tilde p_{bc})
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    probs = torch.sigmoid(teacher_logits / temperature)
    fused = (_per_sample(weights, probs) * probs).sum(dim=0)
    eps = torch.finfo(fused.dtype).eps
    return temperature * torch.logit(fused, eps=eps)


def confidence_weights(teacher_losses: Tensor, present: Tensor) -> Tensor:
    r"""Per-sample teacher weights from each teacher's loss on the true label (CA-MKD).

    For ``K`` teachers with per-sample losses :math:`L_{kb}` (``(K, B)``), as in Zhang, Chen & Wang,
    *Confidence-Aware Multi-Teacher Knowledge Distillation* (ICASSP 2022):

    .. math::
        w_{kb} = \frac{1}{K-1}\Big(1 - \frac{\exp L_{kb}}{\sum_j \exp L_{jb}}\Big)

    so the teacher that is more confident about the right answer gets more weight, and the
    weights of each sample sum to one. One teacher gets weight 1; samples whose label is missing
    (``present`` false, ``(B,)``) get uniform weights ``1/K``.
    """
    k = teacher_losses.shape[0]
    uniform = torch.full_like(teacher_losses, 1.0 / k)
    if k == 1:
        return uniform
    weights = (1 - F.softmax(teacher_losses, dim=0)) / (k - 1)
    return torch.where(present.unsqueeze(0), weights, uniform)


AttentionLoss = Literal["kl", "mse"]


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    r"""Spatial attention map of a conv feature map ``(B, C, H, W)``: :math:`Q = \sum_c |A_c|^p`, ``(B, H, W)``.

    Zagoruyko & Komodakis, *Paying More Attention to Attention: Improving the Performance of
    Convolutional Neural Networks via Attention Transfer*, ICLR 2017 (the activation-based map
    :math:`F^p_{sum}`). Not normalised; :func:`attention_transfer_loss` normalises it.
    """
    if feature.dim() != 4:
        raise ValueError(
            f"attention transfer needs conv feature maps (B, C, H, W), got shape {tuple(feature.shape)}; name a "
            "convolutional layer (or an nn.MultiheadAttention layer for transformer attention)."
        )
    return feature.abs().pow(p).sum(dim=1)


def attention_transfer_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    r"""Attention transfer between conv feature maps of any channel counts.

    .. math::
        \mathcal{L}_{AT} = \frac{1}{B}\sum_b \Big\| \frac{q^s_b}{\|q^s_b\|_2} - \frac{q^t_b}{\|q^t_b\|_2} \Big\|_2^2,
        \qquad q = \mathrm{vec}\big(\textstyle\sum_c |A_c|^p\big)

    (Zagoruyko & Komodakis, ICLR 2017, eq. 2, squared as in the authors' code so that the gradient is
    defined at zero). The student's map is resized to the teacher's spatial size (bilinear) when
    they differ. Each term lies in [0, 4].
    """
    q_student, q_teacher = attention_map(student, p), attention_map(teacher, p)
    if q_student.shape[0] != q_teacher.shape[0]:
        raise ValueError(f"batch sizes differ: student {q_student.shape[0]} vs teacher {q_teacher.shape[0]}.")
    if q_student.shape[1:] != q_teacher.shape[1:]:
        q_student = F.interpolate(
            q_student.unsqueeze(1), size=tuple(q_teacher.shape[1:]), mode="bilinear", align_corners=False
        ).squeeze(1)
    s = F.normalize(q_student.flatten(1), dim=1)
    t = F.normalize(q_teacher.flatten(1), dim=1)
    return (s - t).pow(2).sum(dim=1).mean()


def attention_probability_loss(
    student: Tensor, teacher: Tensor, loss: AttentionLoss = "kl", mask: Tensor | None = None
) -> Tensor:
    r"""Distance between transformer attention probabilities ``(B, heads, queries, keys)``.

    - ``kl`` (MiniLM: Wang et al., *MiniLM: Deep Self-Attention Distillation for Task-Agnostic
      Compression of Pre-Trained Transformers*, NeurIPS 2020):
      :math:`\frac{1}{B H L}\sum_{b,h,l} \mathrm{KL}(A^t_{bhl}\,\|\,A^s_{bhl})`, each row a distribution
      over the keys;
    - ``mse`` (TinyBERT: Jiao et al., *TinyBERT: Distilling BERT for Natural Language Understanding*,
      Findings of EMNLP 2020): :math:`\mathrm{mean}\,(A^s - A^t)^2` — on the probabilities, which
      :class:`torch.nn.MultiheadAttention` returns (TinyBERT fits the scores before the softmax).

    When the head counts differ, both sides are averaged over their heads first (an average of
    attention distributions is one too). ``mask`` (``(B, L)``, true on real tokens: a Hugging Face
    ``attention_mask``) leaves the rows of padded query tokens out of the mean; their keys already get
    (almost) no probability from the models themselves.
    """
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            f"attention probabilities must be (B, heads, queries, keys), got student {tuple(student.shape)} and "
            f"teacher {tuple(teacher.shape)}."
        )
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(dim=1, keepdim=True), teacher.mean(dim=1, keepdim=True)
    if student.shape != teacher.shape:
        raise ValueError(
            f"attention shapes differ: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)} "
            "(B, heads, queries, keys); the paired layers must attend over the same tokens (same patching)."
        )
    if loss == "mse":
        per_row = (student - teacher).pow(2).mean(dim=-1)
    elif loss == "kl":
        per_row = (torch.special.xlogy(teacher, teacher) - teacher * torch.log(student.clamp_min(1e-12))).sum(dim=-1)
    else:
        raise ValueError(f"unknown attention loss {loss!r}; use 'kl' or 'mse'.")
    if mask is None:
        return per_row.mean()
    if mask.shape != (per_row.shape[0], per_row.shape[2]):
        raise ValueError(
            f"the padding mask has shape {tuple(mask.shape)}, but the attention is over {per_row.shape[2]} queries for "
            f"a batch of {per_row.shape[0]}; it must be (B, L) over the same tokens."
        )
    return masked_mean(per_row, mask.unsqueeze(1).expand_as(per_row))


def cosine_distance_map(prediction: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Mean cosine distance between vector fields ``(B, C, H, W)`` (surface normals), over valid pixels.

    .. math::
        \mathcal{L} = \frac{1}{|\Omega|}\sum_{p \in \Omega} 1 - \frac{\hat n_p \cdot n_p}{\|\hat n_p\|\,\|n_p\|}

    the normal loss of MTAN (Liu, Johns & Davison, *End-to-End Multi-Task Learning with Attention*,
    CVPR 2019), which normalises the prediction and takes the dot product with the unit ground truth;
    :math:`\Omega` is the set of pixels where ``mask`` (``(B, H, W)``) is true, all pixels if ``None``.
    Between student and teacher maps it is a per-pixel distillation term for normals heads.
    """
    distance = cosine_distance(prediction, target)
    if mask is None:
        return distance.mean()
    return masked_mean(distance, mask)


def cosine_distance(prediction: Tensor, target: Tensor) -> Tensor:
    r"""Per-position cosine distance :math:`1 - \cos(\hat n_p, n_p)` over dimension 1: ``(B, C, H, W)`` → ``(B, H, W)``.

    The unreduced form of :func:`cosine_distance_map` (MTAN's normal loss, Liu et al., CVPR 2019).
    """
    return 1 - F.cosine_similarity(prediction, target, dim=1)


def token_feature_distance(
    student: Tensor, teacher: Tensor, distance: FeatureDistance = "l2", mask: Tensor | None = None
) -> Tensor:
    r""":func:`feature_distance` between token sequences ``(B, L, D)``, over the real tokens only.

    Each token's feature is L2-normalised over its width :math:`D`, compared as in :func:`feature_distance`,
    and averaged over the tokens where ``mask`` (``(B, L)``, true on real tokens; a Hugging Face
    ``attention_mask``) is set, so padding never counts (all tokens if ``mask`` is ``None``). The
    transformer form of the normalised hint of Li & Bilen (ECCV-W 2020).
    """
    if student.shape != teacher.shape or student.dim() != 3:
        raise ValueError(
            f"token features must both be (B, L, D) of one shape, got student {tuple(student.shape)} and teacher "
            f"{tuple(teacher.shape)}; an adaptor must map the student feature to the teacher's width first."
        )
    if distance == "cosine":
        per_token = 1 - F.cosine_similarity(student, teacher, dim=-1)
    else:
        difference = F.normalize(student, dim=-1) - F.normalize(teacher, dim=-1)
        if distance == "l2":
            per_token = difference.pow(2).sum(dim=-1)
        elif distance == "l1":
            per_token = difference.abs().sum(dim=-1)
        else:
            raise ValueError(f"unknown feature distance {distance!r} for token features; use 'l2', 'cosine' or 'l1'.")
    if mask is None:
        return per_token.mean()
    if mask.shape != per_token.shape:
        raise ValueError(
            f"the padding mask has shape {tuple(mask.shape)} but the token features are {tuple(student.shape)}; "
            "the mask must be (B, L) over the same tokens."
        )
    return masked_mean(per_token, mask)
