"""Small configurable backbones, so that a teacher and a much smaller student come from one family."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_mtkd.config import RecordsInitArgs


class ConvBackbone(RecordsInitArgs, nn.Module):
    """A plain conv net: ``[conv3x3 → BN → ReLU → maxpool] × len(widths)``, pooled, then one hidden layer.

    Submodules (feature paths): ``features`` (the last conv map, ``(B, widths[-1], h, w)``) and
    ``neck`` (the shared vector, ``(B, hidden)``). ``out_features`` is ``hidden``.

    Args:
        in_channels: Input channels (1 for MNIST-like digits).
        widths: Channels of each conv stage; scale them to make a teacher or a student.
        hidden: Width of the shared feature vector.
        pooled_size: Spatial size the last map is average-pooled to before the hidden layer.
        dropout: Dropout before the hidden layer (regularises a teacher on small data).
        channels_last: Keep the conv weights and activations in NHWC memory order. The layout changes
            nothing in the results (up to float rounding), only the speed: oneDNN's NHWC conv kernels run a
            training step of the demo's student 1.8× and the teacher's 1.45× faster on CPU
            (``benchmarks/memory_format.py``), and tensor cores prefer it on GPU. ``False``: the NCHW default.

    Example:
        >>> import torch
        >>> net = ConvBackbone(widths=(4, 8), hidden=32)
        >>> tuple(net(torch.zeros(2, 1, 36, 36)).shape)
        (2, 32)
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64),
        hidden: int = 256,
        pooled_size: int = 4,
        dropout: float = 0.0,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.channels_last = channels_last
        if channels_last:
            # `Module.to(device)` later keeps each weight's strides, so the layout survives moves and loads.
            self.features.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.pool = nn.AdaptiveAvgPool2d(pooled_size)
        self.neck = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels * pooled_size**2, hidden), nn.ReLU(inplace=True)
        )
        self.out_features = hidden

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # free for 1-channel input (same memory order)
        return self.neck(self.pool(self.features(x)))


class MLPBackbone(RecordsInitArgs, nn.Module):
    """An MLP for flat (tabular) inputs; images are flattened. ``out_features`` is ``hidden[-1]``.

    Example:
        >>> import torch
        >>> tuple(MLPBackbone(in_features=8, hidden=(16, 4))(torch.zeros(3, 8)).shape)
        (3, 4)
    """

    def __init__(self, in_features: int, hidden: Sequence[int] = (256, 128), dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = size
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["ConvBackbone", "MLPBackbone", "count_parameters"]
