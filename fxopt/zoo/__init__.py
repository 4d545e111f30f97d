"""Small built-in models, written in plain PyTorch: the embedded default and the test zoo.

Each entry covers one architecture family users bring (residual CNN with batch norm,
MobileNet-style depthwise/grouped conv with squeeze-excite, dense concat, channel shuffle,
ConvTranspose decoder, transformer encoder, grouped-query attention, MLP, a model with
shape-dependent control flow that only ``torch.export`` captures, and EfficientNet-,
ConvNeXt- and Swin-style models that call ``torch.fx.wrap``-ped helpers as libraries do).

Every ``build()`` returns a fresh model in ``eval()`` mode with seeded weights and batch-norm
statistics collected from a few seeded batches, so its outputs have a healthy magnitude;
neither ``build()`` nor ``make_inputs()`` touches the caller's global RNG.

The models live in ``cnn.py``, ``transformers.py``, ``mlp.py`` and ``modern.py`` (helpers in
``layers.py``); ``registry.py`` names them and makes their inputs. Everything is
re-exported here, so ``fxopt.zoo.X`` works.

Example:
    >>> from fxopt import zoo
    >>> model, inputs = zoo.load("resnet")
    >>> model(*inputs).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from fxopt.zoo.cnn import (
    BasicBlock,
    Bottleneck,
    Decoder,
    DenseBlock,
    DenseLayer,
    DenseNet,
    DynamicNet,
    InvertedResidual,
    MobileNet,
    ResNet,
    ResNet50,
    ShuffleNet,
    ShuffleUnit,
    SqueezeExcite,
    channel_shuffle,
)
from fxopt.zoo.mlp import MLP
from fxopt.zoo.modern import ConvNeXt, EfficientNet, MBConv, Swin
from fxopt.zoo.registry import (  # the _private helpers are used by benchmarks and tests
    ZooModel,
    _calibrate_bn,  # noqa: F401
    _calibration_images,  # noqa: F401
    _random_images,  # noqa: F401
    _seeded,  # noqa: F401
    get,
    load,
    names,
)
from fxopt.zoo.transformers import (
    EncoderBlock,
    GQABlock,
    GQATransformer,
    GroupedQueryAttention,
    RMSNorm,
    Transformer,
)

__all__ = [
    "MLP",
    "ConvNeXt",
    "EfficientNet",
    "MBConv",
    "Swin",
    "BasicBlock",
    "Bottleneck",
    "Decoder",
    "DenseBlock",
    "DenseLayer",
    "DenseNet",
    "DynamicNet",
    "EncoderBlock",
    "GQABlock",
    "GQATransformer",
    "GroupedQueryAttention",
    "InvertedResidual",
    "MobileNet",
    "RMSNorm",
    "ResNet",
    "ResNet50",
    "ShuffleNet",
    "ShuffleUnit",
    "SqueezeExcite",
    "Transformer",
    "ZooModel",
    "channel_shuffle",
    "get",
    "load",
    "names",
]
