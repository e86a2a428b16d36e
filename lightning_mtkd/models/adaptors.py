"""Adaptors: small trainable maps from a student feature to a teacher feature's shape."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Adaptor(nn.Module):
    """A linear map from student to teacher feature space (FitNets regressor; Li & Bilen's task adaptor).

    Vectors ``(B, Cs)`` → ``(B, Ct)`` and token sequences ``(B, L, Ds)`` → ``(B, L, Dt)`` (transformer
    hidden states: one linear map applied to every token) through ``nn.Linear``; maps ``(B, Cs, H, W)`` →
    ``(B, Ct, H', W')`` through a 1×1 convolution, resized bilinearly when the spatial sizes differ.

    Build it from the two feature shapes seen in a dry run with :meth:`between`, or from a
    checkpoint's tensors with :meth:`from_state`.

    Example:
        >>> adaptor = Adaptor.between((2, 8), (2, 32))
        >>> tuple(adaptor(torch.zeros(2, 8)).shape)
        (2, 32)
    """

    def __init__(self, in_channels: int, out_channels: int, spatial_size: Sequence[int] = ()) -> None:
        super().__init__()
        if spatial_size:
            self.proj: nn.Module = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        else:
            self.proj = nn.Linear(in_channels, out_channels)
        # Kept in the state dict so that a checkpoint alone rebuilds the adaptor.
        self.register_buffer("spatial_size", torch.tensor(list(spatial_size), dtype=torch.long))
        self._size = tuple(int(s) for s in spatial_size)

    @classmethod
    def between(cls, student_shape: Sequence[int], teacher_shape: Sequence[int], name: str = "feature") -> Adaptor:
        """An adaptor for features of these shapes (batch dimension first), or a clear error if none fits."""
        student_shape, teacher_shape = tuple(student_shape), tuple(teacher_shape)
        if len(student_shape) != len(teacher_shape) or len(student_shape) not in (2, 3, 4):
            raise ValueError(
                f"{name}: no adaptor maps a student feature of shape {student_shape} to a teacher feature of shape "
                f"{teacher_shape}. Adaptors bridge vectors (B, C) to vectors, token sequences (B, L, D) to token "
                "sequences and maps (B, C, H, W) to maps; pick feature paths of the same kind in both models."
            )
        if len(student_shape) == 3:
            if student_shape[1] != teacher_shape[1]:
                raise ValueError(
                    f"{name}: the student's feature has {student_shape[1]} tokens and the teacher's {teacher_shape[1]} "
                    f"(shapes {student_shape} and {teacher_shape}); token features are compared token by token, so "
                    "both models must see the same tokens (same tokenizer, same patching)."
                )
            return cls(student_shape[2], teacher_shape[2])
        return cls(student_shape[1], teacher_shape[1], teacher_shape[2:])

    @classmethod
    def from_state(cls, state: dict[str, Tensor], prefix: str) -> Adaptor:
        """Rebuild an adaptor with the shapes stored under ``prefix`` in a state dict."""
        weight = state[f"{prefix}proj.weight"]
        spatial = state[f"{prefix}spatial_size"].tolist()
        return cls(weight.shape[1], weight.shape[0], spatial)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._size = tuple(int(s) for s in self.spatial_size.tolist())

    def forward(self, feature: Tensor) -> Tensor:
        out = self.proj(feature)
        if self._size and tuple(out.shape[-2:]) != self._size:
            out = F.interpolate(out, size=self._size, mode="bilinear", align_corners=False)
        return out


class CRDHead(nn.Module):
    """What contrastive representation distillation trains beside the student: two projection heads and the banks.

    Tian, Krishnan & Isola, *Contrastive Representation Distillation* (ICLR 2020), through the pure
    :func:`~lightning_mtkd.losses.relational.crd_loss` and :class:`~lightning_mtkd.losses.relational.ContrastiveMemory`:
    the student's and the teacher's features (any shapes, flattened) are projected to ``dim`` and
    L2-normalised (:class:`~lightning_mtkd.losses.relational.CRDEmbed`), contrasted with the other
    side's bank rows of the same sample against ``negatives`` other rows, and the banks (keyed by each
    sample's dataset index, ``batch["index"]``) are then updated with the batch. The banks are buffers,
    so they are in the checkpoint and a resumed run continues exactly; each sample's negatives are a
    function of its index and the training step
    (:func:`~lightning_mtkd.losses.relational.shifted_negatives`), so a resumed run draws the same ones and
    a batch split across DDP ranks draws what one process would.

    Args:
        student_features, teacher_features: The flattened widths of the two features.
        num_samples: The training set's size (the banks' rows).
        dim: The embedding size (128 in the paper).
        negatives: Negatives per sample (at most ``num_samples - 1``).
        temperature: The softmax temperature (0.07 in the paper).
        momentum: The banks' momentum (0.5 in the paper).
    """

    settings: Tensor

    def __init__(
        self,
        student_features: int,
        teacher_features: int,
        num_samples: int,
        dim: int = 128,
        negatives: int = 512,
        temperature: float = 0.07,
        momentum: float = 0.5,
    ) -> None:
        super().__init__()
        from lightning_mtkd.losses.relational import ContrastiveMemory, CRDEmbed

        self.student_embed = CRDEmbed(student_features, dim)
        self.teacher_embed = CRDEmbed(teacher_features, dim)
        self.memory = ContrastiveMemory(num_samples, dim, momentum)
        # Drawn from a fixed seed, not the run's random state: the same start in every process and run (DDP ranks
        # and a single process agree whatever each consumed before setup), and no shift of the run's own draws.
        generator = torch.Generator().manual_seed(num_samples * 1_000_003 + dim)
        with torch.no_grad():
            for embed in (self.student_embed, self.teacher_embed):
                bound = 1.0 / math.sqrt(embed.linear.in_features)  # nn.Linear's default range
                embed.linear.weight.uniform_(-bound, bound, generator=generator)
                embed.linear.bias.uniform_(-bound, bound, generator=generator)
            for bank in (self.memory.student_memory, self.memory.teacher_memory):
                bank.copy_(F.normalize(torch.randn(bank.shape, generator=generator), dim=1))
        self.negatives, self.temperature = min(negatives, num_samples - 1), temperature
        # Kept in the state dict so that a checkpoint alone rebuilds the head as it was.
        self.register_buffer("settings", torch.tensor([self.negatives, temperature, momentum]))

    @classmethod
    def between(
        cls, student_shape: Sequence[int], teacher_shape: Sequence[int], num_samples: int, settings: Any = None
    ) -> CRDHead:
        """Heads for features of these shapes; ``settings``: a :class:`~lightning_mtkd.strategies.step.CRD`."""
        options = {} if settings is None else dataclasses.asdict(settings)
        return cls(math.prod(student_shape[1:]), math.prod(teacher_shape[1:]), num_samples, **options)

    @classmethod
    def from_state(cls, state: dict[str, Tensor], prefix: str) -> CRDHead:
        student = state[f"{prefix}student_embed.linear.weight"]
        teacher = state[f"{prefix}teacher_embed.linear.weight"]
        bank = state[f"{prefix}memory.student_memory"]
        negatives, temperature, momentum = state[f"{prefix}settings"].tolist()
        return cls(
            student.shape[1], teacher.shape[1], bank.shape[0], student.shape[0], int(negatives), temperature, momentum
        )

    def forward(
        self, student: Tensor, teacher: Tensor, index: Tensor, seed: int, update: bool = True, all_gather: Any = None
    ) -> Tensor:
        """The CRD loss of a batch; with ``update``, the banks then take the batch's embeddings."""
        from lightning_mtkd.losses.relational import crd_loss, shifted_negatives

        student_embed, teacher_embed = self.student_embed(student), self.teacher_embed(teacher)
        negatives_index = shifted_negatives(index, self.negatives, self.memory.student_memory.shape[0], seed)
        loss = crd_loss(
            student_embed,
            teacher_embed,
            self.memory.student_memory,
            self.memory.teacher_memory,
            index,
            negatives_index,
            self.temperature,
        )
        if update:
            self.memory.update(index, student_embed, teacher_embed, all_gather)
        return loss
