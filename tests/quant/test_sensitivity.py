"""Sensitivity ranking and the accuracy-budget fallback of the quantize pass."""

from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt import Pass
from fxopt.errors import QuantizationError
from fxopt.quant import sensitivity as sens
from fxopt.quant.fake_quant import FakeQuantize
from fxopt.verify import cosine


def _stats(res) -> dict:
    return next(r for r in res.report.to_dict() if r["name"] == "quantize")["stats"]


def _calibration(inputs, n=3):
    gen = torch.Generator().manual_seed(2)
    return [tuple(torch.randn(x.shape, generator=gen) for x in inputs) for _ in range(n)]


def test_sensitivity_ranks_every_quantized_layer(zoo_model):
    model, inputs = zoo_model("resnet")
    res = fxopt.optimize(model, inputs,
                         "default,quantize(scheme=int8,target=ort,keep_head=false)",
                         calibration=[inputs, *_calibration(inputs)])
    float_gm = fxopt.optimize(model, inputs, "default").module
    batches = [inputs]
    ranking = sens.sensitivity(res.module, batches, sens.run_batches(float_gm, batches))
    errors = [e for _, e in ranking]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0
    names = [n for n, _ in ranking]
    assert len(names) == len(set(names)) and "fc" in names
    modes = {m.mode for m in res.module.modules() if isinstance(m, FakeQuantize)}
    assert modes == {"quantize"}  # probes restore every node


@pytest.mark.parametrize("name", ["mobilenet", "transformer"])
def test_budget_keeps_the_most_sensitive_layers_in_float_until_it_holds(zoo_model, name):
    model, inputs = zoo_model(name)
    calib = [inputs, *_calibration(inputs)] if name != "transformer" else [inputs] * 3
    plain = fxopt.optimize(model, inputs, "default,quantize(scheme=int8,target=ort)",
                           calibration=calib)
    with torch.no_grad():
        before = cosine(model(*inputs), plain.module(*inputs))
    budget = 1 - (1 - before) / 2  # halve the error
    res = fxopt.optimize(model, inputs, [Pass("cleanup"), Pass("fold_bn"),
                                         Pass("quantize", scheme="int8", budget=budget)],
                         calibration=calib)
    stats = _stats(res)
    assert stats["kept_float"], stats
    assert stats["metric_after"] >= budget > stats["metric_before"]
    assert stats["kept_float"][0] == stats["sensitivity"][0][0]  # worst first
    res.module.graph.lint()


def test_a_user_metric_and_an_impossible_budget(zoo_model):
    model, inputs = zoo_model("mlp")

    def neg_max_error(reference, outputs):
        return -max((r - o).abs().max().item() for r, o in zip(reference, outputs))

    res = fxopt.optimize(model, inputs, [Pass("quantize", scheme="int8", budget=-1e9,
                                              metric=neg_max_error)], calibration=[inputs])
    assert _stats(res)["kept_float"] == []
    with pytest.raises(QuantizationError, match="below budget"):
        fxopt.optimize(model, inputs, [Pass("quantize", scheme="int8", budget=1.5)],
                       calibration=[inputs])


@pytest.mark.parametrize("scheme,key", [("int8_weight", "bytes_after"),
                                        ("dynamic_int8", "weight_bytes_after")])
def test_other_schemes_through_the_pass(zoo_model, scheme, key):
    model, inputs = zoo_model("mlp")
    res = fxopt.optimize(model, inputs, f"default,quantize(scheme={scheme})")
    stats = _stats(res)
    before = stats.get("bytes_before", stats.get("weight_bytes_before"))
    assert stats[key] < before / 3
    assert res.module.meta["fxopt"]["quantized"]["scheme"] == scheme
