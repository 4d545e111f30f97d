"""The zoo's registry: one ``ZooModel`` per name, how each is built (seeded weights,
data-driven batch-norm statistics) and its seeded example inputs.

Example:
    >>> from fxopt.zoo.registry import get
    >>> model = get("mlp").build()
    >>> model(*get("mlp").example_inputs()).shape
    torch.Size([4, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from fxopt.errors import SpecError
from fxopt.zoo.cnn import Decoder, DenseNet, DynamicNet, MobileNet, ResNet, ResNet50, ShuffleNet
from fxopt.zoo.mlp import MLP
from fxopt.zoo.modern import ConvNeXt, EfficientNet, Swin
from fxopt.zoo.transformers import GQATransformer, Transformer


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
        _cnn(
            "efficientnet",
            "efficientnet-cnn",
            "EfficientNet-style: MBConv, squeeze-excite with SiLU, stochastic depth (fx.wrap)",
            EfficientNet,
            11,
        ),
        ZooModel(
            "convnext",
            "convnext-cnn",
            "ConvNeXt-style: 7x7 depthwise, LayerNorm over channels, layer scale, drop path",
            _builder(ConvNeXt, 12),
            _images(32, 1012),
        ),
        ZooModel(
            "swin",
            "swin-transformer",
            "Swin-style: window attention, relative position bias (fx.wrap), torch.roll shift",
            _builder(Swin, 13),
            _images(32, 1013),
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
