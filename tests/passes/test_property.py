"""Property: every exact pass leaves the function of any graph unchanged.

Hypothesis writes small random programs (chains and DAGs over a menu of ops, with no-ops,
eval-mode dropout, identities, layout round trips, dead branches and in-place updates), we
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


def test_the_exact_passes_include_the_cleanups() -> None:
    assert {"cleanup", "dce", "eliminate_noops", "remove_dropout", "remove_identity"} <= set(
        _exact_builtin_passes()
    )


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
