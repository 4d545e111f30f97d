"""A model file that calls ``torch.fx.wrap``-ped helpers, as torchvision and timm model files
do; it lives outside fxopt, so an eager artifact may not call its functions by name.
Imported by tests/lowering/test_eager_helpers.py (tests/lowering is on sys.path there)."""

from __future__ import annotations

import torch
import torch.fx
from torch import nn


@torch.fx.wrap
def _get_relative_position_bias(table: torch.Tensor, index: torch.Tensor, window: list[int]):
    n = window[0] * window[1]
    return table[index].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)


@torch.fx.wrap
def stochastic_depth(input: torch.Tensor, p: float, mode: str, training: bool = True):
    if not training or p == 0.0:
        return input
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    return input * torch.empty(size).bernoulli_(1.0 - p).div_(1.0 - p)


@torch.fx.wrap
def _scale(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return x * alpha + torch.tensor([0.5, -0.5]).repeat(x.shape[-1] // 2)


@torch.fx.wrap
def scaled_residual(x: torch.Tensor, y: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Calls another wrapped helper: inlining goes two levels deep."""
    return x + _scale(F_gelu(y), alpha)


def F_gelu(x: torch.Tensor) -> torch.Tensor:  # noqa: N802 - a plain, unwrapped helper
    return torch.nn.functional.gelu(x)


@torch.fx.wrap
def split_half(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]


@torch.fx.wrap
def data_dependent(x: torch.Tensor) -> torch.Tensor:
    """Python control flow on a tensor value: tracing through it cannot work."""
    if x.sum() > 0:
        return x * 2
    return -x


class HelperNet(nn.Module):
    """Window-attention-like scores with a relative position bias, stochastic depth, a
    nested helper and a helper returning a tuple."""

    def __init__(self, dim: int = 8, window: int = 2) -> None:
        super().__init__()
        self.window = window
        self.qk = nn.Linear(dim, 2 * dim)
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, 1))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                            indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("index", (rel[..., 0] * (2 * window - 1) + rel[..., 1]).flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, window*window, dim)
        q, k = split_half(self.qk(x))
        attn = q @ k.transpose(-2, -1)
        attn = attn + _get_relative_position_bias(self.table, self.index, [self.window] * 2)[0]
        h = stochastic_depth(attn.softmax(-1) @ x, 0.1, "row", self.training)
        return scaled_residual(x, h)


class UntraceableNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return data_dependent(self.lin(x)) + 1
