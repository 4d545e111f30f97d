"""Cleanup passes (dce, remove_dropout, remove_identity, eliminate_noops, cleanup) on the zoo
and on small models, in both capture modes. Each pass gets the four checks: the op kinds
after it, graph.lint(), outputs against the original, and a case where it changes nothing."""

from __future__ import annotations

import operator
from collections import Counter

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import PassManager, zoo
from fxopt.op_props import Prop
from fxopt.ops import count_kinds, is_pure, kind_of, kinds_with
from fxopt.passes.base import REGISTRY, PassContext

MODES = ("symbolic", "export")
ZOO_CASES = [(n, m) for n in zoo.names() for m in MODES if m == "export" or zoo.get(n).symbolic]
CLEANUPS = ("dce", "remove_dropout", "remove_identity", "eliminate_noops", "cleanup")
EVAL_IDENTITIES = kinds_with(Prop.IDENTITY_IN_EVAL)  # dropout, stochastic_depth, drop_path


def _kinds(gm: fx.GraphModule) -> Counter:
    return Counter(count_kinds(gm))


def _run_pass(name: str, gm: fx.GraphModule, inputs: tuple, **params):
    """Through the PassManager (lint, annotate, verify); returns (gm, record)."""
    res = PassManager([fxopt.Pass(name, **params)]).run(gm, inputs)
    (record,) = res.report
    return res.module, record


def _call(name: str, gm: fx.GraphModule, inputs: tuple):
    """The bare pass function, for graphs the manager could not verify (random dropout)."""
    return REGISTRY[name].fn(gm, PassContext(tuple(inputs)))


def _close(want, got) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _assert_no_dead_code(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        assert node.users or not is_pure(node), f"dead node {node.name} ({kind_of(node)}) left"


def _assert_no_unused_weights(gm: fx.GraphModule) -> None:
    attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    names = [k for k, _ in gm.named_parameters()] + [k for k, _ in gm.named_buffers()]
    for name in names:
        owner = name.rpartition(".")[0]
        used = name in attrs or any(owner == m or owner.startswith(m + ".") for m in modules)
        assert used, f"{name} is not used by any node"


# --------------------------------------------------------------------------- on the zoo
@pytest.fixture(scope="module", params=ZOO_CASES, ids=[f"{n}-{m}" for n, m in ZOO_CASES])
def zoo_graph(request, zoo_case):
    """(name, mode, model, inputs, cached capture); tests copy the graph before changing it."""
    name, mode = request.param
    return (name, mode, *zoo_case(name, mode))


@pytest.mark.parametrize("pass_name", CLEANUPS)
def test_cleanup_passes_on_the_zoo(zoo_graph, pass_name, fresh_inputs) -> None:
    import copy

    name, mode, model, inputs, cached = zoo_graph
    gm = copy.deepcopy(cached)
    before = _kinds(gm)
    gm, record = _run_pass(pass_name, gm, inputs)

    # 1. the op kinds after the pass
    after = _kinds(gm)
    removed = before - after
    assert not (after - before), f"{pass_name} added ops: {after - before}"
    if pass_name in ("remove_dropout", "cleanup"):
        assert all(after[k] == 0 for k in EVAL_IDENTITIES), after
    if pass_name in ("remove_identity", "cleanup"):
        assert after["identity"] == 0
    if pass_name == "remove_dropout":
        assert removed == Counter({k: before[k] for k in EVAL_IDENTITIES if before[k]})
        assert record.stats["removed"] == sum(before[k] for k in EVAL_IDENTITIES)
    if pass_name == "remove_identity":
        assert removed == Counter({"identity": before["identity"]})
    if pass_name == "eliminate_noops":
        assert removed == Counter(record.stats["by_kind"])
    if pass_name in ("dce", "cleanup"):
        _assert_no_dead_code(gm)
        _assert_no_unused_weights(gm)
    # weighted and structural ops are never touched by cleanup
    for kind in (
        "conv",
        "conv_transpose",
        "linear",
        "batch_norm",
        "layer_norm",
        "attention",
        "cat",
        "add",
        "matmul",
        "scaled_dot_product",
    ):
        assert after[kind] == before[kind], kind
    if name == "shufflenet":  # the contiguous after the shuffle transpose is real work
        assert after["contiguous"] == before["contiguous"] > 0
    # modified exactly when something went (a node, or an unused tensor such as the
    # num_batches_tracked buffers that export graphs read and never use)
    changed = record.nodes[0] != record.nodes[1] or record.stats.get("tensors_dropped", 0) > 0
    assert record.modified is changed
    assert before == after or changed

    # 2. lint
    gm.graph.lint()

    # 3. outputs against the model, on the example inputs and on fresh ones
    with torch.no_grad():
        _close(model(*inputs), gm(*inputs))
        fresh = fresh_inputs(inputs)
        _close(model(*fresh), gm(*fresh))

    # 4. a second run finds nothing left to do
    code = gm.code
    gm, again = _run_pass(pass_name, gm, inputs)
    assert again.modified is False
    assert gm.code == code


@pytest.mark.parametrize("mode", MODES)
def test_zoo_models_without_dropout_are_left_alone(mode, zoo_case) -> None:
    _, inputs, gm = zoo_case("resnet", mode)
    code = gm.code
    for pass_name in ("remove_dropout", "remove_identity", "eliminate_noops"):
        gm, record = _run_pass(pass_name, gm, inputs)
        assert record.modified is False, pass_name
    assert gm.code == code


def test_cleanup_strips_every_dropout_of_the_transformer(zoo_case) -> None:
    for mode in MODES:
        _, inputs, gm = zoo_case("transformer", mode)
        before = _kinds(gm)
        assert before["dropout"] >= 7, mode  # embedding, 2 x (attn out, mlp, block out)
        gm, record = _run_pass("cleanup", gm, inputs)
        assert record.modified
        assert record.stats["removed"]["remove_dropout"] == before["dropout"]
        assert record.nodes[1] < record.nodes[0]


# --------------------------------------------------------------------------- dce
class DeadBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 4))
        self.register_buffer("scale", torch.full((4,), 2.0))

    def forward(self, x):
        dead = self.unused(x).relu()
        dead2 = F.linear(x, self.w) * self.scale
        dead3 = torch.cat([dead, dead2], 0).sum()  # noqa: F841
        return self.lin(x)


@pytest.mark.parametrize("mode", MODES)
def test_dce_removes_dead_nodes_and_the_weights_only_they_used(mode) -> None:
    model = DeadBranches().eval()
    x = torch.randn(3, 4)
    gm = fxopt.capture(model, (x,), mode=mode)
    assert _kinds(gm)["linear"] == 3
    gm, record = _run_pass("dce", gm, (x,))
    assert _kinds(gm) == Counter({"linear": 1})
    assert record.modified and record.stats["removed"] >= 6
    assert record.params[1] == record.params[0] - (16 + 4) - 16 - 4
    names = {k for k, _ in gm.named_parameters()} | {k for k, _ in gm.named_buffers()}
    assert names == {"lin.weight", "lin.bias"}
    assert not hasattr(gm, "unused")
    gm.graph.lint()
    _close(model(x), gm(x))
    assert not _run_pass("dce", gm, (x,))[1].modified


class SideEffects(nn.Module):
    """Results nobody reads that still matter: in-place updates and an opaque leaf module."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)
        self.log = Recorder()

    def forward(self, x):
        y = self.lin(x)
        y.add_(1)
        self.act(y)
        F.relu(y, inplace=True)
        self.log(y)
        return y * 2


class Recorder(nn.Module):
    def forward(self, x):
        return x.sum()


@pytest.mark.parametrize("mode", MODES)
def test_dce_keeps_in_place_ops_and_unknown_modules(mode) -> None:
    model = SideEffects().eval()
    x = torch.randn(3, 4)
    gm = fxopt.capture(model, (x,), mode=mode, leaf_modules=[Recorder])
    code = gm.code
    gm, record = _run_pass("dce", gm, (x,))  # verification would catch a wrong removal too
    if mode == "symbolic":
        assert record.modified is False
        assert gm.code == code
    _close(model(x), gm(x))


# --------------------------------------------------------------------------- remove_dropout
class Dropouts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.5)
        self.drop2d = nn.Dropout1d(0.2)
        self.alpha = nn.AlphaDropout(0.1)

    def forward(self, x):
        x = self.drop(self.lin(x))
        x = F.dropout(x, 0.3, training=self.training)
        x = F.dropout(x, p=0.4, training=False)
        x = torch.dropout(x, 0.1, False)
        x = self.alpha(self.drop2d(x.unsqueeze(0))).squeeze(0)
        return F.dropout(x, 0.0)  # p=0 is a no-op even when "training"


@pytest.mark.parametrize("mode", MODES)
def test_remove_dropout_removes_eval_dropout_in_every_form(mode) -> None:
    model = Dropouts().eval()
    x = torch.randn(3, 6)
    gm = fxopt.capture(model, (x,), mode=mode)
    n = _kinds(gm)["dropout"]
    assert n >= 5
    forms = {
        fxopt.ops.op_of(node).form
        for node in gm.graph.nodes
        if node.op.startswith("call") and kind_of(node) == "dropout"
    }
    assert forms == ({"module", "function"} if mode == "symbolic" else {"aten"})
    gm, record = _run_pass("remove_dropout", gm, (x,))
    assert _kinds(gm)["dropout"] == 0
    assert record.stats == {"removed": n}
    assert not any(k.startswith("drop") or k == "alpha" for k, _ in gm.named_children())
    gm.graph.lint()
    _close(model(x), gm(x))
    assert not _run_pass("remove_dropout", gm, (x,))[1].modified


class ActiveDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return F.dropout(self.drop(x), 0.5, training=True)


@pytest.mark.parametrize("mode", MODES)
def test_remove_dropout_keeps_an_active_dropout_and_says_so(mode) -> None:
    x = torch.randn(4, 4)
    gm = fxopt.capture(ActiveDropout(), (x,), mode=mode, check=False)
    res = _call("remove_dropout", gm, (x,))
    gm.graph.lint()
    active = [n for n in gm.graph.nodes if kind_of(n) == "dropout"]
    assert len(active) == 1
    assert res.modified is True and res.stats["removed"] == 1  # the eval-mode module went
    assert list(res.stats["kept"]) == [active[0].name]
    assert "training=True" in res.stats["kept"][active[0].name]
    again = _call("remove_dropout", gm, (x,))
    assert again.modified is False and list(again.stats["kept"]) == [active[0].name]


def test_remove_dropout_keeps_a_dropout_module_switched_to_training() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()
    x = torch.randn(2, 4)
    gm = fxopt.capture(model, (x,), mode="symbolic")
    gm.get_submodule("1").train()
    res = _call("remove_dropout", gm, (x,))
    assert res.modified is False
    assert _kinds(gm)["dropout"] == 1 and "kept" in res.stats


# --------------------------------------------------------------- stochastic depth / drop path
def _library_helpers():
    """Helpers with the qualified names of torchvision's and timm's, defined without
    importing either library: the op table matches them by name."""
    from fxopt.zoo import layers

    def stochastic_depth(input, p, mode, training=True):
        return layers.stochastic_depth(input, p, mode, training)

    def drop_path(x, drop_prob=0.0, training=False, scale_by_keep=True):
        return layers.drop_path(x, drop_prob, training, scale_by_keep)

    stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
    stochastic_depth.__qualname__ = "stochastic_depth"
    drop_path.__module__, drop_path.__qualname__ = "timm.layers.drop", "drop_path"
    return stochastic_depth, drop_path


def _leaf_calls(fns, train: bool) -> fx.GraphModule:
    """A graph calling ``fns`` as leaf call_function nodes, as symbolic_trace keeps them."""
    sd, dp = fns
    graph = fx.Graph()
    x = graph.placeholder("x")
    h = graph.call_function(torch.relu, (x,))
    h = graph.call_function(sd, (h, 0.2, "row", train))
    h = graph.call_function(operator.add, (h, x))
    h = graph.call_function(dp, (h, 0.1, train))
    h = graph.call_function(dp, (h,))  # timm's defaults: p=0, training=False
    graph.output(graph.call_function(operator.add, (h, x)))
    return fx.GraphModule(nn.Module(), graph)


def test_remove_dropout_removes_library_stochastic_depth_and_drop_path_by_name() -> None:
    gm = _leaf_calls(_library_helpers(), train=False)
    assert [kind_of(n) for n in gm.graph.nodes if n.op == "call_function"] == [
        "relu", "stochastic_depth", "add", "drop_path", "drop_path", "add"
    ]
    x = torch.randn(3, 5)
    want = gm(x)
    gm, record = _run_pass("remove_dropout", gm, (x,))
    assert record.stats == {"removed": 3}
    assert _kinds(gm) == Counter({"relu": 1, "add": 2})
    gm.graph.lint()
    _close(want, gm(x))
    assert not _run_pass("remove_dropout", gm, (x,))[1].modified


def test_remove_dropout_keeps_training_stochastic_depth_and_says_so() -> None:
    gm = _leaf_calls(_library_helpers(), train=True)
    res = _call("remove_dropout", gm, (torch.randn(3, 5),))
    gm.graph.lint()
    assert res.stats["removed"] == 1  # only the drop_path with timm's defaults (p=0)
    assert sorted(res.stats["kept"].values()) == [
        "drop_path is active (training=True): it is random",
        "stochastic_depth is active (training=True): it is random",
    ]
    assert _kinds(gm)["stochastic_depth"] == 1 and _kinds(gm)["drop_path"] == 1


@pytest.mark.parametrize("name", ["efficientnet", "convnext", "swin"])
def test_cleanup_removes_the_zoo_stochastic_depth_in_eval(name, zoo_case) -> None:
    model, inputs, gm = zoo_case(name, "symbolic")
    before = _kinds(gm)
    helpers = sum(before[k] for k in ("stochastic_depth", "drop_path"))
    assert helpers >= 2
    gm, record = _run_pass("cleanup", gm, inputs)
    assert record.stats["removed"]["remove_dropout"] == helpers + before["dropout"]
    assert not any(_kinds(gm)[k] for k in EVAL_IDENTITIES)
    with torch.no_grad():
        _close(model(*inputs), gm(*inputs))


def test_stochastic_depth_in_training_is_kept_by_cleanup() -> None:
    model = zoo.get("efficientnet").build().train()
    gm = fx.symbolic_trace(model)
    res = _call("cleanup", gm, zoo.get("efficientnet").example_inputs())
    assert _kinds(res.gm)["stochastic_depth"] == 2
    assert _kinds(res.gm)["dropout"] == 1


# --------------------------------------------------------------------------- remove_identity
class Identities(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Identity()
        self.lin = nn.Linear(4, 4)
        self.post = nn.Sequential(nn.Identity(), nn.ReLU(), nn.Identity())

    def forward(self, x):
        return self.post(self.lin(self.pre(x)))


@pytest.mark.parametrize("mode", MODES)
def test_remove_identity(mode) -> None:
    model = Identities().eval()
    x = torch.randn(2, 4)
    gm = fxopt.capture(model, (x,), mode=mode)
    before = _kinds(gm)
    gm, record = _run_pass("remove_identity", gm, (x,))
    after = _kinds(gm)
    assert after == Counter({"linear": 1, "relu": 1})
    if mode == "symbolic":  # torch.export drops nn.Identity by itself
        assert before["identity"] == 3
        assert record.modified and record.stats["removed"] == 3
        assert not hasattr(gm, "pre")
    else:
        assert before["identity"] == 0 and not record.modified
    gm.graph.lint()
    _close(model(x), gm(x))
    assert not _run_pass("remove_identity", gm, (x,))[1].modified


# --------------------------------------------------------------------------- eliminate_noops
class Noop(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.register_buffer("zeros", torch.zeros(2, 1, 4))

    def forward(self, x, ids):
        return self.fn(self, x.relu(), ids)


def _mutated_copy(s, y, ids):
    z = y * 1
    z.add_(1)
    return y, z


REMOVED = {
    "mul_1": (lambda s, y, ids: y * 1, "mul"),
    "mul_1.0": (lambda s, y, ids: y * 1.0, "mul"),
    "add_0": (lambda s, y, ids: y + 0, "add"),
    "sub_0": (lambda s, y, ids: y - 0, "sub"),
    "div_1": (lambda s, y, ids: y / 1, "div"),
    "torch.mul": (lambda s, y, ids: torch.mul(y, 1), "mul"),
    "add_0_alpha": (lambda s, y, ids: torch.add(y, 0, alpha=3), "add"),
    "contiguous": (lambda s, y, ids: y.contiguous(), "contiguous"),
    "to_float32": (lambda s, y, ids: y.to(torch.float32), "to"),
    "float": (lambda s, y, ids: y.float(), "to"),
    "to_cpu": (lambda s, y, ids: y.to("cpu"), "to"),
    "type": (lambda s, y, ids: y.type(torch.float32), "to"),
    "int_mul_1": (lambda s, y, ids: ids * 1, "mul"),
}
KEPT = {
    "int_mul_1.0": (lambda s, y, ids: ids * 1.0, "mul"),  # promotes int64 to float
    "bool_mul_1": (lambda s, y, ids: (y > 0) * 1, "mul"),  # promotes bool to int64
    "add_zeros_broadcast": (lambda s, y, ids: y + s.zeros, "add"),  # (3, 4) -> (2, 3, 4)
    "contiguous_after_transpose": (lambda s, y, ids: y.t().contiguous(), "contiguous"),
    "to_float16": (lambda s, y, ids: y.to(torch.float16), "to"),
    "half": (lambda s, y, ids: y.half(), "to"),
    "to_copy": (lambda s, y, ids: y.to(torch.float32, copy=True), "to"),
    "floor_div_1": (lambda s, y, ids: torch.div(y, 1, rounding_mode="floor"), "div"),
    "add_1": (lambda s, y, ids: y + 1, "add"),
    "mul_0": (lambda s, y, ids: y * 0, "mul"),
    "written_into": (_mutated_copy, "mul"),
}
SUB_FROM_ZERO = (lambda s, y, ids: 0 - y, "rsub")  # aten.rsub(y, 0) is -y, not y


def _noop_graph(fn, mode):
    model = Noop(fn).eval()
    inputs = (torch.randn(3, 4), torch.randint(0, 5, (3, 4)))
    return model, inputs, fxopt.capture(model, inputs, mode=mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(REMOVED))
def test_eliminate_noops_removes(case, mode) -> None:
    fn, kind = REMOVED[case]
    model, inputs, gm = _noop_graph(fn, mode)
    before = _kinds(gm)
    gm, record = _run_pass("eliminate_noops", gm, inputs)
    after = _kinds(gm)
    assert after[kind] == 0
    assert after["relu"] == 1
    if before[kind]:  # torch.export already drops some (contiguous on a contiguous tensor)
        assert record.modified and record.stats["by_kind"] == {kind: before[kind]}
    else:
        assert mode == "export" and not record.modified
    gm.graph.lint()
    for want, got in zip(model(*inputs), gm(*inputs), strict=True):
        assert torch.equal(want, got) and want.dtype == got.dtype
    assert not _run_pass("eliminate_noops", gm, inputs)[1].modified


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [*KEPT, "sub_from_zero"])
def test_eliminate_noops_keeps(case, mode) -> None:
    fn, kind = KEPT.get(case, SUB_FROM_ZERO)
    if case == "sub_from_zero" and mode == "symbolic":
        kind = "sub"
    model, inputs, gm = _noop_graph(fn, mode)
    before = _kinds(gm)
    assert before[kind] >= 1
    code = gm.code
    gm, record = _run_pass("eliminate_noops", gm, inputs)
    assert record.modified is False
    assert _kinds(gm) == before
    assert gm.code == code
    gm.graph.lint()
    for want, got in zip(model(*inputs), gm(*inputs), strict=True):
        assert torch.equal(want, got)


# --------------------------------------------------------------------------- cleanup
class Messy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.2)
        self.idt = nn.Identity()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.idt(self.drop(self.lin(x))) * 1
        self.unused(h + 0).float()  # dead code, kept alive by nothing once noops are gone
        h = F.dropout(h.contiguous(), 0.1, training=self.training) - 0
        return self.head(h.to(torch.float32))


@pytest.mark.parametrize("mode", MODES)
def test_cleanup_reaches_a_fixed_point(mode) -> None:
    model = Messy().eval()
    x = torch.randn(4, 8)
    gm = fxopt.capture(model, (x,), mode=mode)
    gm, record = _run_pass("cleanup", gm, (x,))
    kinds = _kinds(gm)
    # export checks the dtype after .to(); the check on the live value stays
    assert kinds["assert_metadata"] == (1 if mode == "export" else 0)
    assert kinds - Counter({"assert_metadata": 1}) == Counter({"linear": 2})
    assert record.modified
    removed = record.stats["removed"]
    assert removed["remove_dropout"] == 2 and removed["dce"] >= 1
    assert {k for k, _ in gm.named_parameters()} == {
        "lin.weight",
        "lin.bias",
        "head.weight",
        "head.bias",
    }
    gm.graph.lint()
    _close(model(x), gm(x))
    for pass_name in CLEANUPS:
        assert not _run_pass(pass_name, gm, (x,))[1].modified, pass_name


def test_cleanup_stops_after_max_rounds() -> None:
    model = Messy().eval()
    x = torch.randn(4, 8)
    gm = fxopt.capture(model, (x,), mode="symbolic")
    gm, record = _run_pass("cleanup", gm, (x,), max_rounds=0)
    assert record.modified is False
    assert _kinds(gm)["dropout"] == 2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["transformer", "gqa", "resnet"])
def test_flatten_modules_moves_nested_attributes_to_the_top(name, mode, zoo_case) -> None:
    model, inputs, gm = zoo_case(name, mode)
    nested = [n for n in gm.graph.nodes
              if n.op in ("call_module", "get_attr") and "." in str(n.target)]
    paths = {n.name: n.meta.get("fxopt_module_path") for n in nested}
    gm, record = _run_pass("flatten_modules", gm, inputs)
    assert record.modified == bool(nested)
    gm.graph.lint()
    for n in gm.graph.nodes:
        if n.op in ("call_module", "get_attr"):
            assert "." not in str(n.target)
        if n.name in paths:  # where the op came from is still known
            assert n.meta["fxopt_module_path"] == paths[n.name]
    assert all("." not in k for k, _ in gm.named_children())
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
    gm, again = _run_pass("flatten_modules", gm, inputs)
    assert again.modified is False
