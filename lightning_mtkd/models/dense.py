"""A small SegNet-like encoder–decoder for dense multi-task prediction (segmentation, depth, normals)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mtkd.config import RecordsInitArgs


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """``[conv3×3 → BN → ReLU] × 2``, SegNet's unit."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SegNet(RecordsInitArgs, nn.Module):
    """SegNet-like shared encoder–decoder with one dense head per task; forward returns ``{task: (B, C, H, W)}``.

    The encoder halves the resolution ``len(widths)`` times with max-pooling that remembers where
    each maximum was; the decoder un-pools to those places (Badrinarayanan et al., *SegNet*, TPAMI 2017),
    as in the MTAN/SegNet baselines on NYUv2 (Liu et al., CVPR 2019). Heads are ``conv3×3 → ReLU →
    conv1×1`` on the shared decoded map, so every output has the input's resolution (any size: odd
    sizes un-pool back to their own shape). Scale ``widths`` to make a teacher and a student.

    Feature paths: ``bottleneck`` (``(B, widths[-1], H / 2^n, W / 2^n)``) and ``decoder`` (the shared
    full-resolution map, ``(B, widths[0], H, W)``), for hints and adaptors at matched resolutions.

    Args:
        heads: Output channels per task, e.g. ``{"segmentation": 13, "depth": 1, "normals": 3}``.
        in_channels: Input channels (3 for RGB).
        widths: Channels of the encoder stages, from the input down.

    Example:
        >>> import torch
        >>> net = SegNet({"segmentation": 13, "depth": 1}, widths=(4, 8))
        >>> {k: tuple(v.shape) for k, v in net(torch.zeros(2, 3, 30, 20)).items()}
        {'segmentation': (2, 13, 30, 20), 'depth': (2, 1, 30, 20)}
    """

    def __init__(self, heads: dict[str, int], in_channels: int = 3, widths: Sequence[int] = (32, 64, 128)) -> None:
        super().__init__()
        if not heads:
            raise ValueError("SegNet: `heads` is empty; give the output channels per task, e.g. {'depth': 1}.")
        if not widths:
            raise ValueError("SegNet: `widths` is empty; give at least one encoder stage width.")
        widths = list(widths)
        inputs = [in_channels, *widths[:-1]]
        self.encoder = nn.ModuleList(conv_block(c_in, c_out) for c_in, c_out in zip(inputs, widths, strict=True))
        self.bottleneck = conv_block(widths[-1], widths[-1])
        # Up-stage i un-pools stage i's map, then maps widths[i] → widths[i - 1] (the first stays at widths[0]).
        self.up = nn.ModuleList(conv_block(widths[i], widths[max(i - 1, 0)]) for i in reversed(range(len(widths))))
        self.decoder = conv_block(widths[0], widths[0])
        self.heads = nn.ModuleDict(
            {
                name: nn.Sequential(
                    nn.Conv2d(widths[0], widths[0], 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(widths[0], size, 1)
                )
                for name, size in heads.items()
            }
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.dim() != 4:
            raise ValueError(f"SegNet reads images (B, C, H, W); got an input of shape {tuple(x.shape)}.")
        if min(x.shape[-2:]) < 2 ** len(self.encoder):
            raise ValueError(
                f"SegNet halves the resolution {len(self.encoder)} times, so inputs need sides of at least "
                f"{2 ** len(self.encoder)} pixels; got {tuple(x.shape[-2:])}. Use larger images or fewer widths."
            )
        switches = []
        for stage in self.encoder:
            x = stage(x)
            pooled = F.max_pool2d(x, 2)
            switches.append(_argmax_mask(x, pooled))
            x = pooled
        x = self.bottleneck(x)
        for stage, mask in zip(self.up, reversed(switches), strict=True):
            x = stage(_unpool(x, mask))
        x = self.decoder(x)
        return {name: head(x) for name, head in self.heads.items()}


def _upsample2(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """Each value copied into its 2×2 window, padded to ``size`` (odd sides); expand/reshape are deterministic."""
    b, c, h, w = x.shape
    up = x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)
    return F.pad(up, (0, size[1] - 2 * w, 0, size[0] - 2 * h))


def _argmax_mask(x: Tensor, pooled: Tensor) -> Tensor:
    """Where each 2×2 window's maximum was: SegNet's pooling switches.

    A mask rather than ``max_pool2d(return_indices=True)`` + ``max_unpool2d``, which has no
    deterministic kernel (``Trainer(deterministic=True)`` refuses it, even on CPU).
    """
    up = _upsample2(pooled, tuple(x.shape[-2:]))
    inside = _upsample2(torch.ones_like(pooled[:1, :1]), tuple(x.shape[-2:])).bool()  # odd rows/cols: not pooled
    return (x == up) & inside


def _unpool(x: Tensor, mask: Tensor) -> Tensor:
    """Place each value back where its window's maximum was (zeros elsewhere)."""
    return _upsample2(x, tuple(mask.shape[-2:])) * mask
