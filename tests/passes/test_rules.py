"""The declarative rule engine (fxopt/passes/rules.py) and the built-in ``simplify`` rules.

Every ``simplify`` rule is exercised on a small model in both capture modes with the four
checks (op kinds after, ``graph.lint()``, outputs against the model on fresh inputs, and
cases the rules must leave alone with ``modified is False``), then on the zoo. The engine
is tested through user-defined rules: registration, pipelines, refusals with reasons,
``explain``, commutative and repeated-parameter matching, and the fixed point.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt import PassManager, zoo
from fxopt.ops import count_kinds, kind_of
from fxopt.passes import builtin_rules, cleanup
from fxopt.passes.base import REGISTRY
from fxopt.passes.rules import RULE_SETS, NoMatch, Rule, RuleSet, register_rules

MODES = ("symbolic", "export")
SIMPLIFY = RULE_SETS["simplify"]
SHAPE = (2, 3, 8)
RTOL, ATOL = 1e-5, 1e-6


class Fn(nn.Module):
    """``forward(x) = fn(self, x)``; ``modules`` become submodules / parameters."""

    def __init__(self, fn: Callable, **modules) -> None:
        super().__init__()
        self.fn = fn
        for name, value in modules.items():
            setattr(self, name, value)

    def forward(self, x):
        return self.fn(self, x)


class Fn2(Fn):
    """``forward(x, y) = fn(self, x, y)``."""

    def forward(self, x, y):
        return self.fn(self, x, y)


def _kinds(gm: fx.GraphModule) -> Counter:
    return Counter(count_kinds(gm))


def _run(gm: fx.GraphModule, inputs: tuple, spec: str = "simplify"):
    """Through the PassManager (lint, annotate, numeric verification); (gm, record)."""
    res = PassManager(spec).run(gm, inputs)
    (record,) = res.report
    return res.module, record


def _fresh(inputs: tuple, scale: float = 4.0) -> tuple:
    """New inputs like ``inputs``; floats spread wide enough to cross clamp/relu6 knees."""
    out = []
    for x in inputs:
        if x.is_floating_point():
            out.append(torch.randn(x.shape, dtype=x.dtype) * scale)
        else:
            out.append(torch.randint(-8, 9, x.shape, dtype=x.dtype))
    return tuple(out)


def _assert_same(model: nn.Module, gm: fx.GraphModule, inputs: tuple) -> None:
    with torch.no_grad():
        for xs in (inputs, _fresh(inputs), _fresh(inputs, 0.5)):
            torch.testing.assert_close(gm(*xs), model(*xs), rtol=RTOL, atol=ATOL)


@pytest.fixture
def temp_rules():
    """``temp_rules(name, ruleset)``: ``register_rules`` for one test, undone afterwards."""
    added: list[str] = []

    def register(name: str, rules) -> RuleSet:
        assert name not in REGISTRY and name not in RULE_SETS, f"{name} would shadow a pass"
        added.append(name)
        return register_rules(name, rules)

    yield register
    for name in added:
        REGISTRY.pop(name, None)
        RULE_SETS.pop(name, None)


# --------------------------------------------------------------------------- models
SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def _split_unpacked(s, x):
    parts = x.split(4, 2)
    a, b = parts[0], parts[1]  # `a, b = x.split(...)` cannot be traced symbolically
    return torch.cat([a, b], 2).relu()


def _linear_pair(i: int, h: int, o: int, bias: bool = True) -> dict:
    return {"a": nn.Linear(i, h, bias=bias), "b": nn.Linear(h, o, bias=bias)}


def _linear_params(i: int, h: int, o: int) -> dict:
    return {
        "w1": nn.Parameter(torch.randn(h, i) / i**0.5),
        "b1": nn.Parameter(torch.randn(h)),
        "w2": nn.Parameter(torch.randn(o, h) / h**0.5),
        "b2": nn.Parameter(torch.randn(o)),
    }


@dataclass
class Case:
    fn: Callable
    fired: str | dict[str, str] | tuple[str, ...]  # rule name(s); or per mode
    after: dict[str, int]  # op kinds after simplify (nothing else remains)
    modules: Callable[[], dict] = dict
    inputs: tuple[tuple[int, ...], ...] = (SHAPE,)
    extra: Callable[[fx.GraphModule], None] | None = None
    dtype: torch.dtype = torch.float32
    reason: str = ""  # for cases left alone: what ``explain`` says about the near miss

    def fired_in(self, mode: str) -> set[str]:
        if isinstance(self.fired, dict):
            return {self.fired[mode]}
        return {self.fired} if isinstance(self.fired, str) else set(self.fired)

    def build(self) -> tuple[nn.Module, tuple]:
        torch.manual_seed(0)
        model = (Fn if len(self.inputs) == 1 else Fn2)(self.fn, **self.modules()).eval()
        if self.dtype.is_floating_point:
            return model, tuple(torch.randn(s, dtype=self.dtype) * 4 for s in self.inputs)
        return model, tuple(torch.randint(-8, 9, s, dtype=self.dtype) for s in self.inputs)


def _permute_dims(gm: fx.GraphModule) -> None:
    (node,) = [n for n in gm.graph.nodes if n.op.startswith("call") and kind_of(n) == "permute"]
    dims = fxopt.ops.op_of(node).arg("dims")
    assert list(dims) == [2, 1, 0]  # (1, 2, 0) then (1, 0, 2)


def _one_reshape_to_6x8(gm: fx.GraphModule) -> None:
    (node,) = [n for n in gm.graph.nodes if n.op.startswith("call") and kind_of(n) == "reshape"]
    assert tuple(node.meta["shape"]) == (6, 8)
    assert node.args[0].op == "placeholder"  # reads the input directly: the chain is one op


CASES: dict[str, Case] = {
    # layout
    "transpose_swapped_dims": Case(
        lambda s, x: x.transpose(1, 2).transpose(2, 1).relu(), "cancel_transpose_pair",
        {"relu": 1}),
    "transpose_same_dims": Case(
        lambda s, x: x.transpose(1, 2).transpose(1, 2).relu(), "cancel_transpose_pair",
        {"relu": 1}),
    "transpose_negative_dims": Case(
        lambda s, x: x.transpose(-1, 1).transpose(2, -2).relu(), "cancel_transpose_pair",
        {"relu": 1}),
    "permute_cancels": Case(
        lambda s, x: x.permute(0, 2, 1).permute(0, 2, 1).relu(), "merge_permute_pair",
        {"relu": 1}),
    "permute_composes": Case(
        lambda s, x: x.permute(1, 2, 0).permute(1, 0, 2).relu(), "merge_permute_pair",
        {"permute": 1, "relu": 1}, extra=_permute_dims),
    "permute_1d": Case(
        lambda s, x: x.permute(0).permute(0).relu(), "merge_permute_pair", {"relu": 1},
        inputs=((24,),)),
    "view_reshape_roundtrip": Case(
        lambda s, x: x.view(2, -1).reshape(2, 3, 8).relu(),
        ("collapse_reshape_chain", "drop_noop_reshape"), {"relu": 1}),
    "view_reshape_chain": Case(
        lambda s, x: x.view(2, -1).reshape(6, 8).relu(), "collapse_reshape_chain",
        {"reshape": 1, "relu": 1}, extra=_one_reshape_to_6x8),
    "noop_reshape": Case(
        lambda s, x: x.reshape(2, 3, 8).relu(), "drop_noop_reshape", {"relu": 1}),
    "single_input_cat": Case(
        lambda s, x: torch.cat([x], 1).relu(), "drop_single_input_cat", {"relu": 1}),
    # split / chunk then cat: symbolic keeps the list node, export indexes it
    "cat_of_split": Case(
        lambda s, x: torch.cat(torch.split(x, 4, 2), 2).relu(),
        {"symbolic": "split_node_then_cat", "export": "split_then_cat_2"}, {"relu": 1}),
    "cat_of_chunk": Case(
        lambda s, x: torch.cat(x.chunk(3, 1), 1).relu(),
        {"symbolic": "chunk_node_then_cat", "export": "chunk_then_cat_3"}, {"relu": 1}),
    "cat_of_split_parts": Case(_split_unpacked, "split_then_cat_2", {"relu": 1}),
    "cat_of_split_3_parts": Case(
        lambda s, x: (lambda p: torch.cat([p[0], p[1], p[2]], 2))(x.split(3, 2)).relu(),
        "split_then_cat_3", {"relu": 1}),
    "cat_of_split_4_parts": Case(
        lambda s, x: (lambda p: torch.cat([p[0], p[1], p[2], p[3]], 2))(x.split(2, 2)).relu(),
        "split_then_cat_4", {"relu": 1}),
    "cat_of_chunk_2_parts": Case(
        lambda s, x: (lambda p: torch.cat([p[0], p[1]], 2))(x.chunk(2, 2)).relu(),
        "chunk_then_cat_2", {"relu": 1}),
    "cat_of_chunk_3_parts": Case(
        lambda s, x: (lambda p: torch.cat([p[0], p[1], p[2]], 1))(x.chunk(3, 1)).relu(),
        "chunk_then_cat_3", {"relu": 1}),
    "cat_of_chunk_4_parts": Case(
        lambda s, x: (lambda p: torch.cat([p[0], p[1], p[2], p[3]], -1))(x.chunk(4, -1)).relu(),
        "chunk_then_cat_4", {"relu": 1}),
    # linear chains
    "linear_modules": Case(
        lambda s, x: s.b(s.a(x)), "merge_linear_chain", {"linear": 1},
        modules=lambda: _linear_pair(16, 32, 8), inputs=((4, 16),)),
    "linear_modules_without_bias": Case(
        lambda s, x: s.b(s.a(x)), "merge_linear_chain", {"linear": 1},
        modules=lambda: _linear_pair(16, 32, 8, bias=False), inputs=((4, 16),)),
    "linear_functions": Case(
        lambda s, x: F.linear(F.linear(x, s.w1, s.b1), s.w2, s.b2), "merge_linear_chain",
        {"linear": 1}, modules=lambda: _linear_params(16, 24, 8), inputs=((2, 5, 16),)),
    # activations spelled out
    "hardswish_relu6": Case(
        lambda s, x: x * F.relu6(x + 3) / 6, "hardswish_relu6", {"hardswish": 1}),
    "hardswish_hardtanh": Case(
        lambda s, x: x * F.hardtanh(x + 3, 0.0, 6.0) / 6, "hardswish_hardtanh",
        {"hardswish": 1}),
    "hardswish_clamp": Case(
        lambda s, x: x * torch.clamp(x + 3, 0, 6) / 6, "hardswish_clamp", {"hardswish": 1}),
    "hardswish_of_hardsigmoid": Case(
        lambda s, x: x * F.hardsigmoid(x), "hardswish_of_hardsigmoid", {"hardswish": 1}),
    "hardsigmoid_relu6": Case(
        lambda s, x: F.relu6(x + 3) / 6, "hardsigmoid_relu6", {"hardsigmoid": 1}),
    "hardsigmoid_hardtanh": Case(
        lambda s, x: F.hardtanh(x + 3, 0.0, 6.0) / 6, "hardsigmoid_hardtanh",
        {"hardsigmoid": 1}),
    "hardsigmoid_clamp": Case(
        lambda s, x: torch.clamp(x + 3, 0, 6) / 6, "hardsigmoid_clamp", {"hardsigmoid": 1}),
    "gelu_tanh_pow": Case(
        lambda s, x: 0.5 * x * (1 + torch.tanh(SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3)))),
        "gelu_tanh_approximation", {"gelu": 1}),
    "gelu_tanh_power_operator": Case(
        lambda s, x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
        "gelu_tanh_approximation", {"gelu": 1}),
    "gelu_tanh_cubed": Case(
        lambda s, x: 0.5 * x * (1 + torch.tanh(SQRT_2_OVER_PI * (x + 0.044715 * (x * x * x)))),
        "gelu_tanh_approximation_cubed", {"gelu": 1}),
    "gelu_erf": Case(
        lambda s, x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))), "gelu_erf", {"gelu": 1}),
    "gelu_erf_mul": Case(
        lambda s, x: x * 0.5 * (1 + torch.erf(x * (1 / math.sqrt(2)))), "gelu_erf_mul",
        {"gelu": 1}),
    "double_negation": Case(
        lambda s, x: (-(-x)).relu(), "double_negation", {"relu": 1}),  # noqa: B002
    "double_negation_torch_neg": Case(
        lambda s, x: torch.neg(x.neg()).relu(), "double_negation", {"relu": 1}),
    "zero_pad": Case(lambda s, x: F.pad(x, (0, 0, 0, 0)).relu(), "drop_zero_pad", {"relu": 1}),
    "zero_pad_mode_value": Case(
        lambda s, x: F.pad(x, (0, 0), mode="constant", value=0.0).relu(), "drop_zero_pad_full",
        {"relu": 1}),
}


# torch.export always indexes a split's result, so the rules on the bare list node
# (``cat(split(x), d)``) can only meet symbolic graphs
SYMBOLIC_ONLY = {"split_node_then_cat", "chunk_node_then_cat"}


def test_every_simplify_rule_has_a_case_in_both_modes() -> None:
    for mode in MODES:
        covered = set().union(*(c.fired_in(mode) for c in CASES.values()))
        expected = {r.name for r in SIMPLIFY} - (SYMBOLIC_ONLY if mode == "export" else set())
        assert expected - covered == set(), mode


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_simplify_rule_fires(case: str, mode: str) -> None:
    spec = CASES[case]
    model, inputs = spec.build()
    gm = fxopt.capture(model, inputs, mode=mode)
    before = _kinds(gm)
    gm, record = _run(gm, inputs)

    # 1. the op kinds after, and which rules fired
    assert _kinds(gm) == Counter(spec.after), f"before: {dict(before)}"
    assert record.modified is True
    assert set(record.stats["fired"]) == spec.fired_in(mode)
    assert set(record.stats["by_kind"]) <= set(before)
    if spec.extra:
        spec.extra(gm)
    # 2. lint
    gm.graph.lint()
    # 3. outputs against the model, on the example inputs and fresh ones
    _assert_same(model, gm, inputs)
    # 4. nothing is left to do
    code = gm.code
    gm, again = _run(gm, inputs)
    assert again.modified is False and again.stats["fired"] == {}
    assert gm.code == code


def _kept_twice_used_transpose(s, x):
    t = x.transpose(1, 2)
    return t.transpose(1, 2), t.relu()


def _hardsigmoid_also_returned(s, x):
    h = F.relu6(x + 3)
    return x * h / 6, h


UNCHANGED: dict[str, Case] = {
    "transposes_that_do_not_cancel": Case(
        lambda s, x: x.transpose(1, 2).transpose(0, 1).relu(), (), {},
        reason="transposes [1, 2] then [0, 1] do not cancel"),
    "transpose_pair_middle_used_twice": Case(
        _kept_twice_used_transpose, (), {}, reason="is also used outside the pattern by relu"),
    "permute_then_transpose": Case(
        lambda s, x: x.permute(0, 2, 1).transpose(0, 1).relu(), (), {}),
    "hardswish_wrong_constant": Case(
        lambda s, x: x * F.relu6(x + 4) / 6, (), {},
        reason="(pattern node add): at 4: argument 'other': expected 3, found 4"),
    "hardswish_wrong_divisor": Case(
        lambda s, x: x * torch.clamp(x + 3, 0, 6) / 5, (), {},
        reason="argument 'other': expected 6, found 5"),
    "hardsigmoid_wrong_clamp": Case(
        lambda s, x: torch.clamp(x + 3, 0, 5) / 6, (), {},
        reason="(pattern node clamp): at 5: argument 'max': expected 6, found 5"),
    "hardsigmoid_part_used_elsewhere": Case(
        _hardsigmoid_also_returned, (), {},
        reason="relu6 is also used outside the pattern by output"),
    "hardswish_two_inputs": Case(
        lambda s, x, y: x * F.relu6(y + 3) / 6, (), {}, inputs=(SHAPE, SHAPE),
        reason="x is already bound to x (placeholder), here it is y (placeholder)"),
    "hardswish_integer_input": Case(
        lambda s, x: x * torch.clamp(x + 3, 0, 6) / 6, (), {}, dtype=torch.int64,
        reason="check refused: input is not a floating-point tensor"),
    "gelu_wrong_coefficient": Case(
        lambda s, x: 0.5 * x * (1 + torch.tanh(SQRT_2_OVER_PI * (x + 0.05 * torch.pow(x, 3)))),
        (), {}),
    "cat_of_incomplete_split": Case(
        lambda s, x: torch.cat(torch.split(x, 2, 2)[:3], 2).relu(), (), {}),
    "cat_of_split_parts_reordered": Case(
        lambda s, x: (lambda p: torch.cat([p[1], p[0]], 2))(x.split(4, 2)).relu(), (), {}),
    "cat_of_split_on_another_dim": Case(
        lambda s, x: torch.cat(torch.split(x, 4, 2), 1).relu(), (), {},
        reason="d is already bound to 2, here it is 1"),
    "cat_of_a_part_twice": Case(
        lambda s, x: (lambda p: torch.cat([p[0], p[0]], 2))(x.split(4, 2)).relu(), (), {}),
    "view_to_another_shape": Case(
        lambda s, x: x.view(6, 8).relu(), (), {}, reason="reshapes (2, 3, 8) to (6, 8)"),
    "negation_once": Case(lambda s, x: (-x).relu(), (), {}),
    "linear_modules_bottleneck": Case(
        lambda s, x: s.b(s.a(x)), (), {}, modules=lambda: _linear_pair(64, 8, 64),
        inputs=((4, 64),), reason="would cost more than the two layers"),
    "linear_functions_bottleneck": Case(
        lambda s, x: F.linear(F.linear(x, s.w1, s.b1), s.w2, s.b2), (), {},
        modules=lambda: _linear_params(64, 8, 64), inputs=((4, 64),),
        reason="would cost more than the two layers"),
    "linear_with_relu_between": Case(
        lambda s, x: s.b(s.a(x).relu()), (), {}, modules=lambda: _linear_pair(16, 32, 8),
        inputs=((4, 16),)),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(UNCHANGED))
def test_simplify_leaves_alone(case: str, mode: str) -> None:
    spec = UNCHANGED[case]
    model, inputs = spec.build()
    gm = fxopt.capture(model, inputs, mode=mode)
    before, code = _kinds(gm), gm.code
    gm, record = _run(gm, inputs)
    assert record.modified is False
    assert record.stats["fired"] == {}
    assert _kinds(gm) == before
    assert gm.code == code
    gm.graph.lint()
    with torch.no_grad():
        for xs in (inputs, _fresh(inputs)):
            torch.testing.assert_close(gm(*xs), model(*xs), rtol=0, atol=0)
    if spec.reason:
        reasons = [str(r) for r in SIMPLIFY.explain(gm)]
        assert any(spec.reason in r for r in reasons), reasons


@pytest.mark.parametrize("mode", MODES)
def test_cat_of_a_single_split_part_keeps_the_split(mode: str) -> None:
    """``cat(split(x)[:1])`` is not ``x``: the split stays (export may drop the one-input cat,
    which is a copy of the part)."""
    model = Fn(lambda s, x: torch.cat(torch.split(x, 4, 2)[:1], 2).relu()).eval()
    inputs = (torch.randn(SHAPE),)
    gm = fxopt.capture(model, inputs, mode=mode)
    gm, record = _run(gm, inputs)
    assert set(record.stats["fired"]) <= {"drop_single_input_cat"}
    assert _kinds(gm)["split"] == 1 and _kinds(gm)["relu"] == 1
    gm.graph.lint()
    _assert_same(model, gm, inputs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", ["modules", "functions"])
def test_linear_bottleneck_is_refused_with_a_reason(mode: str, form: str) -> None:
    spec = UNCHANGED[f"linear_{form}_bottleneck"]
    model, inputs = spec.build()
    gm = fxopt.capture(model, inputs, mode=mode)
    refused = [r for r in SIMPLIFY.explain(gm, rule="merge_linear_chain") if "check" in str(r)]
    (reason,) = refused
    assert not reason
    assert "merged weight 64x64 would cost more than the two layers (8 hidden units)" in str(
        reason)
    gm, record = _run(gm, inputs, "simplify(debug=true)")
    assert record.modified is False
    assert any("would cost more" in r for r in record.stats["refused"])


@pytest.mark.parametrize("mode", MODES)
def test_in_place_write_into_the_source_keeps_the_copy(mode: str) -> None:
    """``cat([y])`` / ``-(-y)`` are fresh tensors: with ``y`` written in place afterwards,
    replacing them by ``y`` would change the result."""

    def fn(s, x):
        y = x.relu()
        a, b = torch.cat([y], 1), -(-y)  # noqa: B002
        y.mul_(2)
        return a, b

    model = Fn(fn).eval()
    inputs = (torch.randn(SHAPE),)
    gm = fxopt.capture(model, inputs, mode=mode)
    code = gm.code
    gm, record = _run(gm, inputs)
    assert record.modified is False and gm.code == code
    reasons = [str(r) for r in SIMPLIFY.explain(gm) if "written in place" in str(r)]
    assert len(reasons) == 2, reasons


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fn", [
    lambda s, x: torch.cat([x.transpose(1, 2)], 0).view(-1),
    lambda s, x: torch.cat(torch.split(x.transpose(1, 2), 4, 1), 1).view(-1),
    lambda s, x: torch.cat(x.transpose(1, 2).chunk(2, 1), 1).view(-1),
], ids=["single_cat", "split_cat", "chunk_cat"])
def test_a_copy_that_makes_the_layout_dense_is_kept(fn, mode: str) -> None:
    """``cat`` returns a dense tensor; the ``.view`` after it fails on the transposed input."""
    model = Fn(fn).eval()
    inputs = (torch.randn(SHAPE),)
    gm = fxopt.capture(model, inputs, mode=mode)
    code = gm.code
    gm, record = _run(gm, inputs)
    assert record.modified is False and gm.code == code
    reasons = [str(r) for r in SIMPLIFY.explain(gm) if "memory layout" in str(r)]
    assert len(reasons) == 1, [str(r) for r in SIMPLIFY.explain(gm)]


@pytest.mark.parametrize("mode", MODES)
def test_reshape_chain_on_a_transposed_tensor_keeps_its_copy(mode: str) -> None:
    """``t.reshape(24)`` copies a transposed ``t``; one ``t.reshape(3, 2, 8)`` would be a view
    of ``h``, and the in-place write into ``h`` would then show through."""

    def fn(s, x):
        h = x.relu()
        y = h.transpose(0, 1).reshape(48).reshape(3, 2, 8)
        h.mul_(2)
        return y

    model = Fn(fn).eval()
    inputs = (torch.randn(SHAPE),)
    gm = fxopt.capture(model, inputs, mode=mode)
    gm, record = _run(gm, inputs)
    assert "collapse_reshape_chain" not in record.stats["fired"]
    assert _kinds(gm)["reshape"] == 2
    gm.graph.lint()
    _assert_same(model, gm, inputs)
    (refused,) = [r for r in SIMPLIFY.explain(gm, rule="collapse_reshape_chain") if "check" in
                  str(r)]
    assert "input is not contiguous" in str(refused)


# --------------------------------------------------------------------------- the zoo
ZOO_CASES = [(n, m) for n in zoo.names() for m in MODES if m == "export" or zoo.get(n).symbolic]
# kinds a simplify rule may create; everything else can only go
CREATED = {"hardswish", "hardsigmoid", "gelu", "permute", "reshape", "linear"}


@pytest.mark.parametrize(("name", "mode"), ZOO_CASES, ids=[f"{n}-{m}" for n, m in ZOO_CASES])
def test_simplify_on_the_zoo(name: str, mode: str, zoo_case, fresh_inputs) -> None:
    model, inputs, gm = zoo_case(name, mode)
    before = _kinds(gm)
    gm, record = _run(gm, inputs)  # verified against the capture by the manager

    # 1. op kinds: only what the rules rewrite goes, only their replacements appear
    after = _kinds(gm)
    fired = record.stats["fired"]
    assert set(after - before) <= CREATED
    assert sum(after.values()) <= sum(before.values())
    assert record.modified is bool(fired)
    assert (after == before) is (not fired)
    for kind in ("conv", "conv_transpose", "batch_norm", "layer_norm", "attention",
                 "scaled_dot_product", "matmul", "embedding"):
        assert after[kind] == before[kind], kind
    if name == "densenet":  # each block's first layer reads torch.cat(features, 1) of one
        assert fired == {"drop_single_input_cat": 2}
        assert before["cat"] - after["cat"] == 2
    # 2. lint
    gm.graph.lint()
    # 3. outputs against the model on fresh inputs
    with torch.no_grad():
        fresh = fresh_inputs(inputs)
        torch.testing.assert_close(gm(*fresh), model(*fresh), rtol=1e-4, atol=1e-5)
    # 4. a second run has nothing to do
    code = gm.code
    gm, again = _run(gm, inputs)
    assert again.modified is False and gm.code == code


def test_simplify_leaves_the_mlp_alone(zoo_case) -> None:
    _, inputs, gm = zoo_case("mlp", "symbolic")
    code = gm.code
    gm, record = _run(gm, inputs, "simplify(debug=true)")
    assert record.modified is False and record.stats["fired"] == {}
    assert gm.code == code
    # linear -> relu -> dropout -> linear: the chain rule looked and said why not
    assert any("at net_3 (pattern node linear): at net_2: expected linear, found dropout" in r
               for r in record.stats["refused"])


# --------------------------------------------------------------------------- eliminate_noops
def test_eliminate_noops_is_a_rule_set_that_cleanup_uses(monkeypatch) -> None:
    noops = RULE_SETS["eliminate_noops"]
    assert isinstance(noops, RuleSet) and noops is builtin_rules.NOOP_RULES
    assert {"mul_by_one", "add_zero", "contiguous_noop", "to_same_type"} <= {
        r.name for r in noops}
    assert "eliminate_noops" in REGISTRY and "simplify" in REGISTRY
    assert cleanup.eliminate_noops in cleanup.CLEANUP_PASSES
    # one eliminate_noops: cleanup's step is the registered pass, with its stats shape
    assert cleanup.eliminate_noops is REGISTRY["eliminate_noops"].fn

    # a rule added to the set is applied by cleanup (and by the eliminate_noops pass)
    halve = Rule("test_mul_by_two_div_two", lambda x: x * 2 / 2, lambda x: x)
    monkeypatch.setattr(noops, "rules", [*noops.rules, halve])
    model = Fn(lambda s, x: (x * 2 / 2).relu() * 1).eval()
    inputs = (torch.randn(SHAPE),)
    for spec in ("cleanup", "eliminate_noops"):
        gm = fxopt.capture(model, inputs, mode="symbolic")
        gm, record = _run(gm, inputs, spec)
        assert _kinds(gm) == Counter({"relu": 1}), spec
        gm.graph.lint()
        _assert_same(model, gm, inputs)
        if spec == "cleanup":
            assert record.stats["removed"]["eliminate_noops"] == 2
    assert record.stats["fired"] == {"test_mul_by_two_div_two": 1, "mul_by_one": 1}
    step = cleanup.eliminate_noops(fxopt.capture(model, inputs, mode="symbolic"),
                                   fxopt.PassContext(inputs))
    assert set(step.stats) == set(record.stats) == {"fired", "by_kind"}


# --------------------------------------------------------------------------- the engine
def _silu_rules() -> RuleSet:
    return RuleSet([Rule("test_silu", lambda x: x * torch.sigmoid(x), lambda x: F.silu(x))])


class SiluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        return h * torch.sigmoid(h) + torch.sigmoid(x) * x


@pytest.mark.parametrize("mode", MODES)
def test_user_rule_in_a_pipeline(mode: str, temp_rules) -> None:
    rules = temp_rules("test_silu_rules", _silu_rules())
    assert RULE_SETS["test_silu_rules"] is rules
    assert "test_silu_rules" in fxopt.passes.known_passes()

    model = SiluNet().eval()
    x = torch.randn(4, 8)
    res = fxopt.optimize(model, (x,), pipeline="default,test_silu_rules", mode=mode)
    assert [r.name for r in res.report][-1] == "test_silu_rules"
    record = res.report[-1]
    assert record.modified is True
    assert record.stats == {"fired": {"test_silu": 2}, "by_kind": {"mul": 2}}
    assert _kinds(res.module) == Counter({"linear": 1, "silu": 2, "add": 1})
    res.module.graph.lint()
    _assert_same(model, res.module, (x,))


def test_user_rule_check_refusal_is_explained(temp_rules) -> None:
    def only_wide(match) -> str | None:
        width = match.shape("x")[-1]
        return None if width >= 16 else f"only {width} features"

    rules = temp_rules("test_wide_silu", RuleSet([Rule(
        "test_wide_silu", lambda x: x * torch.sigmoid(x), lambda x: F.silu(x), only_wide)]))
    model = SiluNet().eval()
    x = torch.randn(4, 8)
    gm = fxopt.capture(model, (x,), mode="symbolic")

    results = rules.explain(gm)
    assert len(results) == 2  # every mul node
    refused = [r for r in results if "check refused" in str(r)]
    assert len(refused) == 2 and not any(refused)
    assert all(str(r).endswith("check refused: only 8 features") for r in refused)

    gm, record = _run(gm, (x,), "test_wide_silu(debug=true)")
    assert record.modified is False and record.stats["fired"] == {}
    assert sum("check refused: only 8 features" in r for r in record.stats["refused"]) == 2
    gm, record = _run(gm, (x,), "test_wide_silu")
    assert "refused" not in record.stats  # only in debug mode


@pytest.mark.parametrize("mode", MODES)
def test_explain_names_the_pattern_node_and_the_graph_node(mode: str) -> None:
    rule = SIMPLIFY.rules[[r.name for r in SIMPLIFY].index("cancel_transpose_pair")]
    inner = rule.root_pattern.args[0]  # the first transpose of the pattern
    model = Fn(lambda s, x: x.relu().transpose(1, 2)).eval()
    gm = fxopt.capture(model, (torch.randn(SHAPE),), mode=mode)
    relu = next(n for n in gm.graph.nodes if n.op.startswith("call") and kind_of(n) == "relu")
    transpose = relu.next

    (result,) = SIMPLIFY.explain(gm, rule="cancel_transpose_pair")
    assert isinstance(result, NoMatch) and not result
    assert result.node == transpose.name
    assert result.pattern_node == inner.name
    assert f"at {relu.name}: expected transpose, found relu" in result.reason
    assert str(result).startswith(f"cancel_transpose_pair at {transpose.name} (pattern node ")

    # asked at a node of another kind, it says so at the root
    (at_relu,) = SIMPLIFY.explain(gm, rule="cancel_transpose_pair", node=relu.name)
    assert at_relu.pattern_node == rule.root_pattern.name
    assert "expected transpose, found relu" in at_relu.reason
    # every rule, one node
    assert len(SIMPLIFY.explain(gm, node=relu.name)) == len(SIMPLIFY)


def test_explain_says_why_transposes_do_not_cancel() -> None:
    model = Fn(lambda s, x: x.transpose(1, 2).transpose(0, 1)).eval()
    gm = fxopt.capture(model, (torch.randn(SHAPE),), mode="symbolic")
    results = SIMPLIFY.explain(gm, rule="cancel_transpose_pair")
    assert [bool(r) for r in results] == [False, False]
    assert "check refused: transposes [1, 2] then [0, 1] do not cancel" in str(results[1])


def test_nomatch_is_falsy_and_readable() -> None:
    nm = NoMatch("my_rule", "add_3", "at x: expected mul, found add", "mul_1")
    assert not nm and bool(nm) is False
    assert str(nm) == "my_rule at add_3 (pattern node mul_1): at x: expected mul, found add"
    assert str(NoMatch("r", "n", "why")) == "r at n: why"


def test_rule_sets_concatenate_and_refuse_duplicate_names() -> None:
    a = Rule("a", lambda x: torch.neg(-x), lambda x: x)
    b = Rule("b", lambda x: x * 1, lambda x: x)
    both = RuleSet([a]) + RuleSet([b])
    assert isinstance(both, RuleSet) and [r.name for r in both] == ["a", "b"] and len(both) == 2
    assert len(SIMPLIFY + RULE_SETS["eliminate_noops"]) == len(SIMPLIFY) + len(
        RULE_SETS["eliminate_noops"])
    with pytest.raises(ValueError, match="duplicate rule names in a rule set: a"):
        RuleSet([a]) + RuleSet([a])
    with pytest.raises(ValueError, match="duplicate"):
        RuleSet([a, b, a])


def test_rule_needs_exactly_one_of_replacement_and_rewrite() -> None:
    with pytest.raises(ValueError, match="exactly one of replacement= or rewrite="):
        Rule("neither", lambda x: torch.neg(-x))
    with pytest.raises(ValueError, match="exactly one"):
        Rule("both", lambda x: torch.neg(-x), lambda x: x, rewrite=lambda m, g: m["x"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fn", [
    lambda s, x: x * F.relu6(3 + x) / 6,
    lambda s, x: F.relu6(x + 3) * x / 6,
    lambda s, x: (F.relu6(3 + x) * x) / 6,
], ids=["3+x", "relu6*x", "both"])
def test_commutative_operands_match(fn, mode: str) -> None:
    model = Fn(fn).eval()
    inputs = (torch.randn(SHAPE) * 4,)
    gm = fxopt.capture(model, inputs, mode=mode)
    gm, record = _run(gm, inputs)
    assert record.stats["fired"] == {"hardswish_relu6": 1}
    assert _kinds(gm) == Counter({"hardswish": 1})
    gm.graph.lint()
    _assert_same(model, gm, inputs)


@pytest.mark.parametrize("mode", MODES)
def test_commutative_scalar_factor(mode: str) -> None:
    model = Fn(lambda s, x: x * 0.5 * (1 + torch.erf(x / math.sqrt(2))) + 3 + x).eval()
    inputs = (torch.randn(SHAPE),)
    gm = fxopt.capture(model, inputs, mode=mode)
    rules = RuleSet([
        Rule("test_half", lambda x: 0.5 * x, lambda x: x / 2),
        Rule("test_plus_three", lambda x: x + 3, lambda x: x - (-3)),
    ])
    fired = rules.apply(gm, inputs)
    assert fired == {"test_half": 1, "test_plus_three": 1}
    gm.graph.lint()
    gm.recompile()
    assert _kinds(gm)["mul"] == 1 and _kinds(gm)["div"] == 2  # (x / 2) * (1 + erf(..))
    _assert_same(model, gm, inputs)
    # and the built-in erf GELU pattern, written 0.5 * x, matches x * 0.5
    gm = fxopt.capture(model, inputs, mode=mode)
    gm, record = _run(gm, inputs)
    assert record.stats["fired"] == {"gelu_erf": 1}


@pytest.mark.parametrize("fn", [
    lambda s, x, y: x * F.relu6(y + 3) / 6,
    lambda s, x, y: F.relu6(y + 3) * x / 6,  # the deeper of the two operand orders is told
], ids=["x*relu6", "relu6*x"])
def test_a_parameter_used_twice_binds_one_value(fn) -> None:
    model = Fn2(fn).eval()
    inputs = (torch.randn(SHAPE), torch.randn(SHAPE))
    gm = fxopt.capture(model, inputs, mode="symbolic")
    (result,) = SIMPLIFY.explain(gm, rule="hardswish_relu6")
    assert not result
    assert "at y: x is already bound to x (placeholder), here it is y (placeholder)" in str(
        result)
    code = gm.code
    gm, record = _run(gm, inputs)
    assert record.modified is False and gm.code == code
    # the same model with y = x is matched
    same = Fn(lambda s, x: x * F.relu6(x + 3) / 6).eval()
    gm = fxopt.capture(same, inputs[:1], mode="symbolic")
    (result,) = SIMPLIFY.explain(gm, rule="hardswish_relu6")
    assert result and result["x"].op == "placeholder"


@pytest.mark.parametrize("mode", MODES)
def test_an_intermediate_with_outside_users_blocks_the_rule(mode: str) -> None:
    model = Fn(_hardsigmoid_also_returned).eval()
    inputs = (torch.randn(SHAPE) * 4,)
    gm = fxopt.capture(model, inputs, mode=mode)
    relu6 = next(n for n in gm.graph.nodes if n.op.startswith("call") and kind_of(n) == "relu6")
    (result,) = SIMPLIFY.explain(gm, rule="hardswish_relu6")
    assert not result
    assert f"{relu6.name} is also used outside the pattern by output" in str(result)
    # a user rule: h = x + 1 is read by (h * 2) and by the add after it
    rules = RuleSet([Rule("test_affine", lambda x: (x + 1) * 2, lambda x: x * 2 + 2)])
    model = Fn(lambda s, x: (lambda h: h * 2 + h)(x + 1)).eval()
    gm = fxopt.capture(model, inputs, mode=mode)
    code = gm.code
    assert rules.apply(gm, inputs) == {}
    assert gm.code == code
    (result,) = rules.explain(gm)
    assert "is also used outside the pattern by" in str(result)
    # without the second reader it fires
    model = Fn(lambda s, x: (x + 1) * 2).eval()
    gm = fxopt.capture(model, inputs, mode=mode)
    assert rules.apply(gm, inputs) == {"test_affine": 1}
    _assert_same(model, gm, inputs)


@pytest.mark.parametrize("mode", MODES)
def test_rules_run_to_a_fixed_point(mode: str) -> None:
    four = Fn(lambda s, x: x.transpose(1, 2).transpose(0, 1).transpose(0, 1)
              .transpose(1, 2).relu()).eval()
    enabled = Fn(lambda s, x: x.transpose(1, 2).neg().neg().transpose(1, 2).relu()).eval()
    inputs = (torch.randn(SHAPE),)
    for model, fired in ((four, {"cancel_transpose_pair": 2}),
                         (enabled, {"double_negation": 1, "cancel_transpose_pair": 1})):
        gm = fxopt.capture(model, inputs, mode=mode)
        gm, record = _run(gm, inputs)
        assert record.stats["fired"] == fired
        assert _kinds(gm) == Counter({"relu": 1})
        gm.graph.lint()
        _assert_same(model, gm, inputs)

    # the transposes only meet once the negations are gone: a second round is needed
    gm = fxopt.capture(enabled, inputs, mode=mode)
    assert SIMPLIFY.apply(gm, inputs, max_rounds=1) == {"double_negation": 1}
    assert _kinds(gm)["transpose"] == 2
    assert SIMPLIFY.apply(gm, inputs) == {"cancel_transpose_pair": 1}


def test_rewrite_rule_computes_the_replacement() -> None:
    def rewrite(match, graph):
        return graph.call_function(torch.mul, (match["x"], match["a"] * match["b"]))

    rules = RuleSet([Rule("test_fold_scale", lambda x, a, b: x * a * b, rewrite=rewrite)])
    model = Fn(lambda s, x: (x * 2.0 * 3.0).relu()).eval()
    inputs = (torch.randn(SHAPE),)
    gm = fxopt.capture(model, inputs, mode="symbolic")
    assert rules.apply(gm, inputs) == {"test_fold_scale": 1}
    (mul,) = [n for n in gm.graph.nodes if n.op.startswith("call") and kind_of(n) == "mul"]
    assert mul.args[1] == 6.0
    gm.graph.lint()
    _assert_same(model, gm, inputs)
    assert rules.by_kind({"test_fold_scale": 1}) == {"mul": 1}


# --------------------------------------------------------------------------- property
LAYOUT_OPS = ("transpose", "permute", "view", "reshape", "contiguous", "neg", "cat",
              "split_cat", "chunk_cat")


@dataclass
class Program:
    """A chain of layout ops, each fixed (dims, sizes) from a seed at the current shape."""

    steps: list[tuple[str, tuple]] = field(default_factory=list)

    @classmethod
    def from_seeds(cls, seeds: list[tuple[str, int]], shape: tuple[int, ...]) -> Program:
        prog = cls()
        x = torch.zeros(shape)
        for op, r in seeds:
            step = _choose(op, r, x)
            prog.steps.append(step)
            x = _apply(step, x)
        return prog

    def __call__(self, x):
        for step in self.steps:
            x = _apply(step, x)
        return x


def _choose(op: str, r: int, x: torch.Tensor) -> tuple[str, tuple]:
    rank, shape = x.dim(), tuple(x.shape)
    if op == "transpose":
        return (op, (r % rank, (r // rank) % rank - rank * (r % 2)))  # some negative dims
    if op == "permute":
        perms = list(itertools.permutations(range(rank)))
        return (op, perms[r % len(perms)])
    if op in ("view", "reshape"):
        n = x.numel()
        options = [(n,), (shape[0], -1), tuple(reversed(shape)), (-1, shape[-1]),
                   (shape[0], shape[1], -1) if rank >= 2 else (n,)]
        target = options[r % len(options)]
        if op == "view" and not x.is_contiguous():
            op = "reshape"  # a view of a transposed tensor is an error in eager too
        return (op, (target,))
    if op in ("cat", "split_cat", "chunk_cat"):
        d = r % rank
        if op == "cat":
            return (op, (d,))
        size = 1 + (r // rank) % max(x.shape[d], 1)
        return (op, (size, d))
    return (op, ())


def _apply(step: tuple[str, tuple], x):
    op, args = step
    if op == "transpose":
        return x.transpose(*args)
    if op == "permute":
        return x.permute(*args)
    if op in ("view", "reshape"):
        return getattr(x, op)(*args)
    if op == "contiguous":
        return x.contiguous()
    if op == "neg":
        return -x
    if op == "cat":
        return torch.cat([x], args[0])
    if op == "split_cat":
        return torch.cat(torch.split(x, args[0], args[1]), args[1])
    if op == "chunk_cat":
        return torch.cat(x.chunk(args[0], args[1]), args[1])
    raise AssertionError(op)


class ProgramNet(nn.Module):
    def __init__(self, program: Program) -> None:
        super().__init__()
        self.program = program

    def forward(self, x):
        return self.program(x) * 2


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seeds=st.lists(st.tuples(st.sampled_from(LAYOUT_OPS), st.integers(0, 10_000)),
                      min_size=1, max_size=7),
       shape=st.sampled_from([(2, 3, 4), (1, 4, 3), (3, 1, 2, 2)]))
def test_property_layout_chains_keep_their_output(seeds, shape) -> None:
    program = Program.from_seeds(seeds, shape)
    model = ProgramNet(program).eval()
    x = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape) - 11.5
    want = model(x)
    for mode in MODES:
        gm = fxopt.capture(model, (x,), mode=mode, dynamic_batch=False)
        before = sum(_kinds(gm).values())
        res = PassManager("simplify,eliminate_noops").run(gm, (x,))
        gm = res.module
        gm.graph.lint()
        assert torch.equal(gm(x), want), (mode, program.steps)
        y = torch.randn(shape)
        assert torch.equal(gm(y), model(y)), (mode, program.steps)
        assert sum(_kinds(gm).values()) <= before


class _ZeroPads(nn.Module):
    def forward(self, x):
        a = F.pad(x, (0, 0, 0, 0)).relu()
        b = F.pad(x, [0, 0, 0, 0], mode="constant", value=0.0)
        c = F.pad(x, (1, 0, 0, 0))  # a real pad stays
        return a + b, c


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_zero_pads_are_dropped_and_real_pads_kept(mode) -> None:
    model, x = _ZeroPads().eval(), torch.randn(2, 3, 5, 5)
    gm = fxopt.capture(model, (x,), mode=mode)
    res = fxopt.PassManager("simplify").run(gm, (x,))
    res.module.graph.lint()
    assert count_kinds(res.module)["pad"] == 1
    assert sum(v for k, v in res.report[0].stats["fired"].items() if "zero_pad" in k) == 2
    with torch.no_grad():
        for got, want in zip(res.module(x), model(x)):
            torch.testing.assert_close(got, want)
