"""A shared trunk with one head per task."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_mtkd.config import RecordsInitArgs


class MultiTaskNet(RecordsInitArgs, nn.Module):
    """Hard parameter sharing: ``backbone`` → one linear head per task; forward returns ``{task: output}``.

    The shared representation is the output of ``backbone`` (feature path ``"backbone"``).

    Args:
        backbone: Any module mapping the input to ``(B, out_features)``.
        heads: Output width per task, e.g. ``{"left": 10, "right": 10}``.
        out_features: The backbone's output width; read from ``backbone.out_features`` (ours) or
            ``backbone.num_features`` (timm's convention) if omitted.

    Example:
        >>> import torch
        >>> from lightning_mtkd.models import MLPBackbone
        >>> net = MultiTaskNet(MLPBackbone(in_features=4, hidden=(8,)), heads={"a": 3, "b": 1})
        >>> {k: tuple(v.shape) for k, v in net(torch.zeros(2, 4)).items()}
        {'a': (2, 3), 'b': (2, 1)}
    """

    def __init__(self, backbone: nn.Module, heads: dict[str, int], out_features: int | None = None) -> None:
        super().__init__()
        width = out_features
        for attribute in ("out_features", "num_features"):
            width = width if width is not None else getattr(backbone, attribute, None)
        if not isinstance(width, int):
            raise ValueError(
                "MultiTaskNet: cannot tell the backbone's output width; give `out_features` or set "
                "`backbone.out_features` (or timm's `backbone.num_features`)."
            )
        if not heads:
            raise ValueError("MultiTaskNet: `heads` is empty; give one output width per task, e.g. {'left': 10}.")
        self.backbone = backbone
        self.heads = nn.ModuleDict({name: nn.Linear(width, size) for name, size in heads.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        shared = self.backbone(x)
        return {name: head(shared) for name, head in self.heads.items()}
