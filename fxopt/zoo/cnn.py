"""The zoo's convolutional models: residual (ResNet, ResNet-50), MobileNetV3-style,
DenseNet-style, ShuffleNetV2-style, a ConvTranspose encoder-decoder, and a conv net with
shape-dependent control flow that only ``torch.export`` captures.

Example:
    >>> from fxopt.zoo.cnn import ResNet
    >>> ResNet()(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn


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


# ---------------------------------------------------------------- control flow


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
