"""A small pre-LayerNorm transformer classifier over sequences (e.g. MNIST-1D's 40 samples):
``embed`` (per-token linear), ``pos``, ``blocks.N.{ln1, attn.qkv, attn.proj, ln2, mlp.fc1, mlp.fc2}``,
``ln_f``, ``head`` on the mean-pooled tokens."""

from __future__ import annotations

import torch
from torch import nn

from rebasin.models.registry import register_model


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape  # heads read their width from qkv (the stream may be wider: PLeaS)
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, mlp_ratio * dim))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Tokens are the input's positions (a scalar, or a channel vector, per position)."""

    def __init__(
        self,
        seq_len: int = 40,
        in_channels: int = 1,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 2,
        num_classes: int = 10,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.embed = nn.Linear(in_channels, dim)
        self.pos = nn.Parameter(torch.randn(1, seq_len, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # (N, T) -> (N, T, 1)
            x = x.unsqueeze(-1)
        elif self.in_channels > 1 and x.shape[-1] != self.in_channels:  # (N, C, T) -> (N, T, C)
            x = x.transpose(1, 2)
        h = self.blocks(self.embed(x) + self.pos)
        return self.head(self.ln_f(h).mean(1))


@register_model("transformer")
def transformer(**kwargs: object) -> nn.Module:
    """A small transformer classifier (see :class:`Transformer` for arguments)."""
    return Transformer(**kwargs)  # type: ignore[arg-type]
