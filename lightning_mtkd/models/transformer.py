"""A tiny vision transformer on image patches, so that transformer attention can be distilled on MultiMNIST."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_mtkd.config import RecordsInitArgs


class PatchTransformerBackbone(RecordsInitArgs, nn.Module):
    """Non-overlapping patches → linear embedding + learned positions → pre-norm transformer encoder → mean token.

    Attention layers (feature paths for :class:`~lightning_mtkd.AttentionDistiller`) are
    ``encoder.layers.<i>.self_attn`` (``nn.MultiheadAttention``, batch first); with
    :class:`~lightning_mtkd.models.MultiTaskNet` they are ``backbone.encoder.layers.<i>.self_attn``.
    The tokens are the ``(image_size / patch_size)²`` patches (no class token), so a teacher and a
    student with the same patching attend over the same tokens. ``out_features`` is ``dim``.

    Args:
        in_channels: Input channels.
        image_size: Side of the (square) input; a multiple of ``patch_size``.
        patch_size: Side of a patch.
        dim: Token width; a multiple of ``heads``.
        depth: Encoder layers.
        heads: Attention heads per layer.
        mlp_ratio: Width of each layer's feed-forward block, relative to ``dim``.
        dropout: Dropout inside the encoder layers.

    Example:
        >>> net = PatchTransformerBackbone(image_size=12, patch_size=6, dim=8, depth=1, heads=2)
        >>> tuple(net(torch.zeros(3, 1, 12, 12)).shape)
        (3, 8)
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 36,
        patch_size: int = 6,
        dim: int = 32,
        depth: int = 2,
        heads: int = 2,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}.")
        if dim % heads:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}.")
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.position = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, int(dim * mlp_ratio), dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # No nested tensors: there is no padding mask, and they would skip the attention modules' hooks.
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out_features = dim

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        if tokens.shape[1] != self.num_patches:
            raise ValueError(
                f"PatchTransformerBackbone: input {tuple(x.shape)} gives {tokens.shape[1]} patches, but the model was "
                f"built for {self.num_patches}; set image_size to the input's side."
            )
        return self.norm(self.encoder(tokens + self.position)).mean(dim=1)


__all__ = ["PatchTransformerBackbone"]
