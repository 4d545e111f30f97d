"""Capture: both front ends on the whole zoo, metadata, the user's model left alone, leaf
policies, concrete args, and the errors a user meets."""

from __future__ import annotations

import inspect
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

import fxopt
from fxopt import zoo
from fxopt.errors import CaptureError
from fxopt.verify import node_values

NAMES = zoo.names()
MODES = ("symbolic", "export", "auto")
CAPTURABLE = [
    (name, mode) for name in NAMES for mode in MODES if mode != "symbolic" or zoo.get(name).symbolic
]


def _expected_frontend(name: str, mode: str) -> str:
    if mode == "auto":
        return "symbolic" if zoo.get(name).symbolic else "export"
    return mode


def _run(module, inputs):
    with torch.no_grad():
        return module(*inputs)


def _close(want, got) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- the zoo
def test_every_mode_is_covered_and_only_dynamic_refuses_symbolic() -> None:
    refused = {name for name in NAMES if (name, "symbolic") not in CAPTURABLE}
    assert refused == {"dynamic"}
    assert len(CAPTURABLE) == 3 * len(NAMES) - 1


@pytest.fixture(scope="module", params=CAPTURABLE, ids=[f"{n}-{m}" for n, m in CAPTURABLE])
def captured(request, zoo_case):
    """(name, mode, model, inputs, gm) for one zoo model and mode; tests are grouped by it."""
    name, mode = request.param
    return (name, mode, *zoo_case(name, mode))


def test_outputs_match_model_on_example_fresh_and_bigger_batch(captured, fresh_inputs) -> None:
    name, mode, model, inputs, gm = captured
    spec = zoo.get(name)
    assert isinstance(gm, torch.fx.GraphModule)
    gm.graph.lint()
    _close(_run(model, inputs), _run(gm, inputs))
    fresh = fresh_inputs(inputs)
    assert not all(torch.equal(a, b) for a, b in zip(fresh, inputs, strict=True))
    _close(_run(model, fresh), _run(gm, fresh))
    info = gm.meta["fxopt"]["capture"]
    assert info["dynamic_batch"] is spec.dynamic_batch
    if spec.dynamic_batch:
        bigger = fresh_inputs(inputs, batch=spec.batch + 1)
        out = _run(gm, bigger)
        assert out.shape[0] == spec.batch + 1
        _close(_run(model, bigger), out)
        assert all(s["shape"][0] is None for s in gm.meta["fxopt"]["inputs"])


def test_capture_info_says_which_front_end_and_why(captured) -> None:
    name, mode, _, inputs, gm = captured
    meta = gm.meta["fxopt"]
    info = meta["capture"]
    assert info["mode"] == mode
    assert info["frontend"] == _expected_frontend(name, mode)
    assert meta["pipeline"] == []
    assert [s["dtype"] for s in meta["inputs"]] == [
        str(x.dtype).replace("torch.", "") for x in inputs
    ]
    assert [s["shape"][1:] for s in meta["inputs"]] == [list(x.shape[1:]) for x in inputs]
    if mode == "auto" and info["frontend"] == "export":
        assert info["reason"].startswith("symbolic_trace failed")
        assert "TraceError" in info["symbolic_error"]
    else:
        assert info["symbolic_error"] is None


def _shape(value) -> tuple | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def test_every_node_carries_its_real_shape_and_dtype(captured) -> None:
    _, _, _, inputs, gm = captured
    values = node_values(gm, inputs)
    checked = 0
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        assert "shape" in node.meta and "dtype" in node.meta, node.name
        value = values[node.name]
        if isinstance(value, torch.Tensor):
            assert node.meta["shape"] == tuple(value.shape), node.name
            assert node.meta["dtype"] == value.dtype, node.name
            checked += 1
        elif isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
            # multi-output nodes (split, MHA's (out, weights)) get one entry per output
            assert node.meta["shape"] == [_shape(v) for v in value], node.name
            assert node.meta["dtype"] == [getattr(v, "dtype", None) for v in value], node.name
        elif node.op in ("call_module", "placeholder"):
            pytest.fail(f"{node.name} ({node.op}) produced {type(value).__name__}")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [n.meta["shape"] for n in placeholders] == [tuple(x.shape) for x in inputs]
    assert checked >= 5


def test_module_paths_name_real_submodules(captured) -> None:
    _, _, model, _, gm = captured
    submodules = dict(model.named_modules())
    weighted = 0
    for node in gm.graph.nodes:
        path = node.meta["fxopt_module_path"]
        if node.op == "call_module":
            assert path == node.target
        if path:
            assert path in submodules, f"{node.name}: {path!r} is not a submodule of the model"
        view = fxopt.ops.op_of(node) if node.op.startswith("call") else None
        if view is not None and view.kind in ("conv", "linear", "batch_norm", "layer_norm"):
            assert path, f"{node.name} ({view.kind}) lost its module path"
            weighted += 1
    assert weighted > 0


def test_inlined_code_keeps_the_path_of_its_custom_submodule(zoo_case) -> None:
    # the squeeze-excite multiply is plain code inside blocks.0.se in both front ends
    for mode in ("symbolic", "export"):
        _, _, gm = zoo_case("mobilenet", mode)
        muls = [n for n in gm.graph.nodes if fxopt.ops.kind_of(n) == "mul" and n.op != "get_attr"]
        assert "blocks.0.se" in {n.meta["fxopt_module_path"] for n in muls}, mode


def test_symbolic_refuses_the_dynamic_model_with_location_and_advice() -> None:
    model, inputs = zoo.load("dynamic")
    with pytest.raises(CaptureError) as info:
        fxopt.capture(model, inputs, mode="symbolic")
    message = str(info.value)
    line = _source_line(zoo.DynamicNet.forward, "if x.shape[-1] > 16:")
    assert f"{inspect.getsourcefile(zoo.DynamicNet)}:{line}" in message  # fxopt/zoo/cnn.py
    assert "mode='export'" in message
    assert "leaf_modules" in message and "concrete_args" in message


def test_auto_falls_back_to_export_for_the_dynamic_model_and_records_why() -> None:
    model, inputs = zoo.load("dynamic")
    gm = fxopt.capture(model, inputs, mode="auto")
    info = gm.meta["fxopt"]["capture"]
    assert info["frontend"] == "export"
    assert info["mode"] == "auto"
    assert "symbolic_trace failed" in info["reason"]
    assert "control flow" in info["reason"]
    assert inspect.getsourcefile(zoo.DynamicNet) in info["symbolic_error"]  # fxopt/zoo/cnn.py
    # the branch is on the width, so another batch size still works
    assert info["dynamic_batch"] is True
    bigger = torch.randn(3, *inputs[0].shape[1:])
    _close(_run(model, (bigger,)), _run(gm, (bigger,)))


# --------------------------------------------------------------------------- the user's model
def _snapshot(model: nn.Module) -> dict:
    return {
        "params": {k: (v, v.detach().clone()) for k, v in model.named_parameters()},
        "buffers": {k: (v, v.detach().clone()) for k, v in model.named_buffers()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": {k: dict(m._forward_hooks) for k, m in model.named_modules()},
        "pre_hooks": {k: dict(m._forward_pre_hooks) for k, m in model.named_modules()},
        "modules": {k: m for k, m in model.named_modules()},
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["params"].keys() == before["params"].keys()
    for key, (obj, value) in before["params"].items():
        assert after["params"][key][0] is obj, key
        assert torch.equal(obj, value), key
    assert after["buffers"].keys() == before["buffers"].keys()
    for key, (obj, value) in before["buffers"].items():
        assert after["buffers"][key][0] is obj, key
        assert torch.equal(obj, value), key
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["pre_hooks"] == before["pre_hooks"]
    assert after["modules"].keys() == before["modules"].keys()
    assert all(after["modules"][k] is m for k, m in before["modules"].items())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["mlp", "resnet", "dynamic"])
def test_the_users_model_in_train_mode_with_hooks_is_left_alone(name, mode) -> None:
    if mode == "symbolic" and not zoo.get(name).symbolic:
        pytest.skip("symbolic cannot capture this model")
    model, inputs = zoo.load(name)
    model.train()
    calls: list[str] = []
    model.register_forward_hook(lambda m, i, o: calls.append("root"))
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    first.register_forward_pre_hook(lambda m, i: calls.append("pre"))
    before = _snapshot(model)

    gm = fxopt.capture(model, inputs, mode=mode)

    _assert_unchanged(model, before)
    assert model.training and all(m.training for m in model.modules())
    # the graph is an inference graph even though the model was training
    assert not gm.training
    calls.clear()
    model.eval()
    with torch.no_grad():
        want = model(*inputs)
    assert calls == ["pre", "root"]  # each hook still there, exactly once
    _close(want, _run(gm, inputs))


def test_batch_norm_statistics_of_a_training_model_are_not_updated() -> None:
    model, inputs = zoo.load("resnet")
    model.train()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    mean, tracked = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    fxopt.capture(model, inputs, mode="auto")
    assert torch.equal(bn.running_mean, mean)
    assert torch.equal(bn.num_batches_tracked, tracked)


# --------------------------------------------------------------------------- leaf modules
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x)) * 2


class WithBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.other = Block()
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.other(self.block(x))))


def _call_modules(gm) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module"]


def test_without_a_policy_custom_blocks_are_traced_through() -> None:
    gm = fxopt.capture(WithBlocks(), (torch.randn(4, 8),), mode="symbolic")
    assert _call_modules(gm) == ["block.lin", "other.lin", "norm", "head"]


@pytest.mark.parametrize(
    ("policy", "leaves"),
    [
        ([Block], ["block", "other"]),
        (Block, ["block", "other"]),
        (["block"], ["block", "other.lin"]),
        (("Block",), ["block", "other"]),
        ((c for c in [Block]), ["block", "other"]),
        (lambda m, qualname: qualname == "other", ["block.lin", "other"]),
    ],
    ids=["classes", "lone-class", "qualified-name", "class-name", "generator", "callable"],
)
def test_leaf_policy_keeps_the_named_submodules_as_call_module(policy, leaves) -> None:
    model = WithBlocks().eval()
    x = torch.randn(4, 8)
    gm = fxopt.capture(model, (x,), mode="symbolic", leaf_modules=policy)
    # the named blocks stay whole, and torch.nn's own leaves stay leaves too
    assert _call_modules(gm) == [*leaves, "norm", "head"]
    for target in leaves:
        view = fxopt.ops.op_of(next(n for n in gm.graph.nodes if n.target == target))
        assert view.form == "module"
        assert view.kind == ("linear" if target.endswith("lin") else "opaque")
    _close(_run(model, (x,)), _run(gm, (x,)))


class Flagged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, double: bool = False) -> torch.Tensor:
        x = self.lin(x)
        if double:
            x = x * 2
        return x


@pytest.mark.parametrize("flag", [True, False])
def test_concrete_args_bake_a_python_flag(flag) -> None:
    model = Flagged().eval()
    x = torch.randn(3, 6)
    with pytest.raises(CaptureError, match="concrete_args"):
        fxopt.capture(model, (x, flag), mode="symbolic")
    gm = fxopt.capture(model, (x, flag), mode="symbolic", concrete_args={"double": flag})
    kinds = fxopt.ops.count_kinds(gm)
    assert kinds["mul"] == (1 if flag else 0)
    _close(_run(model, (x, flag)), gm(x, flag))
    auto = fxopt.capture(model, (x, flag), mode="auto", concrete_args={"double": flag})
    assert auto.meta["fxopt"]["capture"]["frontend"] == "symbolic"


# --------------------------------------------------------------------------- errors
class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lin(x)
        if x.sum() > 0:
            return x * 2
        return x - 1


def _source_line(fn, text: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


def test_a_model_neither_front_end_captures_names_the_line_and_the_ways_out() -> None:
    line = _source_line(DataDependent.forward, "if x.sum() > 0:")
    with pytest.raises(CaptureError) as info:
        fxopt.capture(DataDependent(), (torch.randn(2, 4),), mode="auto")
    message = str(info.value)
    here = os.path.basename(__file__)
    assert f"{here}:{line}" in message
    assert "symbolic_trace" in message and "torch.export" in message
    assert "leaf_modules" in message and "concrete_args" in message
    assert "torch.cond" in message
    assert not isinstance(info.value, AssertionError)


@pytest.mark.parametrize(("mode", "other"), [("symbolic", "export"), ("export", "symbolic")])
def test_one_front_end_failing_points_at_the_line_and_the_other_mode(mode, other) -> None:
    line = _source_line(DataDependent.forward, "if x.sum() > 0:")
    with pytest.raises(CaptureError) as info:
        fxopt.capture(DataDependent(), (torch.randn(2, 4),), mode=mode)
    message = str(info.value)
    assert f"{os.path.basename(__file__)}:{line}" in message
    assert f"mode='{other}'" in message


def test_wrong_input_shape_names_the_shape_and_the_failing_line() -> None:
    model = DataDependent()
    with pytest.raises(CaptureError) as info:
        fxopt.capture(model, (torch.randn(2, 5),))
    message = str(info.value)
    assert "float32[2, 5]" in message
    assert "input shape" in message
    line = _source_line(DataDependent.forward, "x = self.lin(x)")
    assert f"{os.path.basename(__file__)}:{line}" in message


@pytest.mark.parametrize(
    "thing", [lambda x: x * 2, torch.relu, "resnet", None], ids=["lambda", "builtin", "str", "none"]
)
def test_a_non_module_is_refused(thing) -> None:
    with pytest.raises(CaptureError, match="nn.Module"):
        fxopt.capture(thing, (torch.randn(2, 4),))


def test_bad_mode_and_bad_inputs_are_capture_errors() -> None:
    model = nn.Linear(4, 4)
    with pytest.raises(CaptureError, match="symbolic"):
        fxopt.capture(model, (torch.randn(2, 4),), mode="trace")
    with pytest.raises(CaptureError, match="example_inputs"):
        fxopt.capture(model, {"x": torch.randn(2, 4)})
    # a lone tensor is accepted as a one-tuple
    gm = fxopt.capture(model, torch.randn(2, 4))
    assert [n.op for n in gm.graph.nodes].count("placeholder") == 1


class BatchFrozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.reshape(2, 12))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_batch_specific_model_is_captured_without_claiming_a_dynamic_batch(mode) -> None:
    gm = fxopt.capture(BatchFrozen(), (torch.randn(2, 3, 4),), mode=mode)
    assert gm.meta["fxopt"]["capture"]["dynamic_batch"] is False
    assert gm.meta["fxopt"]["inputs"][0]["shape"] == [2, 3, 4]


def test_dynamic_batch_false_records_a_fixed_shape() -> None:
    model, inputs = zoo.load("mlp")
    gm = fxopt.capture(model, inputs, mode="export", dynamic_batch=False)
    assert gm.meta["fxopt"]["capture"]["dynamic_batch"] is False
    assert gm.meta["fxopt"]["inputs"][0]["shape"] == list(inputs[0].shape)


class SeqMean(nn.Module):
    """Mean over a sequence, then a linear: works at any sequence length."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.reshape(x.shape[0], x.shape[1], 4).mean(1))


def test_export_keeps_named_dimensions_symbolic() -> None:
    model = SeqMean()
    x, longer = torch.randn(2, 5, 4), torch.randn(3, 9, 4)
    fixed = fxopt.capture(model, (x,), mode="export")
    with pytest.raises(Exception):  # noqa: B017 - torch's own shape error
        fixed(longer)
    for dims in ({0: [1]}, {0: [-2]}):
        gm = fxopt.capture(model, (x,), mode="export", dynamic_dims=dims)
        torch.testing.assert_close(gm(longer), model(longer))


class Noisy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, 0.5, training=True)


def test_a_graph_that_does_not_reproduce_the_model_is_refused() -> None:
    with pytest.raises(CaptureError, match="does not reproduce"):
        fxopt.capture(Noisy(), (torch.randn(8, 8),), mode="symbolic")
    gm = fxopt.capture(Noisy(), (torch.randn(8, 8),), mode="symbolic", check=False)
    assert fxopt.ops.count_kinds(gm)["dropout"] == 1


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> dict:
        y = self.lin(x)
        return {"logits": y, "probs": y.softmax(-1)}


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_nested_outputs_keep_their_structure(mode) -> None:
    model = DictOut().eval()
    x = torch.randn(2, 4)
    gm = fxopt.capture(model, (x,), mode=mode)
    out = _run(gm, (x,))
    assert isinstance(out, dict) and set(out) == {"logits", "probs"}
    want = _run(model, (x,))
    for got_leaf, want_leaf in zip(pytree.tree_leaves(out), pytree.tree_leaves(want), strict=True):
        _close(want_leaf, got_leaf)
