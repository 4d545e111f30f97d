"""The quantize pass's accuracy budget (``budget=``) for every scheme that has one, and the
verification tolerance (``tolerance=``) that is no longer mistaken for it."""

from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt import Pass
from fxopt.errors import QuantizationError, SpecError
from fxopt.pipeline import parse_pipeline
from fxopt.quant import sensitivity as sens
from fxopt.quant.dynamic import OP as INT8_LINEAR
from fxopt.verify import QUANTIZED, Tolerance, cosine, random_like_inputs


def _stats(res) -> dict:
    return next(r for r in res.report.to_dict() if r["name"] == "quantize")["stats"]


def _int8_layers(gm) -> int:
    return sum(n.op == "call_function" and n.target is INT8_LINEAR for n in gm.graph.nodes)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_dynamic_budget_keeps_the_most_damaging_layers_per_mac_in_float(zoo_model, mode):
    model, inputs = zoo_model("transformer")
    calibration = [random_like_inputs(inputs, seed=s) for s in (1, 2)]
    probe = [inputs, *calibration]
    plain = fxopt.optimize(model, inputs, "default,quantize(scheme=dynamic_int8)", mode=mode)
    with torch.no_grad():
        want = [model(*b) for b in probe]
        before = sens.output_cosine(want, [plain.module(*b) for b in probe])
    budget = 1 - (1 - before) / 3  # a third of the all-int8 error: some layer must go float
    res = fxopt.optimize(model, inputs, f"default,quantize(scheme=dynamic_int8,budget={budget})",
                         mode=mode, calibration=calibration)
    stats = _stats(res)
    assert stats["kept_float"], stats
    assert stats["metric_after"] >= budget > stats["metric_before"]
    assert stats["metric_before"] == pytest.approx(before, abs=1e-9)
    # the budget holds on the graph the pass returns, not only in the probe
    with torch.no_grad():
        assert sens.output_cosine(want, [res.module(*b) for b in probe]) >= budget
    # ranked by damage per multiply-accumulate, the first kept float is the top of it
    ranking = stats["sensitivity"]
    per_mac = [damage / macs for _, damage, macs in ranking]
    assert per_mac == sorted(per_mac, reverse=True)
    assert stats["kept_float"][0] == ranking[0][0]
    assert 0 < stats["float_mac_share"] < 1
    assert _int8_layers(res.module) == _int8_layers(plain.module) - len(stats["kept_float"])
    assert len(stats["quantized"]) == _int8_layers(res.module)
    res.module.graph.lint()


def test_an_easy_dynamic_budget_keeps_everything_quantized(zoo_model):
    model, inputs = zoo_model("transformer")
    res = fxopt.optimize(model, inputs, [Pass("cleanup"),
                                         Pass("quantize", scheme="dynamic_int8", budget=0.9)])
    stats = _stats(res)
    assert stats["kept_float"] == [] and stats["metric_after"] == stats["metric_before"] >= 0.9
    assert _int8_layers(res.module) == len(stats["quantized"]) > 0


def test_dynamic_budget_as_a_predicate_and_the_impossible(zoo_model):
    model, inputs = zoo_model("mlp")
    plain = fxopt.optimize(model, inputs, "quantize(scheme=dynamic_int8,keep_head=false)")
    with torch.no_grad():
        before = cosine(model(*inputs), plain.module(*inputs))
    target = 1 - (1 - before) / 2
    calls = []

    def close_enough(reference, outputs) -> bool:
        calls.append(sens.output_cosine(reference, outputs))
        return calls[-1] >= target

    res = fxopt.optimize(model, inputs, [Pass("quantize", scheme="dynamic_int8",
                                              budget=close_enough)])
    stats = _stats(res)
    assert stats["kept_float"] and len(calls) == len(stats["kept_float"]) + 1
    assert calls[0] < target <= calls[-1] == pytest.approx(stats["metric_after"])
    with pytest.raises(QuantizationError, match="below budget=1.5"):
        fxopt.optimize(model, inputs, [Pass("quantize", scheme="dynamic_int8", budget=1.5)])


def test_the_old_tolerance_spelling_names_budget():
    for make in (lambda: Pass("quantize", scheme="int8", tolerance=0.999),
                 lambda: parse_pipeline("default,quantize(scheme=dynamic_int8,tolerance=0.99)")):
        with pytest.raises(SpecError, match=r"budget=0\.99"):
            make()
    with pytest.raises(SpecError, match="fxopt.verify.Tolerance"):
        Pass("cleanup", tolerance=0.5)
    # a verification tolerance is still a verification tolerance
    loose = Tolerance(rtol=1.0, atol=1e-2, min_cosine=0.9)
    p = Pass("quantize", scheme="dynamic_int8", budget=0.99, tolerance=loose)
    assert p.tolerance is loose and p.params == {"scheme": "dynamic_int8", "budget": 0.99}
    assert QUANTIZED != loose


def test_budget_on_a_weight_only_scheme_is_refused(zoo_model):
    model, inputs = zoo_model("mlp")
    with pytest.raises(QuantizationError, match="budget= works with scheme=int8"):
        fxopt.optimize(model, inputs, "quantize(scheme=int8_weight,budget=0.99)")


def test_the_probe_matches_the_rewritten_graph(zoo_model):
    model, inputs = zoo_model("gqa")
    gm = fxopt.optimize(model, inputs, "default").module
    result = sens.dynamic_fallback(gm, [inputs], budget=0.0)
    assert result["kept_float"] == []
    q = fxopt.optimize(gm, inputs, "quantize(scheme=dynamic_int8,keep_head=false)").module
    with torch.no_grad():
        got = cosine(gm(*inputs), q(*inputs))
    assert result["metric_before"] == pytest.approx(got, abs=1e-9)


class TwoHeads(torch.nn.Module):
    """Structured outputs (a dict), which an export capture rebuilds with a pytree spec."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU())
        self.a, self.b = torch.nn.Linear(32, 8), torch.nn.Linear(32, 4)

    def forward(self, x):
        h = self.body(x)
        return {"a": self.a(h), "b": self.b(h)}


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_dynamic_budget_on_structured_outputs(mode):
    model, inputs = TwoHeads().eval(), (torch.randn(4, 16),)
    gm = fxopt.optimize(model, inputs, "default", mode=mode).module
    seen = []

    def metric(reference, outputs):
        seen.append(isinstance(reference[0], dict) and isinstance(outputs[0], dict)
                    and set(outputs[0]) == {"a", "b"})
        return sens.output_cosine(reference, outputs)

    result = sens.dynamic_fallback(gm, [inputs], budget=1.0 - 1e-12, metric=metric)
    assert seen and all(seen)  # the probe returns what gm(*inputs) returns
    assert len(result["kept_float"]) == 3 and result["metric_after"] == pytest.approx(1.0)


class LoudAndWide(torch.nn.Module):
    """Two heads: ``a`` small but loud (high damage per MAC), ``b`` wide."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(16, 4), torch.nn.Linear(16, 64)
        with torch.no_grad():
            self.a.weight.mul_(20.0)

    def forward(self, x):
        return {"a": self.a(x), "b": self.b(x)}


def test_dynamic_fallback_returns_unneeded_layers_to_int8():
    model, inputs = LoudAndWide().eval(), (torch.randn(8, 16),)
    gm = fxopt.optimize(model, inputs, "default").module

    def b_exact(reference, outputs):  # only head b must stay float
        return all(torch.equal(r["b"], o["b"]) for r, o in zip(reference, outputs))

    result = sens.dynamic_fallback(gm, [inputs], budget=b_exact)
    assert [name for name, *_ in result["ranking"]] == ["a", "b"]  # the walk keeps a first
    assert result["kept_float"] == ["b"] and result["requantized"] == ["a"]
    q = fxopt.optimize(gm, inputs, "quantize(scheme=dynamic_int8,budget=0.0)").module
    stats_free = fxopt.optimize(gm, inputs, "quantize(scheme=dynamic_int8)").module
    with torch.no_grad():
        assert not torch.equal(q(*inputs)["a"], model(*inputs)["a"])
        assert torch.equal(stats_free(*inputs)["a"], q(*inputs)["a"])
    # a budget that needs every layer: nothing goes back
    full = sens.dynamic_fallback(gm, [inputs], budget=1.0 - 1e-12)
    assert sorted(full["kept_float"]) == ["a", "b"] and full["requantized"] == []
