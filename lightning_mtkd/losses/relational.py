r"""Relational and contrastive feature distillation: RKD and CRD.

Both compare *how samples relate to each other* rather than each student feature with its teacher
feature, so student and teacher widths may differ without an adaptor. The losses are pure functions;
:class:`ContrastiveMemory` (CRD's memory banks, as buffers) and :class:`CRDEmbed` (its projection
heads) are the two thin modules CRD needs.

Features ``(B, ...)`` are flattened to ``(B, D)``; only the batch sizes must agree.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Clamp on squared distances before the square root, as in Park et al.'s code: keeps the gradient finite at 0.
_DISTANCE_EPS = 1e-12


def _flatten_pair(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    if student.dim() < 2 or teacher.dim() < 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"relational losses compare the same samples: features must be (B, ...) with equal B, got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}."
        )
    return student.flatten(1), teacher.flatten(1)


def _normalised_distances(features: Tensor) -> Tensor:
    """Pairwise Euclidean distances ``(B, B)`` divided by their mean over distinct pairs (diagonal 0)."""
    squared_norms = features.pow(2).sum(dim=1)
    squared = squared_norms.unsqueeze(1) + squared_norms.unsqueeze(0) - 2 * features @ features.T
    off_diagonal = 1 - torch.eye(features.shape[0], dtype=features.dtype, device=features.device)
    distances = squared.clamp_min(_DISTANCE_EPS).sqrt() * off_diagonal
    pairs = max(features.shape[0] * (features.shape[0] - 1), 1)
    return distances / (distances.sum() / pairs).clamp_min(_DISTANCE_EPS)


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""Distance-wise relational KD: match the samples' pairwise distances, each side normalised by its mean.

    .. math::
        \psi_D(x_i, x_j) = \frac{\|x_i - x_j\|_2}{\mu}, \quad \mu = \frac{1}{B(B-1)}\sum_{i \neq j}\|x_i - x_j\|_2,
        \qquad \mathcal{L}_{RKD\text{-}D} = \frac{1}{B^2}\sum_{i,j}
        \ell_\delta\big(\psi_D(s_i, s_j), \psi_D(t_i, t_j)\big)

    with :math:`\ell_\delta` the Huber (smooth-L1, :math:`\delta = 1`) loss (Park et al., *Relational
    Knowledge Distillation*, CVPR 2019). As in the authors' code the mean runs over all :math:`B^2`
    entries, the zero diagonal included. Invariant to scaling, translating and rotating either side.
    Memory :math:`O(B^2)` beyond the features. The teacher is detached.

    Example:
        >>> points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
        >>> rkd_distance_loss(points, 3 * points + 1).abs().item() < 1e-6
        True
    """
    student, teacher = _flatten_pair(student, teacher.detach())
    return F.smooth_l1_loss(_normalised_distances(student), _normalised_distances(teacher))


def _triplet_cosines(features: Tensor) -> Tensor:
    """``(B, B, B)``: entry ``[i, j, k]`` is the cosine of the angle at ``x_i`` between ``x_j`` and ``x_k``.

    0 where the triplet is degenerate: ``F.normalize`` maps a zero difference to the zero vector.
    """
    directions = F.normalize(features.unsqueeze(0) - features.unsqueeze(1), dim=2)  # [i, j] = unit(x_j - x_i)
    return directions @ directions.transpose(1, 2)


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""Angle-wise relational KD: match the angles that every triplet of samples forms.

    .. math::
        \psi_A(x_i, x_j, x_k) = \langle e_{ij}, e_{ik}\rangle, \quad e_{ij} = \frac{x_j - x_i}{\|x_j - x_i\|_2},
        \qquad \mathcal{L}_{RKD\text{-}A} = \frac{1}{B^3}\sum_{i,j,k}
        \ell_\delta\big(\psi_A(s_i, s_j, s_k), \psi_A(t_i, t_j, t_k)\big)

    (Park et al., CVPR 2019; smooth-L1 with :math:`\delta = 1`; degenerate triplets, where two samples
    coincide, give 0 on both sides and count in the mean, as in the authors' code.) Invariant to scaling,
    translating and rotating either side. Vectorised through the ``(B, B, D)`` unit difference vectors
    and a ``(B, B, B)`` cosine tensor: :math:`O(B^2 D + B^3)` memory, fine for the batch sizes of
    distillation (B = 64 with D = 512 is 8 MB per side) but cubic in B. The teacher is detached.

    Example:
        >>> points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
        >>> rkd_angle_loss(points, -2 * points + 5).abs().item() < 1e-6
        True
    """
    student, teacher = _flatten_pair(student, teacher.detach())
    return F.smooth_l1_loss(_triplet_cosines(student), _triplet_cosines(teacher))


def rkd_loss(student: Tensor, teacher: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0) -> Tensor:
    r"""Relational KD: :math:`\lambda_D\,\mathcal{L}_{RKD\text{-}D} + \lambda_A\,\mathcal{L}_{RKD\text{-}A}`.

    :func:`rkd_distance_loss` and :func:`rkd_angle_loss` with the paper's weights
    :math:`\lambda_D = 25`, :math:`\lambda_A = 50` (Park et al., CVPR 2019). Features ``(B, ...)`` of any
    widths. The teacher is detached.
    """
    return distance_weight * rkd_distance_loss(student, teacher) + angle_weight * rkd_angle_loss(student, teacher)


def _info_nce(anchor: Tensor, memory: Tensor, index: Tensor, negatives_index: Tensor, temperature: float) -> Tensor:
    """Mean over the batch of ``-log softmax`` of the positive among ``memory[index]`` and ``memory[negatives]``."""
    candidates = torch.cat([index.unsqueeze(1), negatives_index], dim=1)  # (B, 1 + K), the positive first
    keys = memory.detach()[candidates]  # (B, 1 + K, d)
    logits = torch.einsum("bd,bkd->bk", anchor, keys) / temperature
    positive_first = torch.zeros(anchor.shape[0], dtype=torch.long, device=anchor.device)
    return F.cross_entropy(logits, positive_first)


def crd_loss(
    student_embed: Tensor,
    teacher_embed: Tensor,
    student_memory: Tensor,
    teacher_memory: Tensor,
    index: Tensor,
    negatives_index: Tensor,
    temperature: float = 0.07,
) -> Tensor:
    r"""Contrastive representation distillation, in its softmax (InfoNCE) form, both directions summed.

    Tian, Krishnan & Isola, *Contrastive Representation Distillation*, ICLR 2020. For sample :math:`b`
    (dataset index :math:`i_b`, negatives :math:`n_{b1..K}`), L2-normalised embeddings :math:`s_b, t_b`
    and memory banks :math:`M^s, M^t` (rows: running, L2-normalised embeddings of every sample):

    .. math::
        \mathcal{L}_{CRD} = \frac{1}{B}\sum_b \Big(
        -\log \frac{e^{s_b \cdot M^t_{i_b}/\tau}}{e^{s_b \cdot M^t_{i_b}/\tau} + \sum_k e^{s_b \cdot M^t_{n_{bk}}/\tau}}
        -\log \frac{e^{t_b \cdot M^s_{i_b}/\tau}}{e^{t_b \cdot M^s_{i_b}/\tau} + \sum_k e^{t_b \cdot M^s_{n_{bk}}/\tau}}
        \Big)

    i.e. cross-entropy over 1 positive + K negatives, the student anchor against the teacher's bank
    plus the teacher anchor against the student's bank (the two symmetric parts of the authors'
    ``CRDLoss``, summed as there). The paper and its code (RepDistiller) use a binary NCE critic
    instead, with the normaliser :math:`Z` fixed from the first batch and the noise term
    :math:`K/N`. The authors' code for CMC (Tian, Krishnan & Isola, ECCV 2020), whose memory bank
    CRD's closely follows, offers this softmax form beside NCE (``NCESoftmaxLoss``, "a.k.a. info-NCE"),
    and many CRD reimplementations use it: no :math:`Z` to estimate, no :math:`N` in the loss.
    As in the paper the positives are the bank rows of the same sample (not the other network's
    current embedding), so compute the loss *before* :meth:`ContrastiveMemory.update` for the batch.

    Both embeddings get gradients (CRD trains the teacher's projection head, :class:`CRDEmbed`, not the
    teacher); the banks never do. Memory: the gathered keys are ``(B, 1 + K, d)`` per side.

    Args:
        student_embed: ``(B, d)``, L2-normalised student projections.
        teacher_embed: ``(B, d)``, L2-normalised teacher projections.
        student_memory: ``(N, d)`` bank of student embeddings, indexed by dataset index.
        teacher_memory: ``(N, d)`` bank of teacher embeddings.
        index: ``(B,)`` dataset indices of the batch's samples (the positives).
        negatives_index: ``(B, K)`` bank rows to contrast against
            (:meth:`ContrastiveMemory.sample_negatives`).
        temperature: :math:`\tau`; 0.07 as in the paper.

    Example:
        >>> memory = ContrastiveMemory(num_samples=6, dim=4)
        >>> embed = F.normalize(torch.randn(2, 4), dim=1)
        >>> index = torch.tensor([0, 3])
        >>> negatives = memory.sample_negatives(index, k=3)
        >>> loss = crd_loss(embed, embed, memory.student_memory, memory.teacher_memory, index, negatives)
        >>> memory.update(index, embed, embed)
        >>> bool(loss > 0)
        True
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if student_embed.dim() != 2 or student_embed.shape != teacher_embed.shape:
        raise ValueError(
            f"embeddings must both be (B, d), got student {tuple(student_embed.shape)} and teacher "
            f"{tuple(teacher_embed.shape)}; project both to the same d (CRDEmbed)."
        )
    if student_memory.shape != teacher_memory.shape or student_memory.shape[1:] != student_embed.shape[1:]:
        raise ValueError(
            f"memory banks must both be (N, {student_embed.shape[1]}), got student {tuple(student_memory.shape)} "
            f"and teacher {tuple(teacher_memory.shape)}."
        )
    batch = student_embed.shape[0]
    if index.shape != (batch,) or negatives_index.dim() != 2 or negatives_index.shape[0] != batch:
        raise ValueError(
            f"index must be ({batch},) and negatives_index ({batch}, K), got {tuple(index.shape)} and "
            f"{tuple(negatives_index.shape)}."
        )
    student_side = _info_nce(student_embed, teacher_memory, index, negatives_index, temperature)
    teacher_side = _info_nce(teacher_embed, student_memory, index, negatives_index, temperature)
    return student_side + teacher_side


class CRDEmbed(nn.Module):
    """CRD's projection head: flatten, linear, L2-normalise (one for the student, one for the teacher).

    Example:
        >>> head = CRDEmbed(in_features=12, dim=4)
        >>> embed = head(torch.randn(2, 3, 2, 2))  # conv maps are flattened: 3 * 2 * 2 = 12 features
        >>> embed.shape, torch.allclose(embed.norm(dim=1), torch.ones(2))
        (torch.Size([2, 4]), True)
    """

    def __init__(self, in_features: int, dim: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, dim)

    def forward(self, features: Tensor) -> Tensor:
        return F.normalize(self.linear(features.flatten(1)), dim=1)


AllGather = Callable[[Tensor], object]
"""Gathers a tensor from every rank: ``(world, B, ...)``, or the tensor itself on one process (Lightning's
``LightningModule.all_gather`` does both)."""


def _gather_batch(all_gather: AllGather, tensor: Tensor) -> Tensor:
    gathered = all_gather(tensor)
    if not isinstance(gathered, Tensor):
        raise TypeError(f"all_gather must return a tensor, got {type(gathered).__name__}.")
    return gathered.flatten(0, 1) if gathered.dim() == tensor.dim() + 1 else gathered


def _average_duplicates(index: Tensor, embed: Tensor) -> Tensor:
    """Each row replaced by the mean of the rows with the same index, so duplicate writes agree (no host sync)."""
    same = (index.unsqueeze(0) == index.unsqueeze(1)).to(embed.dtype)
    return (same @ embed) / same.sum(dim=1, keepdim=True)


class ContrastiveMemory(nn.Module):
    r"""CRD's memory banks: a running, L2-normalised student and teacher embedding per training sample.

    Both banks are buffers, so they are saved in ``state_dict`` (an exact resume) and moved with the
    module, and never trained. Rows start as random unit vectors (the authors' start uniform in a
    small cube, unnormalised; either way the first epoch's positives are noise). After computing
    :func:`crd_loss` for a batch, call :meth:`update` with the batch's dataset indices and embeddings
    (Tian et al., ICLR 2020):

    .. math::
        M_i \leftarrow \frac{m M_i + (1 - m) v_i}{\|m M_i + (1 - m) v_i\|_2}

    Under DDP pass ``all_gather=self.all_gather`` (LightningModule) to :meth:`update`, on every rank:
    each rank then applies the whole global batch, so the banks stay identical across ranks.

    Args:
        num_samples: ``N``, the training set's size (dataset indices lie in ``[0, N)``).
        dim: Embedding size ``d`` (of :class:`CRDEmbed`).
        momentum: :math:`m`, the weight of the old row; 0.5 as in the authors' code.

    Example:
        >>> memory = ContrastiveMemory(num_samples=100, dim=16)
        >>> sorted(memory.state_dict())
        ['student_memory', 'teacher_memory']
        >>> memory.sample_negatives(torch.tensor([0, 5]), k=8).shape
        torch.Size([2, 8])
    """

    student_memory: Tensor
    teacher_memory: Tensor

    def __init__(self, num_samples: int, dim: int, momentum: float = 0.5) -> None:
        super().__init__()
        if num_samples < 2 or dim < 1:
            raise ValueError(
                f"need num_samples >= 2 (a positive and a negative) and dim >= 1, got {num_samples}, {dim}."
            )
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}.")
        self.momentum = momentum
        self.register_buffer("student_memory", F.normalize(torch.randn(num_samples, dim), dim=1))
        self.register_buffer("teacher_memory", F.normalize(torch.randn(num_samples, dim), dim=1))

    @torch.no_grad()
    def update(
        self, index: Tensor, student_embed: Tensor, teacher_embed: Tensor, all_gather: AllGather | None = None
    ) -> None:
        """Momentum-update the banks' rows ``index`` with the batch's embeddings, then renormalise them.

        Args:
            index: ``(B,)`` dataset indices. One sample seen twice in the (global) batch is updated once,
                with the mean of its embeddings.
            student_embed: ``(B, d)`` student embeddings (detached here).
            teacher_embed: ``(B, d)`` teacher embeddings.
            all_gather: Under DDP, gathers a tensor from every rank (``LightningModule.all_gather``);
                every rank must call ``update`` with batches of the same size.
        """
        expected = (index.shape[0], self.student_memory.shape[1])
        if index.dim() != 1 or student_embed.shape != expected or teacher_embed.shape != expected:
            raise ValueError(
                f"update needs index (B,) and embeddings (B, {expected[1]}), got {tuple(index.shape)}, "
                f"{tuple(student_embed.shape)} and {tuple(teacher_embed.shape)}."
            )
        index = index.long()  # index_copy_ wants int64
        if all_gather is not None:
            index, student_embed, teacher_embed = (
                _gather_batch(all_gather, x) for x in (index, student_embed, teacher_embed)
            )
        self._update_bank(self.student_memory, index, student_embed)
        self._update_bank(self.teacher_memory, index, teacher_embed)

    def _update_bank(self, bank: Tensor, index: Tensor, embed: Tensor) -> None:
        embed = _average_duplicates(index, embed.detach().to(bank.dtype))
        rows = F.normalize(self.momentum * bank[index] + (1 - self.momentum) * embed, dim=1)
        bank.index_copy_(0, index, rows)

    def sample_negatives(self, index: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """``(B, k)`` bank rows drawn uniformly with replacement, never the sample's own ``index``.

        CRD's data loader can draw negatives from other *classes* instead; that needs the labels, so
        pass such indices to :func:`crd_loss` yourself. ``generator`` must live on the banks' device.
        """
        if k < 1:
            raise ValueError(f"k (negatives per sample) must be >= 1, got {k}.")
        num_samples = self.student_memory.shape[0]
        # Draw from N - 1 rows and skip over the positive: uniform over the others, no rejection loop.
        draws = torch.randint(
            0, num_samples - 1, (index.shape[0], k), generator=generator, device=self.student_memory.device
        )
        index = index.to(draws.device).unsqueeze(1)
        return draws + (draws >= index).long()


def shifted_negatives(index: Tensor, k: int, num_samples: int, seed: int) -> Tensor:
    """``(B, k)`` negatives: each sample's index shifted by ``k`` offsets drawn from ``seed``, modulo ``num_samples``.

    The offsets lie in ``[1, num_samples)``, so a sample is never its own negative and each of its negatives is
    uniform over the other rows. They depend on ``seed`` alone, so a sample's negatives are the same wherever
    it falls: in a batch of one process or split across DDP ranks (seed the training step: every rank draws
    the same offsets), in a run or in its resumption. Vectorised, no host sync (the ``k`` offsets are drawn
    on the CPU and copied once).

    Example:
        >>> a = shifted_negatives(torch.tensor([0, 5, 9]), k=4, num_samples=10, seed=3)
        >>> b = shifted_negatives(torch.tensor([5]), k=4, num_samples=10, seed=3)
        >>> torch.equal(a[1:2], b), bool((a != torch.tensor([[0], [5], [9]])).all())
        (True, True)
    """
    if k < 1 or num_samples < 2:
        raise ValueError(f"need k >= 1 and num_samples >= 2, got k={k}, num_samples={num_samples}.")
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(1, num_samples, (k,), generator=generator).to(index.device, non_blocking=True)
    return (index.long().unsqueeze(1) + offsets) % num_samples
