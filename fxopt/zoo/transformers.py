"""The zoo's attention models: a pre-norm transformer encoder (multi-head attention,
LayerNorm, GELU) and a grouped-query attention stack (SDPA, RMSNorm).

Example:
    >>> from fxopt.zoo.transformers import GQATransformer
    >>> GQATransformer()(torch.randn(2, 16, 64)).shape
    torch.Size([2, 16, 32])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block (hand-written so ``symbolic_trace`` can capture it)."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.drop1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop1(self.attn(h, h, h, need_weights=False)[0])
        return x + self.drop2(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """Token ids → embeddings + learned positions → 2 encoder blocks → LayerNorm → logits."""

    def __init__(self, vocab: int = 100, dim: int = 64, heads: int = 4, max_len: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.5)
        self.drop = nn.Dropout(0.1)
        self.blocks = nn.Sequential(
            EncoderBlock(dim, heads, 4 * dim), EncoderBlock(dim, heads, 4 * dim)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.embed(ids) + self.pos[:, : ids.size(1)])
        return self.head(self.norm(self.blocks(x)))


class RMSNorm(nn.Module):
    """Root-mean-square norm, written out so it traces to plain pow/mean/rsqrt/mul ops."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class GroupedQueryAttention(nn.Module):
    """Causal attention with fewer key/value heads than query heads (kv heads repeated)."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim)
        self.out_proj = nn.Linear(heads * self.head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Head counts are Python ints on self, so fx sees only reshape/transpose calls.
        q = self.q_proj(x).reshape(x.shape[0], -1, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).reshape(x.shape[0], -1, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).reshape(x.shape[0], -1, self.kv_heads, self.head_dim).transpose(1, 2)
        repeats = self.heads // self.kv_heads
        k = k.repeat_interleave(repeats, dim=1)
        v = v.repeat_interleave(repeats, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.transpose(1, 2).reshape(x.shape[0], -1, self.heads * self.head_dim)
        return self.out_proj(out)


class GQABlock(nn.Module):
    """Pre-norm block: RMSNorm → grouped-query attention, RMSNorm → GELU MLP, residuals."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = GroupedQueryAttention(dim, heads, kv_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GQATransformer(nn.Module):
    """Two grouped-query attention blocks (4 query heads, 2 kv heads) and a linear head."""

    def __init__(self, dim: int = 64, heads: int = 4, kv_heads: int = 2, out: int = 32) -> None:
        super().__init__()
        self.blocks = nn.Sequential(GQABlock(dim, heads, kv_heads), GQABlock(dim, heads, kv_heads))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(x)))
