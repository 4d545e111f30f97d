"""The zoo's modern architectures, small: EfficientNet-style (MBConv, squeeze-excite with SiLU,
stochastic depth), ConvNeXt-style (7x7 depthwise conv, LayerNorm over channels, layer scale,
drop path) and Swin-style (windowed attention with relative position bias, ``torch.roll``
shifted windows). They call the ``torch.fx.wrap``-ped helpers of ``fxopt.zoo.layers`` the
way torchvision and timm models do, so a symbolic capture keeps those calls as leaf nodes.

Example:
    >>> from fxopt.zoo.modern import ConvNeXt
    >>> ConvNeXt()(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxopt.zoo.layers import (
    DropPath,
    StochasticDepth,
    _get_relative_position_bias,
    relative_position_index,
)

# wrapped in the globals of this file too, as torchvision's swin_transformer.py does for the
# helper it defines: symbolic_trace keeps the call from WindowAttention as one leaf node
torch.fx.wrap("_get_relative_position_bias")

# ---------------------------------------------------------------- EfficientNet-style


def _conv_bn_silu(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                  act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class SqueezeExciteSiLU(nn.Module):
    """EfficientNet's squeeze-excite: pool, 1x1 reduce, SiLU, 1x1 expand, sigmoid gate."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.SiLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return x * self.scale_activation(scale)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise 3x3, squeeze-excite, 1x1 project; the residual
    branch goes through ``stochastic_depth`` (torchvision's ``StochasticDepth`` in place)."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int, sd_prob: float) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            _conv_bn_silu(cin, hidden, 1),
            _conv_bn_silu(hidden, hidden, 3, stride, groups=hidden),
            SqueezeExciteSiLU(hidden, max(1, cin // 4)),
            _conv_bn_silu(hidden, cout, 1, act=False),
        )
        self.stochastic_depth = StochasticDepth(sd_prob, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_res:
            out = self.stochastic_depth(out) + x
        return out


class EfficientNet(nn.Module):
    """EfficientNet-B0 layout, small: SiLU stem, MBConv stages, 1x1 head, pooled classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn_silu(3, 16, 3, 2)
        self.blocks = nn.Sequential(
            MBConv(16, 16, 1, 1, 0.05),
            MBConv(16, 24, 4, 2, 0.1),
            MBConv(24, 24, 4, 1, 0.15),
        )
        self.head = _conv_bn_silu(24, 64, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


# ---------------------------------------------------------------- ConvNeXt-style


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (timm's ``LayerNorm2d``): permute to
    channels-last, normalize, permute back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv, channels-last LayerNorm, 4x MLP with GELU, layer scale ``gamma``,
    and ``drop_path`` on the residual branch (timm's ConvNeXt block)."""

    def __init__(self, dim: int, drop_prob: float, layer_scale: float = 0.1) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        # real checkpoints start at 1e-6; 0.1 keeps the branch visible to numeric checks
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))
        self.drop_path = DropPath(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = (self.gamma * x).permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)


class ConvNeXt(nn.Module):
    """ConvNeXt layout, small: 4x4 patchify stem + LayerNorm2d, two stages with a
    LayerNorm2d + 2x2 strided conv downsample, pooled LayerNorm head."""

    def __init__(self, num_classes: int = 10, dims: tuple[int, int] = (32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        self.stage1 = nn.Sequential(ConvNeXtBlock(dims[0], 0.0), ConvNeXtBlock(dims[0], 0.05))
        self.downsample = nn.Sequential(
            LayerNorm2d(dims[0], eps=1e-6), nn.Conv2d(dims[0], dims[1], 2, 2)
        )
        self.stage2 = nn.Sequential(ConvNeXtBlock(dims[1], 0.1))
        self.norm = nn.LayerNorm(dims[1], eps=1e-6)
        self.fc = nn.Linear(dims[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.downsample(self.stage1(self.stem(x))))
        return self.fc(self.norm(x.mean((-2, -1))))


# ---------------------------------------------------------------- Swin-style


def _window_mask(size: int, window: int, shift: int) -> torch.Tensor:
    """(windows, N, N) additive mask keeping shifted-window attention inside the regions that
    were neighbours before the roll (-100 elsewhere, as in the Swin paper's code)."""
    region = torch.zeros(size, size)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, h in enumerate(cuts):
        for j, w in enumerate(cuts):
            region[h, w] = i * 3 + j
    n = size // window
    region = region.view(n, window, n, window).permute(0, 2, 1, 3).reshape(n * n, -1)
    diff = region[:, None, :] - region[:, :, None]
    return torch.where(diff != 0, -100.0, 0.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ``window x window`` patches, with a learned relative
    position bias gathered by ``_get_relative_position_bias`` and, for shifted windows, the
    cross-region mask."""

    def __init__(self, dim: int, heads: int, window: int, size: int, shift: int) -> None:
        super().__init__()
        self.heads, self.window, self.shift, self.size = heads, window, shift, size
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(
            torch.randn((2 * window - 1) ** 2, heads) * 0.5
        )
        self.register_buffer("relative_position_index", relative_position_index([window] * 2))
        if shift:
            self.register_buffer("attn_mask", _window_mask(size, window, shift))
        else:
            self.attn_mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H, W, C)
        s, ws, c = self.size, self.window, x.shape[-1]
        n, nw = ws * ws, (s // ws) ** 2
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        x = x.view(-1, s // ws, ws, s // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, c)
        qkv = self.qkv(x).reshape(-1, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + _get_relative_position_bias(
            self.relative_position_bias_table, self.relative_position_index, [ws, ws]
        )
        if self.attn_mask is not None:
            attn = attn.view(-1, nw, self.heads, n, n) + self.attn_mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, n, n)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(-1, n, c)
        x = self.proj(x)
        x = x.view(-1, s // ws, s // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s, s, c)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x


class SwinBlock(nn.Module):
    """Pre-norm (shifted) window attention and a GELU MLP, each residual with stochastic depth."""

    def __init__(self, dim: int, heads: int, window: int, size: int, shift: int,
                 sd_prob: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window, size, shift)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.stochastic_depth = StochasticDepth(sd_prob, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        return x + self.stochastic_depth(self.mlp(self.norm2(x)))


class Swin(nn.Module):
    """Swin layout, small: 4x4 patch embedding to an 8x8 grid, a regular and a shifted window
    block (window 4, shift 2), LayerNorm, mean-pooled classifier."""

    def __init__(self, num_classes: int = 10, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.patch_norm = nn.LayerNorm(dim)
        self.blocks = nn.Sequential(
            SwinBlock(dim, heads, 4, 8, 0, 0.0), SwinBlock(dim, heads, 4, 8, 2, 0.1)
        )
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_norm(self.patch(x).permute(0, 2, 3, 1))
        x = self.norm(self.blocks(x))
        return self.fc(x.mean((1, 2)))
