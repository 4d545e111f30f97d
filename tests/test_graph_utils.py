"""fxopt.graph_utils: annotation (full, with outputs, incremental), unused attributes,
fresh names, layer matching and counts."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxopt
from fxopt import graph_utils as gu
from fxopt.ops import kind_of


def _meta(gm: fx.GraphModule) -> dict:
    return {n.name: (n.meta["shape"], n.meta["dtype"], n.meta["device"]) for n in gm.graph.nodes}


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h).view(x.size(0), -1)


def test_annotate_run_returns_the_outputs_of_its_one_run() -> None:
    model, x = Chain().eval(), torch.randn(4, 6)
    gm = fx.symbolic_trace(model)
    out = gu.annotate_run(gm, (x,))
    torch.testing.assert_close(out, model(x))
    assert _meta(gm)["a"] == ((4, 8), torch.float32, "cpu")
    assert gu.annotate(gm, (x,)) is gm


def test_refresh_recomputes_only_what_a_rewrite_touched() -> None:
    model, x = Chain().eval(), torch.randn(4, 6)
    gm = fx.symbolic_trace(model)
    gu.annotate(gm, (x,))
    assert gu.refresh_metadata(gm, (x,)) == 0  # nothing changed, nothing recomputed
    gm.b = nn.Linear(8, 5)  # a new layer with another width: b, view and output change
    assert gu.refresh_metadata(gm, (x,)) == 3
    refreshed = _meta(gm)
    assert refreshed["b"][0] == (4, 5)
    gu.annotate(gm, (x,))
    assert refreshed == _meta(gm)


def test_refresh_gives_new_nodes_their_metadata() -> None:
    model, x = Chain().eval(), torch.randn(4, 6)
    gm = fx.symbolic_trace(model)
    gu.annotate(gm, (x,))
    relu = next(n for n in gm.graph.nodes if kind_of(n) == "relu")
    with gm.graph.inserting_after(relu):
        half = gm.graph.call_method("to", (relu, torch.float16))
    with gm.graph.inserting_after(half):
        back = gm.graph.call_method("to", (half, torch.float32))
    relu.replace_all_uses_with(back)
    half.args = (relu, torch.float16)
    gm.recompile()
    gu.refresh_metadata(gm, (x,))
    assert half.meta["dtype"] == torch.float16 and half.meta["shape"] == (4, 8)
    refreshed = _meta(gm)
    gu.annotate(gm, (x,))
    assert refreshed == _meta(gm)


def test_refresh_falls_back_to_a_real_run_for_data_dependent_ops() -> None:
    class Nonzero(nn.Module):
        def forward(self, x):
            return torch.nonzero(x > 0) * 1

    x = torch.tensor([1.0, -1.0, 2.0])
    gm = fx.symbolic_trace(Nonzero())
    gu.annotate(gm, (x,))
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.nonzero)
    node.meta.pop(gu._SIG)  # as if a pass had just made it
    gu.refresh_metadata(gm, (x,))
    assert node.meta["shape"] == (2, 1)


def test_drop_unused_attributes_keeps_what_nodes_use() -> None:
    gm = fx.symbolic_trace(Chain().eval())
    gm.register_buffer("stray", torch.zeros(3))
    gm.add_submodule("spare", nn.Linear(2, 2))
    assert gu.drop_unused_attributes(gm) == 2
    assert not hasattr(gm, "stray") and not hasattr(gm, "spare")
    assert hasattr(gm.a, "weight") and hasattr(gm.b, "bias")


def test_the_old_import_paths_still_work() -> None:
    from fxopt.capture import annotate
    from fxopt.ops import fresh_attr
    from fxopt.passes.cleanup import drop_unused_attributes
    from fxopt.quant.select import layer_name, matches

    assert annotate is gu.annotate and fresh_attr is gu.fresh_attr
    assert drop_unused_attributes is gu.drop_unused_attributes
    assert (layer_name, matches) == (gu.layer_name, gu.matches)


def test_fresh_attr_and_human_count() -> None:
    lin = nn.Linear(2, 2)
    assert gu.fresh_attr(lin, "weight") == "weight_1"
    assert gu.fresh_attr(lin, "scale") == "scale"
    lin.w = torch.zeros(1)
    assert gu.fresh_attr(lin, "w", "", "_scale") == "w_1"
    assert [gu.human_count(n) for n in (999, 1234, 2.5e6, 3e9)] == ["999", "1.23k", "2.50M",
                                                                      "3.00G"]


@pytest.mark.parametrize("pattern, hit", [("a", True), ("a*", True), ("b.*", False)])
def test_matches_layer_names_and_globs(pattern: str, hit: bool) -> None:
    gm = fxopt.capture(Chain(), (torch.randn(2, 6),), mode="symbolic")
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "a")
    assert gu.layer_name(node) == "a"
    assert gu.matches(node, [pattern]) is hit
