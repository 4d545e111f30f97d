"""Small built-in models, written in plain PyTorch: the embedded default and the test zoo.

Each entry covers one architecture family users bring (residual CNN with batch norm,
MobileNet-style depthwise/grouped conv with squeeze-excite, dense concat, channel shuffle,
ConvTranspose decoder, transformer encoder, grouped-query attention, MLP, and a model with
shape-dependent control flow that only ``torch.export`` captures).

Every ``build()`` returns a fresh model in ``eval()`` mode with seeded weights and batch-norm
statistics collected from a few seeded batches, so its outputs have a healthy magnitude;
neither ``build()`` nor ``make_inputs()`` touches the caller's global RNG.

Example:
    >>> from fxopt import zoo
    >>> model, inputs = zoo.load("resnet")
    >>> model(*inputs).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fxopt.errors import SpecError


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: how to build the model and how to make example inputs for it.

    Example:
        >>> spec = get("mlp")
        >>> model = spec.build()
        >>> model(*spec.example_inputs()).shape
        torch.Size([4, 10])
    """

    name: str
    family: str
    description: str
    build: Callable[[], nn.Module]
    make_inputs: Callable[[int], tuple]
    batch: int = 2
    dynamic_batch: bool = True
    symbolic: bool = True
    heavy: bool = False

    def example_inputs(self) -> tuple:
        """The example inputs at the default batch size (seeded, so always the same)."""
        return self.make_inputs(self.batch)


# ---------------------------------------------------------------- seeding and BN statistics


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block with a fixed CPU seed, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _calibrate_bn(model: nn.Module, make_batch: Callable[[], tuple], steps: int = 3) -> None:
    """Make batch-norm statistics data-driven and affine parameters non-trivial.

    Freshly initialised BN layers (mean 0, var 1) on top of default-initialised convs shrink
    activations layer after layer until outputs are ~1e-10 and every numeric check measures
    noise. A few train-mode passes with a cumulative average fix that. Call under ``_seeded``.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
        if bn.affine:
            with torch.no_grad():
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0.0, 0.1)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(*make_batch())
    for bn in norms:
        bn.momentum = 0.1


def _builder(
    factory: Callable[[], nn.Module], seed: int, calibrate: Callable[[], tuple] | None = None
) -> Callable[[], nn.Module]:
    """A ``build()`` that seeds ``factory``, calibrates its batch norm, and returns it in eval."""

    def build() -> nn.Module:
        with _seeded(seed):
            model = factory()
            if calibrate is not None:
                _calibrate_bn(model, calibrate)
        return model.eval()

    return build


def _draw(seed: int, draw: Callable[[int, torch.Generator], torch.Tensor]) -> Callable:
    """``make_inputs`` for one tensor drawn as ``draw(batch, generator)`` from a fixed seed."""
    return lambda batch: (draw(batch, torch.Generator().manual_seed(seed)),)


def _random_images(batch: int, size: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Noise images with a per-image, per-channel offset.

    Pure i.i.d. noise averages out under global pooling, so every image would get almost the
    same logits; the offset makes outputs depend visibly on which image went in.
    """
    noise = torch.randn(batch, 3, size, size, generator=gen)
    return noise + torch.randn(batch, 3, 1, 1, generator=gen)


def _images(size: int, seed: int) -> Callable[[int], tuple]:
    """``make_inputs`` for seeded ``(batch, 3, size, size)`` float images."""
    return _draw(seed, lambda b, g: _random_images(b, size, g))


def _calibration_images(batch: int, size: int) -> Callable[[], tuple]:
    """Calibration batches, drawn from the (forked, seeded) global RNG inside ``build()``."""
    return lambda: (_random_images(batch, size),)


def _conv_bn(
    cin: int,
    cout: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """Conv2d (no bias) → BatchNorm2d → optional activation, the usual CNN building block."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- residual CNNs


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, with a 1x1 conv+BN shortcut when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A small CIFAR-sized ResNet: stem, three stages of basic blocks, pooled linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 16, 3)
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.layer3 = BasicBlock(32, 64, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck: 1x1 reduce, 3x3 (strided), 1x1 expand by 4, plus shortcut."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 layout ([3, 4, 6, 3] bottlenecks, 64..2048 channels, ~25.6M parameters)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layers = []
            for i in range(blocks):
                layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------- MobileNetV3-style


class SqueezeExcite(nn.Module):
    """Channel gate: avgpool → 1x1 conv → ReLU → 1x1 conv → hardsigmoid → multiply."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1x1 expand (optionally grouped), depthwise 3x3, SE, 1x1 project."""

    def __init__(
        self,
        cin: int,
        hidden: int,
        cout: int,
        stride: int,
        se: bool,
        act: type[nn.Module],
        expand_groups: int = 1,
    ) -> None:
        super().__init__()
        self.expand = _conv_bn(cin, hidden, 1, groups=expand_groups, act=act)
        self.depthwise = _conv_bn(hidden, hidden, 3, stride, groups=hidden, act=act)
        self.se = SqueezeExcite(hidden, max(8, hidden // 4)) if se else None
        self.project = _conv_bn(hidden, cout, 1, act=None)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.depthwise(self.expand(x))
        if self.se is not None:
            out = self.se(out)
        out = self.project(out)
        return x + out if self.use_residual else out


class MobileNet(nn.Module):
    """A tiny MobileNetV3: hardswish stem, inverted residuals with SE, pooled conv head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 16, 3, stride=2, act=nn.Hardswish)
        self.blocks = nn.Sequential(
            InvertedResidual(16, 32, 16, 1, se=True, act=nn.ReLU),
            InvertedResidual(16, 64, 24, 2, se=False, act=nn.ReLU),
            InvertedResidual(24, 72, 24, 1, se=True, act=nn.Hardswish, expand_groups=2),
            InvertedResidual(24, 96, 40, 2, se=True, act=nn.Hardswish, expand_groups=4),
        )
        self.head = _conv_bn(40, 96, 1, act=nn.Hardswish)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(96, 128), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


# ---------------------------------------------------------------- DenseNet-style


class DenseLayer(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-Conv1x1 then BN-ReLU-Conv3x3 producing ``growth``."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(out)))


class DenseBlock(nn.Module):
    """Each layer sees the concatenation of the block input and every earlier layer's output."""

    def __init__(self, cin: int, growth: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth) for i in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    """Two dense blocks joined by a BN-ReLU-Conv1x1-AvgPool transition."""

    def __init__(self, num_classes: int = 10, growth: int = 8) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 16, 3)
        self.block1 = DenseBlock(16, growth, 3)
        c1 = 16 + 3 * growth
        self.transition = nn.Sequential(
            nn.BatchNorm2d(c1), nn.ReLU(), nn.Conv2d(c1, c1 // 2, 1, bias=False), nn.AvgPool2d(2)
        )
        self.block2 = DenseBlock(c1 // 2, growth, 3)
        c2 = c1 // 2 + 3 * growth
        self.norm = nn.BatchNorm2d(c2)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.transition(self.block1(self.stem(x))))
        x = self.pool(self.relu(self.norm(x)))
        return self.fc(torch.flatten(x, 1))


# ---------------------------------------------------------------- ShuffleNetV2-style


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave channels across ``groups`` (view → transpose → contiguous → view).

    Example:
        >>> channel_shuffle(torch.arange(4.0).view(1, 4, 1, 1), 2).flatten().tolist()
        [0.0, 2.0, 1.0, 3.0]
    """
    x = x.view(x.size(0), groups, -1, x.size(2), x.size(3))
    x = x.transpose(1, 2).contiguous()
    return x.view(x.size(0), -1, x.size(3), x.size(4))


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: split channels (stride 1) or branch twice (stride 2), cat, shuffle."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        half = cout // 2
        self.branch1 = None
        if stride > 1:
            self.branch1 = nn.Sequential(
                _conv_bn(cin, cin, 3, stride, groups=cin, act=None),
                _conv_bn(cin, half, 1),
            )
        branch_in = cin if stride > 1 else half
        self.branch2 = nn.Sequential(
            _conv_bn(branch_in, half, 1),
            _conv_bn(half, half, 3, stride, groups=half, act=None),
            _conv_bn(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch1 is None:
            parts = x.chunk(2, dim=1)
            out = torch.cat([parts[0], self.branch2(parts[1])], dim=1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], dim=1)
        return channel_shuffle(out, 2)


class ShuffleNet(nn.Module):
    """A tiny ShuffleNetV2: stem, two stages of shuffle units, 1x1 conv head, linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 24, 3, stride=2)
        self.stage2 = nn.Sequential(ShuffleUnit(24, 48, 2), ShuffleUnit(48, 48, 1))
        self.stage3 = nn.Sequential(ShuffleUnit(48, 96, 2), ShuffleUnit(96, 96, 1))
        self.head = _conv_bn(96, 128, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.stage3(self.stage2(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


# ---------------------------------------------------------------- encoder-decoder


class Decoder(nn.Module):
    """Conv encoder (two stride-2 stages), ConvTranspose2d+BN decoder with additive skips."""

    def __init__(self, out_channels: int = 3) -> None:
        super().__init__()
        self.enc1 = _conv_bn(3, 16, 3)
        self.enc2 = _conv_bn(16, 32, 3, stride=2)
        self.enc3 = _conv_bn(32, 64, 3, stride=2)
        self.up1 = nn.ConvTranspose2d(64, 32, 4, 2, 1, bias=False)
        self.up_bn1 = nn.BatchNorm2d(32)
        self.up2 = nn.ConvTranspose2d(32, 16, 4, 2, 1, bias=False)
        self.up_bn2 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(16, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.relu(self.up_bn1(self.up1(e3))) + e2
        d1 = self.relu(self.up_bn2(self.up2(d2))) + e1
        return self.head(d1)


# ---------------------------------------------------------------- transformers


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


# ---------------------------------------------------------------- MLP and control flow


class MLP(nn.Module):
    """A plain multilayer perceptron: Linear/ReLU/Dropout/Linear/GELU/Dropout/Linear."""

    def __init__(self, features: int = 64, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DynamicNet(nn.Module):
    """A conv net that pools large inputs first: ``if`` on a shape, so only torch.export works.

    ``torch.fx.symbolic_trace`` raises ``TraceError`` on the ``if`` (the width is a Proxy);
    ``torch.export.export(..., strict=False)`` sees a concrete width and specializes on it.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 16, 3)
        self.pool = nn.MaxPool2d(2)
        self.body = _conv_bn(16, 32, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.shape[-1] > 16:
            x = self.pool(x)
        x = self.body(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------- registry


def _cnn(
    name: str,
    family: str,
    description: str,
    factory: Callable[[], nn.Module],
    seed: int,
    **kw: bool,
) -> ZooModel:
    """A zoo entry for a BN image model on seeded ``(batch, 3, 32, 32)`` inputs."""
    build = _builder(factory, seed, _calibration_images(8, 32))
    return ZooModel(name, family, description, build, _images(32, 1000 + seed), **kw)


_MODELS: dict[str, ZooModel] = {
    spec.name: spec
    for spec in (
        _cnn("resnet", "residual-cnn", "ResNet: basic blocks, BN, 1x1 conv+BN shortcut", ResNet, 1),
        _cnn(
            "mobilenet",
            "mobile-cnn",
            "MobileNetV3-style: depthwise and grouped convs, squeeze-excite, hardswish",
            MobileNet,
            2,
        ),
        _cnn(
            "densenet",
            "dense-cnn",
            "DenseNet-style: dense blocks (cat of features), BN-ReLU-Conv, avg-pool transition",
            DenseNet,
            3,
        ),
        _cnn(
            "shufflenet",
            "shuffle-cnn",
            "ShuffleNetV2-style: chunk, cat, channel shuffle (view/transpose/view)",
            ShuffleNet,
            4,
        ),
        _cnn(
            "decoder",
            "encoder-decoder",
            "Conv encoder, ConvTranspose2d+BN decoder with skips; image in, image out",
            Decoder,
            5,
        ),
        ZooModel(
            "transformer",
            "transformer",
            "Token ids (vocab 100) → embedding + positions → 2 MHA encoder blocks → logits",
            _builder(Transformer, 6),
            _draw(1006, lambda b, g: torch.randint(0, 100, (b, 16), generator=g)),
        ),
        ZooModel(
            "gqa",
            "gqa-transformer",
            "Grouped-query attention (4 q heads, 2 kv heads), SDPA, RMSNorm, GELU MLP",
            _builder(GQATransformer, 7),
            _draw(1007, lambda b, g: torch.randn(b, 16, 64, generator=g)),
        ),
        ZooModel(
            "mlp",
            "mlp",
            "Plain MLP: Linear/ReLU/Dropout/Linear/GELU/Dropout/Linear; 64 → 10",
            _builder(MLP, 8),
            _draw(1008, lambda b, g: torch.randn(b, 64, generator=g)),
            batch=4,
        ),
        _cnn(
            "dynamic",
            "control-flow",
            "Conv net with `if x.shape[-1] > 16` in forward: torch.export only",
            DynamicNet,
            9,
            symbolic=False,
        ),
        ZooModel(
            "resnet50",
            "residual-cnn",
            "ResNet-50 layout (bottlenecks [3, 4, 6, 3], ~25.6M params); 3x224x224 → 1000",
            _builder(ResNet50, 10, _calibration_images(2, 224)),
            _images(224, 1010),
            batch=1,
            heavy=True,
        ),
    )
}


def names(include_heavy: bool = False) -> list[str]:
    """Names of the zoo models, in a stable order; heavy (benchmark-only) ones on request.

    Example:
        >>> "resnet" in names(), "resnet50" in names(), "resnet50" in names(include_heavy=True)
        (True, False, True)
    """
    return [name for name, spec in _MODELS.items() if include_heavy or not spec.heavy]


def get(name: str) -> ZooModel:
    """The zoo entry called ``name``; an unknown name raises ``SpecError`` listing them all.

    Example:
        >>> get("gqa").family
        'gqa-transformer'
    """
    try:
        return _MODELS[name]
    except KeyError:
        known = ", ".join(names(include_heavy=True))
        raise SpecError(
            f"unknown zoo model {name!r}; known models: {known}. "
            "Pass one of these names, or a SPEC like 'path/to/file.py:factory'."
        ) from None


def load(name: str) -> tuple[nn.Module, tuple]:
    """Build the zoo model ``name`` and return it with its example inputs.

    Example:
        >>> model, (ids,) = load("transformer")
        >>> model(ids).shape
        torch.Size([2, 16, 100])
    """
    spec = get(name)
    return spec.build(), spec.example_inputs()
