"""Property: every exact pass leaves the function of any graph unchanged.

Hypothesis writes small random programs (chains and DAGs over a menu of ops, with no-ops,
eval-mode dropout, identities, layout round trips, dead branches, in-place updates,
conv + batch norm, per-channel affine constants after conv / linear, weight
re-parametrisations and duplicated pure subexpressions), we
turn each into an nn.Module, capture it in both modes, and push it through every registered
exact pass, one at a time and all in a row."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt import Pass, PassManager, Semantics
from fxopt.passes.base import REGISTRY, known_passes

MODES = ("symbolic", "export")
SHAPE = (2, 4, 4, 4)


def _dead(value) -> None:
    return None


class ConvBN(nn.Module):
    """conv -> batch norm with non-trivial statistics; ``shared`` also reads the conv output."""

    def __init__(self, shared: bool = False) -> None:
        super().__init__()
        self.shared = shared
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4, eps=1e-3)
        with torch.no_grad():
            self.bn.running_mean.normal_(0.0, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.normal_(0.0, 0.5)

    def forward(self, a):
        y = self.conv(a)
        return self.bn(y) + y if self.shared else self.bn(y)


class Affine(nn.Module):
    """A conv or linear followed by per-channel constants (scale, shift, divide, subtract)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(4, 4, 1)
        self.lin = nn.Linear(4, 4)
        self.s = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
        self.register_buffer("t", torch.randn(1, 4, 1, 1))
        self.register_buffer("s_lin", torch.rand(4) + 0.5)

    def forward(self, a):
        if self.kind == "conv":
            return (self.t + self.conv(a) * self.s) / 2.0 - 0.25
        return self.lin(a) * self.s_lin + 0.5


class Reparam(nn.Module):
    """Weights computed from parameters: weight norm (linear) and weight * scale (conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.randn(4, 4))
        self.g = nn.Parameter(torch.rand(4, 1) + 0.5)
        self.w = nn.Parameter(torch.randn(4, 4, 1, 1) * 0.5)
        self.scale = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, a):
        weight = self.v * (self.g / self.v.norm(dim=1, keepdim=True))
        return F.conv2d(F.linear(a, weight), self.w * self.scale.view(-1, 1, 1, 1))


def _around_a_write(a):
    """A pure expression read on both sides of an in-place write into its input."""
    y = a * 1.5
    before = y.sigmoid()
    y.add_(1)
    return before + y.sigmoid()


# op -> (factory of the layer it owns or None, apply(layer, a, b) -> new value or None).
# Every value has shape SHAPE, so any op can follow any other.
MENU: dict[str, tuple] = {
    "linear": (lambda: nn.Linear(4, 4), lambda m, a, b: m(a)),
    "conv": (lambda: nn.Conv2d(4, 4, 3, padding=1), lambda m, a, b: m(a)),
    "relu": (None, lambda m, a, b: F.relu(a)),
    "relu_module": (nn.ReLU, lambda m, a, b: m(a)),
    "gelu": (None, lambda m, a, b: F.gelu(a)),
    "add": (None, lambda m, a, b: a + b),
    "mul": (None, lambda m, a, b: a * b),
    "mul_1": (None, lambda m, a, b: a * 1),
    "add_0": (None, lambda m, a, b: a + 0),
    "sub_0_div_1": (None, lambda m, a, b: (a - 0) / 1),
    "dropout_module": (lambda: nn.Dropout(0.3), lambda m, a, b: m(a)),
    "dropout_f": (None, lambda m, a, b: F.dropout(a, 0.2, training=False)),
    "identity": (nn.Identity, lambda m, a, b: m(a)),
    "view_pair": (None, lambda m, a, b: a.view(-1, 4, 16).view(-1, 4, 4, 4)),
    "reshape_flatten": (None, lambda m, a, b: a.flatten(2).reshape(-1, 4, 4, 4)),
    "transpose_pair": (None, lambda m, a, b: a.transpose(1, 2).transpose(1, 2)),
    "transpose_contiguous": (None, lambda m, a, b: a.transpose(2, 3).contiguous().transpose(2, 3)),
    "contiguous": (None, lambda m, a, b: a.contiguous()),
    "to_float": (None, lambda m, a, b: a.float().to(torch.float32)),
    "cat": (lambda: nn.Conv2d(8, 4, 1), lambda m, a, b: m(torch.cat([a, b], 1))),
    "dead_linear": (lambda: nn.Linear(4, 4), lambda m, a, b: _dead(m(a).relu())),
    "dead_chain": (None, lambda m, a, b: _dead(torch.cat([a * 3, b + 0], 1).sum())),
    "in_place_on_copy": (None, lambda m, a, b: (a * 1).add_(1)),
    "in_place_relu": (None, lambda m, a, b: F.relu(a * 2, inplace=True)),
    "conv_bn": (ConvBN, lambda m, a, b: m(a)),
    "conv_bn_shared_output": (lambda: ConvBN(shared=True), lambda m, a, b: m(a)),
    "conv_affine": (lambda: Affine("conv"), lambda m, a, b: m(a)),
    "linear_affine": (lambda: Affine("linear"), lambda m, a, b: m(a)),
    "reparam": (Reparam, lambda m, a, b: m(a)),
    "duplicate_expr": (None, lambda m, a, b: (a.relu() + 1) * (a.relu() + 1) - b.sigmoid()),
    "module_twice": (lambda: nn.Linear(4, 4), lambda m, a, b: m(a) * torch.tanh(m(a))),
    "read_around_write": (None, lambda m, a, b: _around_a_write(a)),
}


class RandomNet(nn.Module):
    """Runs ``program``: each step applies a menu op to values picked from those so far."""

    def __init__(self, program: list[tuple[str, int, int]]) -> None:
        super().__init__()
        self.program = program
        self.layers = nn.ModuleDict()
        for k, (op, _, _) in enumerate(program):
            factory = MENU[op][0]
            if factory is not None:
                self.layers[f"l{k}"] = factory()

    def forward(self, x):
        pool = [x]
        for k, (op, i, j) in enumerate(self.program):
            layer = self.layers[f"l{k}"] if f"l{k}" in self.layers else None
            out = MENU[op][1](layer, pool[i % len(pool)], pool[j % len(pool)])
            if out is not None:
                pool.append(out)
        return pool[-1], pool[len(pool) // 2]


programs = st.lists(
    st.tuples(st.sampled_from(sorted(MENU)), st.integers(0, 31), st.integers(0, 31)),
    min_size=1,
    max_size=10,
)


def _exact_builtin_passes() -> list[str]:
    # only fxopt's own: tests register throw-away passes of their own
    return [
        name
        for name in known_passes()
        if REGISTRY[name].semantics is Semantics.EXACT
        and REGISTRY[name].fn.__module__.startswith("fxopt.")
    ]


def test_the_exact_passes_include_the_cleanups_and_folds() -> None:
    assert {
        "cleanup",
        "dce",
        "eliminate_noops",
        "remove_dropout",
        "remove_identity",
        "fold_constants",
        "fold_bn",
        "cse",
    } <= set(_exact_builtin_passes())


def _check(gm, cases) -> None:
    gm.graph.lint()
    for inputs, want in cases:
        with torch.no_grad():
            got = gm(*inputs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(program=programs)
def test_exact_passes_never_change_what_a_random_graph_computes(program) -> None:
    torch.manual_seed(0)
    model = RandomNet(program).eval()
    x, fresh = torch.randn(SHAPE), torch.randn(SHAPE)
    with torch.no_grad():
        cases = [((x,), model(x)), ((fresh,), model(fresh))]
    passes = _exact_builtin_passes()
    for mode in MODES:
        gm = fxopt.capture(model, (x,), mode=mode)
        for name in passes:
            res = PassManager([Pass(name)]).run(copy.deepcopy(gm), (x,))
            _check(res.module, cases)
        res = PassManager(passes).run(copy.deepcopy(gm), (x,))
        _check(res.module, cases)
        # a cleaned graph has no dropout or identity left, in any form
        kinds = fxopt.ops.count_kinds(res.module)
        assert kinds["dropout"] == 0 and kinds["identity"] == 0
