"""Models as researchers bring them: a plain ``nn.Module``, a Hugging Face transformer, a timm-style ViT.

None derives from a lightning-mtkd class or has a submodule named ``backbone``. Module scope, so they
pickle for ``ddp_spawn`` and their class paths import again when a checkpoint is reloaded. Each stores
its constructor arguments as attributes of the same names, as most research code does for some of them;
``OpaqueNet`` does not, to test the error that says what to pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertConfig, BertModel


class PlainConvNet(nn.Module):
    """A small conv net with a shared trunk and one linear head per task."""

    def __init__(self, width: int = 4, hidden: int = 16, tasks: tuple[str, ...] = ("left", "right"), classes: int = 10):
        super().__init__()
        self.width, self.hidden, self.tasks, self.classes = width, hidden, list(tasks), classes
        self.trunk = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * width, hidden),
            nn.ReLU(),
        )
        self.out = nn.ModuleDict({task: nn.Linear(hidden, classes) for task in tasks})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x)
        return {task: head(h) for task, head in self.out.items()}


class OpaqueNet(nn.Module):
    """Like PlainConvNet, but its constructor arguments are not kept: a checkpoint cannot rebuild it alone."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(144, hidden), nn.ReLU())
        self.left, self.right = nn.Linear(hidden, 10), nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.body(x)
        return {"left": self.left(h), "right": self.right(h)}


def bert_config(hidden: int = 16, layers: int = 2, heads: int = 2, vocab: int = 40, eager: bool = True) -> BertConfig:
    """A tiny, randomly initialised BERT configuration (no weights can be downloaded here)."""
    return BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager" if eager else "sdpa",
    )


class BertMultiTask(nn.Module):
    """A Hugging Face encoder with one head per task on its pooled output; called as ``model(**tokens)``."""

    def __init__(self, config: BertConfig, head_sizes: dict[str, int]) -> None:
        super().__init__()
        self.config, self.head_sizes = config, dict(head_sizes)
        self.bert = BertModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.heads = nn.ModuleDict({task: nn.Linear(config.hidden_size, n) for task, n in head_sizes.items()})

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        pooled = self.bert(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        h = self.dropout(pooled)
        return {task: head(h) for task, head in self.heads.items()}


class TimmStyleAttention(nn.Module):
    """timm's ``Attention``: one ``qkv`` projection and a fused kernel that never materialises the weights."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class TimmStyleBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), TimmStyleAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmStyleViT(nn.Module):
    """A timm-style ViT (patch embedding, blocks, ``forward_features``, ``num_features``) with a head per task."""

    def __init__(self, dim: int = 16, depth: int = 2, num_heads: int = 2, tasks: tuple[str, ...] = ("left", "right")):
        super().__init__()
        self.dim, self.depth, self.num_heads, self.tasks = dim, depth, num_heads, list(tasks)
        self.num_features = dim
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=4, stride=4)  # 12×12 → 9 tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, 9, dim))
        self.blocks = nn.Sequential(*[TimmStyleBlock(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.ModuleDict({task: nn.Linear(dim, 10) for task in tasks})

    def forward_features(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.norm(self.blocks(tokens)).mean(dim=1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.forward_features(x)
        return {task: head(features) for task, head in self.head.items()}
