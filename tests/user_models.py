"""User-style models for traced specs (importable as ``user_models:NAME`` from the tests folder)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ResidualCNN(nn.Module):
    """Stem, two residual blocks (depthwise conv and BatchNorm, then GroupNorm), a strided projection,
    pooling, head."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.block1 = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, groups=width),  # depthwise
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
        )  # fmt: skip
        self.down = nn.Conv2d(width, 2 * width, 1, stride=2)
        self.block2 = nn.Sequential(
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GroupNorm(4, 2 * width), nn.GELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        )  # fmt: skip
        self.head = nn.Linear(2 * width, classes)
        self.example_input = torch.randn(2, 3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(x + self.block1(x))
        x = self.down(x)
        x = x + self.block2(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(
            nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens)
        )
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, 3 * dim), nn.GELU(), nn.Linear(3 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class Mixer(nn.Module):
    """MLP-Mixer: patch embedding conv, token-mixing and channel-mixing MLPs, mean-pooled head."""

    def __init__(self, dim: int = 16, depth: int = 2, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 2, stride=2)
        self.blocks = nn.Sequential(*[MixerBlock(16, dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.example_input = torch.randn(2, 3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (N, tokens, dim)
        return self.head(self.norm(self.blocks(x)).mean(1))


class AttentionNet(nn.Module):
    """Token embedding, pre-LN blocks around nn.MultiheadAttention, dropout, tied output head."""

    def __init__(self, vocab: int = 20, dim: int = 16, heads: int = 4, depth: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, 6, dim) * 0.1)
        self.ln = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2 * depth)])
        self.attn = nn.ModuleList([nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(depth)])
        self.ff = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Dropout(0.1), nn.Linear(2 * dim, dim))
                for _ in range(depth)
            ]
        )
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight  # tied
        self.example_input = torch.randint(0, vocab, (2, 6))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos
        for i, (attn, ff) in enumerate(zip(self.attn, self.ff, strict=True)):
            h = self.ln[2 * i](x)
            x = x + attn(h, h, h, need_weights=False)[0]
            x = x + ff(self.ln[2 * i + 1](x))
        return self.out(x)


class Functional(nn.Module):
    """Raw parameters and functional calls: F.linear, a SwiGLU by chunk, cat of two branches,
    a learned scale, matmul with a parameter, and Python control flow on shapes."""

    def __init__(self, d_in: int = 12, hidden: int = 16, classes: int = 5):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(2 * hidden, d_in) * 0.3)
        self.b1 = nn.Parameter(torch.randn(2 * hidden) * 0.1)
        self.wa = nn.Parameter(torch.randn(hidden, hidden) * 0.3)
        self.wb = nn.Parameter(torch.randn(hidden, hidden) * 0.3)
        self.scale = nn.Parameter(torch.rand(2 * hidden) + 0.5)
        self.w_out = nn.Parameter(torch.randn(2 * hidden, classes) * 0.3)
        self.example_input = torch.randn(3, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:
            x = x.unsqueeze(0)
        gate, up = F.linear(x, self.w1, self.b1).chunk(2, dim=-1)
        h = F.silu(gate) * up
        both = torch.cat([torch.tanh(h @ self.wa.T), F.relu(F.linear(h, self.wb))], dim=-1)
        return (both * self.scale) @ self.w_out


class SENet(nn.Module):
    """Squeeze-and-excitation gate, depthwise-separable conv, normalized features."""

    def __init__(self, c: int = 16, classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.fc1 = nn.Linear(c, 4)
        self.fc2 = nn.Linear(4, c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pw = nn.Conv2d(c, 24, 1)
        self.head = nn.Linear(24, classes)
        self.example_input = torch.randn(2, 3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.bn(self.conv(x)))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        x = self.pw(self.dw(x * w[:, :, None, None]))
        x = F.adaptive_avg_pool2d(x, 1).squeeze(-1).squeeze(-1)
        return self.head(F.normalize(x, dim=-1))


class EinsumAttention(nn.Module):
    """Single-head attention written with einsum over a fused, chunked qkv projection."""

    def __init__(self, d: int = 16, d_in: int = 5, classes: int = 3):
        super().__init__()
        self.emb = nn.Linear(d_in, d)
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)
        self.out = nn.Linear(d, classes)
        self.example_input = torch.randn(2, 6, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.emb(x)
        q, k, v = self.qkv(self.ln(x)).chunk(3, dim=-1)
        att = torch.einsum("bid,bjd->bij", q, k).softmax(-1)
        x = x + self.o(torch.einsum("bij,bjd->bid", att, v))
        return self.out(x.mean(1))


class NanoBlock(nn.Module):
    def __init__(self, d: int, heads: int, rope: bool):
        super().__init__()
        self.heads, self.rope = heads, rope
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        if self.rope:  # rotary embedding on q and k, written out
            hs = c // self.heads
            ang = torch.arange(t)[:, None] * torch.arange(hs // 2)[None, :] * 0.1
            cos, sin = ang.cos().repeat(1, 2), ang.sin().repeat(1, 2)

            def rot(z: torch.Tensor) -> torch.Tensor:
                z1, z2 = z.chunk(2, dim=-1)
                return z * cos + torch.cat([-z2, z1], dim=-1) * sin

            q, k = rot(q), rot(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class NanoGPT(nn.Module):
    """A nanoGPT-style model: attention written by hand (split, view into heads, SDPA)."""

    def __init__(self, rope: bool = False, vocab: int = 20, d: int = 32, heads: int = 4):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(8, d)
        self.blocks = nn.ModuleList([NanoBlock(d, heads, rope) for _ in range(2)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.example_input = torch.randint(0, vocab, (2, 8))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def nano_gpt() -> nn.Module:
    return NanoGPT()


def nano_gpt_rope() -> nn.Module:
    return NanoGPT(rope=True)


def se_net() -> nn.Module:
    return SENet()


def einsum_attention() -> nn.Module:
    return EinsumAttention()


def residual_cnn() -> nn.Module:
    return ResidualCNN()


def mixer() -> nn.Module:
    return Mixer()


def attention_net() -> nn.Module:
    return AttentionNet()


def functional() -> nn.Module:
    return Functional()
