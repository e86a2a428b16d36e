"""Adaptors: small trainable maps from a student feature to a teacher feature's shape."""

from __future__ import annotations

from collections.abc import Sequence

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
