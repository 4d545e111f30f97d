"""keep_head: the output head stays float when cheap (fxopt/quant/head.py)."""

from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt.errors import QuantizationError
from fxopt.quant.head import HEAD_MAX_MAC_SHARE, heads_to_keep, output_heads
from fxopt.quant.static import compute_layers
from fxopt.verify import cosine


def _stats(res) -> dict:
    return next(r.stats for r in res.report if r.name == "quantize")


def _worst_cosine(model, q, batches) -> float:
    with torch.no_grad():
        return min(cosine(model(*b), q(*b)) for b in batches)


class Residual(torch.nn.Module):
    """The last linear feeds a residual add: no layer computes the output alone."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return x + self.b(h)


class WideHead(torch.nn.Module):
    """A head holding most of the work (an LM head over a big vocabulary)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 4096)

    def forward(self, x):
        return self.head(torch.relu(self.body(x))).softmax(-1)


def test_heads_are_found_through_pass_through_ops_only(zoo_model):
    for name, head in (("resnet", "fc"), ("gqa", "head"), ("mlp", "net_6")):
        model, inputs = zoo_model(name)
        gm = fxopt.optimize(model, inputs, "default").module
        assert [n.name for n in output_heads(gm)] == [head], name
    gm = fxopt.capture(Residual(), (torch.randn(2, 16),))
    assert output_heads(gm) == []
    gm = fxopt.capture(WideHead(), (torch.randn(2, 16),))
    assert [n.name for n in output_heads(gm)] == ["head"]  # through the softmax


def test_auto_keeps_a_cheap_head_and_quantizes_an_expensive_one():
    gm = fxopt.capture(WideHead(), (torch.randn(2, 16),))
    layers = compute_layers(gm)
    assert heads_to_keep(gm, layers, "auto") == []  # 4096 / (4096 + 16) of the MACs
    assert heads_to_keep(gm, layers, True) == ["head"]
    assert heads_to_keep(gm, layers, False) == []
    only_head = [n for n in layers if n.name == "head"]
    assert heads_to_keep(gm, only_head, True) == []  # never every layer
    assert 0 < HEAD_MAX_MAC_SHARE < 0.5


@pytest.mark.parametrize("scheme", ["int8", "dynamic_int8"])
def test_quantize_keeps_the_head_float_by_default_and_it_agrees_better(zoo_model, scheme):
    model, inputs = zoo_model("gqa")
    gen = torch.Generator().manual_seed(5)
    batches = [inputs] + [(torch.randn(inputs[0].shape, generator=gen),) for _ in range(3)]
    made = {}
    for keep in ("auto", "false"):
        res = fxopt.optimize(model, inputs, f"default,quantize(scheme={scheme},keep_head={keep})",
                             calibration=batches[1:])
        res.module.graph.lint()
        made[keep] = (res.module, _stats(res))
    assert made["auto"][1]["kept_head"] == ["head"] and made["false"][1]["kept_head"] == []
    if scheme == "dynamic_int8":
        assert "head" not in made["auto"][1]["quantized"]
        assert "head" in made["false"][1]["quantized"]
    else:
        assert "head" in made["auto"][1]["skipped"] and "head" in made["false"][1]["layers"]
    kept, quantized = (_worst_cosine(model, made[k][0], batches) for k in ("auto", "false"))
    assert 1 - kept < 1 - quantized  # the head's own rounding error is gone


def test_a_budget_leaves_the_head_to_the_fallback_unless_asked(zoo_model):
    model, inputs = zoo_model("gqa")
    res = fxopt.optimize(model, inputs, "default,quantize(scheme=dynamic_int8,budget=0.0)")
    assert _stats(res)["kept_head"] == []
    res = fxopt.optimize(model, inputs,
                         "default,quantize(scheme=dynamic_int8,budget=0.0,keep_head=true)")
    assert _stats(res)["kept_head"] == ["head"]


@pytest.mark.parametrize("bad", ["'yes'", "1"])
def test_keep_head_must_be_auto_true_or_false(zoo_model, bad):
    model, inputs = zoo_model("mlp")
    with pytest.raises((QuantizationError, fxopt.PassError), match="keep_head"):
        fxopt.optimize(model, inputs, f"default,quantize(scheme=dynamic_int8,keep_head={bad})")
