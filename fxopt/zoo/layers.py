"""Library-style helper functions the modern zoo models call, written as the libraries write
them: module-level functions marked with ``torch.fx.wrap``, so ``symbolic_trace`` keeps each
call as one leaf ``call_function`` node instead of tracing through it.

- ``stochastic_depth``: torchvision.ops.stochastic_depth's signature and behaviour.
- ``drop_path``: timm.layers.drop.drop_path's signature and behaviour.
- ``_get_relative_position_bias``: torchvision's Swin helper of the same name.

In eval mode (``training=False``) the first two are the identity; ``cleanup`` removes them
through their op-table entries (``fxopt/op_table.py``), as it removes dropout.

Example:
    >>> x = torch.randn(2, 4)
    >>> stochastic_depth(x, 0.2, "row", training=False) is x
    True
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn


@torch.fx.wrap
def stochastic_depth(
    input: torch.Tensor, p: float, mode: str, training: bool = True
) -> torch.Tensor:
    """Drop whole residual branches with probability ``p`` (per sample: ``mode="row"``, for
    the whole batch: ``mode="batch"``), scaling survivors by ``1 / (1 - p)``.

    >>> stochastic_depth(torch.ones(2, 3), 0.5, "row", training=False).sum().item()
    6.0
    """
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ("batch", "row"):
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise



@torch.fx.wrap
def drop_path(
    x: torch.Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True
) -> torch.Tensor:
    """Per-sample drop of a residual branch (timm's ``drop_path``).

    >>> drop_path(torch.ones(2, 3), 0.5).sum().item()
    6.0
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor



@torch.fx.wrap
def _get_relative_position_bias(
    relative_position_bias_table: torch.Tensor,
    relative_position_index: torch.Tensor,
    window_size: list[int],
) -> torch.Tensor:
    """The (1, heads, N, N) attention bias of a window of ``N = wh * ww`` tokens, gathered
    from the learned table by the precomputed pairwise index (torchvision's Swin helper)."""
    n = window_size[0] * window_size[1]
    bias = relative_position_bias_table[relative_position_index]
    bias = bias.view(n, n, -1)
    return bias.permute(2, 0, 1).contiguous().unsqueeze(0)



class StochasticDepth(nn.Module):
    """``stochastic_depth`` as a module that follows ``train()`` / ``eval()`` (torchvision's)."""

    def __init__(self, p: float, mode: str = "row") -> None:
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(input, self.p, self.mode, self.training)


class DropPath(nn.Module):
    """``drop_path`` as a module that follows ``train()`` / ``eval()`` (timm's)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)


def relative_position_index(window_size: list[int]) -> torch.Tensor:
    """For every (query, key) pair of a window, the flat index of its relative offset in a
    ``(2*wh-1) * (2*ww-1)`` table, flattened to one dimension (as torchvision builds it).

    >>> relative_position_index([2, 2]).shape
    torch.Size([16])
    """
    wh, ww = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    return rel.sum(-1).flatten()
