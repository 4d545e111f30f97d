"""Published architectures built from Hugging Face ``transformers`` model classes with small
configs and seeded random weights (no download), for tests/test_real_architectures.py.

``ARCHITECTURES[name]`` is an :class:`Architecture`: its family (``"cnn"``, ``"vit"``,
``"encoder"`` or ``"decoder"``), a ``build()`` returning the model in eval mode, and
``make_inputs(batch, seed)`` returning example inputs. CNNs with batch norm get data-driven
statistics first (fxopt.zoo's ``_calibrate_bn``): with random statistics their outputs are
near-constant and every cosine check measures noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

VOCAB = 500
SEQ = 12


@dataclass(frozen=True)
class Architecture:
    family: str  # "cnn" | "vit" (image transformer) | "encoder" (text) | "decoder" (text)
    config: Callable[[], object]  # -> transformers config
    model_class: str  # transformers class name
    image_size: int = 32

    def build(self) -> nn.Module:
        import transformers

        torch.manual_seed(0)
        model = getattr(transformers, self.model_class)(self.config())
        if self.family == "cnn":
            _data_driven_bn(model, self.image_size)
        return model.eval()

    def make_inputs(self, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        if self.family in ("cnn", "vit"):
            return (_images(batch, self.image_size, gen),)
        return (torch.randint(0, VOCAB, (batch, SEQ), generator=gen),)


def _images(batch: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Noise images with a per-image, per-channel offset (not zero-mean white noise)."""
    offset = torch.rand(batch, 3, 1, 1, generator=gen) - 0.5
    return torch.randn(batch, 3, size, size, generator=gen) + offset


def _data_driven_bn(model: nn.Module, size: int) -> None:
    from fxopt import zoo

    gen = torch.Generator().manual_seed(123)
    zoo._calibrate_bn(model, lambda: (_images(8, size, gen),))
    model.eval()


def _cfg(name: str, **kwargs) -> Callable[[], object]:
    def make():
        import transformers

        return getattr(transformers, name)(**kwargs)

    return make


_TEXT = dict(vocab_size=VOCAB)

ARCHITECTURES: dict[str, Architecture] = {
    # ---- CNNs (batch norm, data-driven statistics)
    # ResNet-50's bottleneck blocks, one per stage
    "resnet": Architecture("cnn", _cfg(
        "ResNetConfig", embedding_size=32, hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 1, 1],
        layer_type="bottleneck"), "ResNetModel"),
    "mobilenet-v2": Architecture("cnn", _cfg(
        "MobileNetV2Config", image_size=32, depth_multiplier=0.35), "MobileNetV2Model"),
    # squeeze-excite with SiLU, stochastic depth (drop_connect_rate)
    "efficientnet": Architecture("cnn", _cfg(
        "EfficientNetConfig", image_size=32, width_coefficient=0.25, depth_coefficient=0.3,
        hidden_dim=320), "EfficientNetModel"),
    "regnet": Architecture("cnn", _cfg(
        "RegNetConfig", embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
        groups_width=8), "RegNetModel"),
    # ---- LayerNorm over channels, layer scale, 7x7 depthwise, drop path
    "convnext": Architecture("cnn", _cfg(
        "ConvNextConfig", hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
        layer_scale_init_value=0.5, drop_path_rate=0.1), "ConvNextModel"),
    "convnext-v2": Architecture("cnn", _cfg(
        "ConvNextV2Config", hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
        drop_path_rate=0.1), "ConvNextV2Model"),
    # ---- vision transformers: windowed attention with relative position bias and roll
    "swin": Architecture("vit", _cfg(
        "SwinConfig", image_size=32, patch_size=2, embed_dim=16, depths=[2, 1],
        num_heads=[2, 4], window_size=4, drop_path_rate=0.1), "SwinModel"),
    "vit": Architecture("vit", _cfg(
        "ViTConfig", image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64), "ViTModel"),
    "deit": Architecture("vit", _cfg(
        "DeiTConfig", image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64), "DeiTModel"),
    # ---- text encoders
    "bert": Architecture("encoder", _cfg(
        "BertConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, **_TEXT), "BertModel"),
    "distilbert": Architecture("encoder", _cfg(
        "DistilBertConfig", dim=32, n_layers=2, n_heads=4, hidden_dim=64, **_TEXT),
        "DistilBertModel"),
    # ---- decoders (no KV cache: a deployed prefill graph)
    "gpt2": Architecture("decoder", _cfg(
        "GPT2Config", n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False,
        bos_token_id=0, eos_token_id=0, **_TEXT), "GPT2Model"),
    # grouped-query attention: 4 query heads share 2 key/value heads
    "llama-gqa": Architecture("decoder", _cfg(
        "LlamaConfig", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        use_cache=False, **_TEXT), "LlamaModel"),
    "qwen2-gqa": Architecture("decoder", _cfg(
        "Qwen2Config", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        use_cache=False, **_TEXT), "Qwen2Model"),
}
