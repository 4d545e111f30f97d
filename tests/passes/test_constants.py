"""fold_constants and cse, on the zoo and on small models, in both capture modes. Each pass
gets the four checks: the op kinds after it, graph.lint(), outputs against the original
within the EXACT tolerance, and cases it must leave alone (``modified is False``): random
ops, in-place ops and the values they write into, and graphs with nothing to do."""

from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import PassManager, zoo
from fxopt.ops import count_kinds, is_inplace, is_pure, kind_of, op_of
from fxopt.passes.base import REGISTRY, PassContext
from fxopt.verify import EXACT, compare_outputs

MODES = ("symbolic", "export")
ZOO_CASES = [(n, m) for n in zoo.names() for m in MODES if m == "export" or zoo.get(n).symbolic]


# --------------------------------------------------------------------------- helpers
def _run_pass(name: str, gm: fx.GraphModule, inputs: tuple, **params):
    """Through the PassManager (lint, annotate, verify under EXACT); returns (gm, record)."""
    res = PassManager([fxopt.Pass(name, **params)]).run(gm, inputs)
    (record,) = res.report
    return res.module, record


def _call(name: str, gm: fx.GraphModule, inputs: tuple, **params):
    """The bare pass, for graphs whose outputs are random (the manager could not verify)."""
    return REGISTRY[name].fn(gm, PassContext(tuple(inputs)), **params)


def _assert_close(want, got) -> None:
    report = compare_outputs(want, got, EXACT)
    assert report.ok(), f"max abs {report.max_abs:.3g}, relative {report.rel:.3g}"


def _check_outputs(model: nn.Module, gm: fx.GraphModule, inputs: tuple, calls: int = 2) -> None:
    """Against the model on the example inputs and fresh ones, ``calls`` times each: a stored
    buffer that some op writes into would drift from call to call."""
    fresh = tuple(
        torch.randn_like(x) if x.is_floating_point() else torch.randint_like(x, int(x.max()) + 1)
        for x in inputs
    )
    with torch.no_grad():
        for _ in range(calls):
            _assert_close(model(*inputs), gm(*inputs))
            _assert_close(model(*fresh), gm(*fresh))


def _constant_ops(gm: fx.GraphModule) -> list[str]:
    """Deterministic call nodes that read no placeholder, directly or indirectly: what
    fold_constants should have computed away."""
    live: set[fx.Node] = set()
    out = []
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in live for a in node.all_input_nodes):
            live.add(node)
        elif node.op.startswith("call") and is_pure(node):
            value = node.meta.get("shape")
            if value is not None:  # tensor-valued (sizes and dtypes are Python values)
                out.append(node.name)
    return out


def _folded_buffers(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "get_attr" and "_folded_" in n.target]


def _pure_duplicates(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """Pairs of deterministic nodes with the same op, target and arguments."""
    seen: dict = {}
    dups = []
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (node.op.startswith("call") and is_pure(node)):
            key = (node.op, str(node.target), str(node.args), str(node.kwargs))
            if key in seen:
                dups.append((seen[key], node.name))
            seen.setdefault(key, node.name)
    return dups


# --------------------------------------------------------------------------- the zoo
@pytest.fixture(scope="module", params=ZOO_CASES, ids=[f"{n}-{m}" for n, m in ZOO_CASES])
def zoo_graph(request, zoo_case):
    name, mode = request.param
    return (name, mode, *zoo_case(name, mode))


@pytest.mark.parametrize("pass_name", ["fold_constants", "cse"])
def test_constants_and_cse_on_the_zoo(zoo_graph, pass_name) -> None:
    name, mode, model, inputs, cached = zoo_graph
    gm = copy.deepcopy(cached)
    before = count_kinds(gm)
    dups = _pure_duplicates(gm)
    gm, record = _run_pass(pass_name, gm, inputs)
    after = count_kinds(gm)

    # 1. op kinds: only ever fewer ops; exactly where the zoo has work for the pass
    assert not (after - before), after - before
    if pass_name == "fold_constants":
        # the transformer's positional table sliced to the (static) export sequence length;
        # Swin's relative position bias of each block (table gathered by a constant index)
        # and its shifted-window mask, all constant in eval
        expected = {("transformer", "export"): 1, ("swin", "export"): 3}.get((name, mode), 0)
        assert record.stats["folded"] == expected
        assert _constant_ops(gm) == []
        if name == "transformer" and expected:
            assert len(_folded_buffers(gm)) == expected
            assert before - after == Counter({"getitem": 1})
            assert not hasattr(gm, "pos")  # the full table is no longer needed
        if name == "swin" and expected:
            assert record.stats["nodes"] == ["unsqueeze", "unsqueeze_1", "unsqueeze_3"]
            assert after["reshape"] < before["reshape"]
    else:
        # symbolic_trace repeats x.shape[0] in the GQA model; export has no repeats
        assert (len(dups) > 0) is ((name, mode) == ("gqa", "symbolic"))
        assert record.stats["merged"] == record.nodes[0] - record.nodes[1] >= len(dups)
        assert _pure_duplicates(gm) == []
    work = record.stats["folded"] if pass_name == "fold_constants" else record.stats["merged"]
    assert record.modified is (work > 0)
    # 2. lint; 3. outputs
    gm.graph.lint()
    _check_outputs(model, gm, inputs, calls=1)
    # 4. nothing left to do
    code = gm.code
    gm, again = _run_pass(pass_name, gm, inputs)
    assert again.modified is False and gm.code == code


@pytest.mark.parametrize("mode", MODES)
def test_the_mlp_has_no_constants_and_no_duplicates(mode, zoo_case) -> None:
    _, inputs, gm = zoo_case("mlp", mode)
    code = gm.code
    for pass_name in ("fold_constants", "cse"):
        gm, record = _run_pass(pass_name, gm, inputs)
        assert record.modified is False, pass_name
    assert gm.code == code


# --------------------------------------------------------------------------- fold_constants
class WeightNormLinear(nn.Module):
    """A weight-normalised linear: weight = v * g / ||v|| per output row."""

    def __init__(self) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.randn(6, 5))
        self.g = nn.Parameter(torch.rand(6, 1) + 0.5)
        self.b = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return F.linear(x, self.v * (self.g / self.v.norm(dim=1, keepdim=True)), self.b)


class ScaledConv(nn.Module):
    """``weight * scale`` re-parametrisation of a conv (per output channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.scale = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        return F.conv2d(x, self.w * self.scale.view(-1, 1, 1, 1), padding=1)


class ConstantChain(nn.Module):
    """A chain of constant ops ending in a weight: transpose, scale, shift, activation, copy."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 6))
        self.b = nn.Parameter(torch.randn(6))

    def forward(self, x):
        w = (self.w.t() * 2.0 + 1.0).relu().contiguous()
        return F.linear(x, w, torch.tanh(self.b) - self.b.mean())


class CausalAttention(nn.Module):
    """Single-head attention with a causal mask built from constants; the sequence length
    comes from a positional table so that symbolic_trace records the mask computation too."""

    def __init__(self, mask: str) -> None:
        super().__init__()
        self.mask = mask
        self.pos = nn.Parameter(torch.randn(6, 8) * 0.1)
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        n = self.pos.size(0)
        q, k, v = self.qkv(x + self.pos).chunk(3, dim=-1)
        if self.mask == "triu":
            future = torch.triu(torch.ones((n, n)), 1).bool()  # a tuple: n is a Proxy
        else:
            future = torch.arange(n)[None] > torch.arange(n)[:, None]
        if self.mask == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=~future)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(8)
        return scores.masked_fill(future, float("-inf")).softmax(-1) @ v


# name -> (model factory, input shape, folded buffers after fold_constants + dce,
#          parameters only the constant subgraph read)
# fmt: off
FOLDABLE: dict[str, tuple] = {
    "weight_norm_linear": (WeightNormLinear, (3, 5), 1, {"v", "g"}),
    "weight_times_scale": (ScaledConv, (2, 3, 6, 6), 1, {"w", "scale"}),
    "constant_chain": (ConstantChain, (3, 5), 2, {"w", "b"}),
    "causal_mask_triu": (lambda: CausalAttention("triu"), (2, 6, 8), 1, set()),
    "causal_mask_arange": (lambda: CausalAttention("arange"), (2, 6, 8), 1, set()),
    "causal_mask_sdpa": (lambda: CausalAttention("sdpa"), (2, 6, 8), 1, set()),
}
# fmt: on


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(FOLDABLE))
def test_fold_constants_replaces_a_constant_subgraph_by_one_buffer(case, mode) -> None:
    factory, shape, buffers, only_constant = FOLDABLE[case]
    model = factory().eval()
    inputs = (torch.randn(shape),)
    gm = fxopt.capture(model, inputs, mode=mode)
    before = count_kinds(gm)
    constant = _constant_ops(gm)
    assert constant  # there is something to fold

    gm, record = _run_pass("fold_constants", gm, inputs)

    # 1. op kinds: every constant op is gone, nothing was added
    after = count_kinds(gm)
    assert not (after - before)
    assert _constant_ops(gm) == []
    assert record.modified and record.stats["folded"] >= buffers
    # the consumers now read buffers; export's metadata checks on a folded value are left
    # to cleanup, after which each constant subgraph is exactly one buffer
    leftovers = {
        kind_of(n)
        for n in gm.graph.nodes
        if n.op.startswith("call")
        and all(a.op == "get_attr" for a in n.all_input_nodes)
        and n.all_input_nodes
    }
    assert leftovers <= {"assert_metadata"}
    gm, _ = _run_pass("dce", gm, inputs)
    assert len(_folded_buffers(gm)) == buffers
    # the parameters only the constant subgraph read are gone; the others stay
    names = {k for k, _ in gm.named_parameters()}
    assert names == {k for k, _ in model.named_parameters()} - only_constant
    # 2. lint; 3. outputs
    gm.graph.lint()
    _check_outputs(model, gm, inputs)
    # 4. nothing left to do
    assert _run_pass("fold_constants", gm, inputs)[1].modified is False


def test_fold_constants_respects_max_bytes() -> None:
    model, inputs = WeightNormLinear().eval(), (torch.randn(3, 5),)
    nbytes = 6 * 5 * 4  # the folded weight
    for mode in MODES:
        gm = fxopt.capture(model, inputs, mode=mode)
        code = gm.code
        small, record = _run_pass("fold_constants", copy.deepcopy(gm), inputs, max_bytes=nbytes - 1)
        assert record.modified is False and small.code == code
        assert _constant_ops(small)
        folded, record = _run_pass("fold_constants", gm, inputs, max_bytes=nbytes)
        assert record.modified and _constant_ops(folded) == []
        (name,) = _folded_buffers(folded)
        buf = folded.get_buffer(name)
        assert buf.numel() * buf.element_size() == nbytes
        _check_outputs(model, folded, inputs)


def test_fold_constants_keeps_the_original_parameters_of_the_users_model() -> None:
    model, inputs = ScaledConv().eval(), (torch.randn(2, 3, 6, 6),)
    w = model.w.detach().clone()
    for mode in MODES:
        res = fxopt.optimize(model, inputs, "fold_constants", mode=mode)
        assert _folded_buffers(res.module)
        assert torch.equal(model.w, w) and isinstance(model.w, nn.Parameter)


class Random(nn.Module):
    """Weights perturbed by random ops, which must run on every call."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.w = nn.Parameter(torch.randn(4, 5))
        self.keep = nn.Parameter(torch.full((4, 5), 0.5), requires_grad=False)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        w = self.w
        if self.how == "randn":
            w = w + torch.randn(w.shape) * 0.1
        elif self.how == "rand_like":
            w = w * (torch.rand_like(w) > 0.5)
        elif self.how == "bernoulli":
            w = w * torch.bernoulli(self.keep)
        elif self.how == "dropout_f":
            w = F.dropout(w, 0.5, training=True)
        elif self.how == "dropout_module":
            w = self.drop(w)
        return F.linear(x, w)


RANDOM = ["randn", "rand_like", "bernoulli", "dropout_f", "dropout_module"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", RANDOM)
def test_fold_constants_never_folds_random_ops(how, mode) -> None:
    model = Random(how).eval()
    inputs = (torch.randn(3, 5),)
    gm = fxopt.capture(model, inputs, mode=mode, check=False)
    if how == "dropout_module":
        if mode == "export":
            pytest.skip("torch.export bakes the eval-mode dropout away")
        gm.get_submodule("drop").train()
    code, kinds = gm.code, count_kinds(gm)
    res = _call("fold_constants", gm, inputs)
    assert res.modified is False
    assert gm.code == code and count_kinds(gm) == kinds
    gm.graph.lint()
    with torch.no_grad():  # still random: two calls differ
        assert not torch.equal(gm(*inputs), gm(*inputs))


class InPlace(nn.Module):
    """Constant-looking values that an in-place op writes into."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.w = nn.Parameter(torch.randn(4, 5))

    def forward(self, x):
        if self.how == "add_":
            w = self.w * 2
            w.add_(1)
        elif self.how == "relu_inplace":
            w = F.relu(self.w * 2, inplace=True)
        elif self.how == "read_after_write":
            a = self.w * 2
            b = a + 1
            a.add_(5)
            w = b + a
        elif self.how == "write_through_view":
            a = self.w * 2
            a.view(-1).mul_(3)
            w = a + 1
        elif self.how == "write_through_index":  # export: select + add_ + copy_
            w = self.w * 1.5
            w[:, 0] += 1
        return F.linear(x, w)


IN_PLACE = ["add_", "relu_inplace", "read_after_write", "write_through_view", "write_through_index"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", IN_PLACE)
def test_fold_constants_leaves_values_written_in_place_alone(how, mode) -> None:
    if how == "write_through_index" and mode == "symbolic":
        pytest.skip("symbolic_trace cannot record item assignment")
    model = InPlace(how).eval()
    inputs = (torch.randn(3, 5),)
    gm = fxopt.capture(model, inputs, mode=mode)
    inplace = [n.name for n in gm.graph.nodes if is_inplace(n)]
    code = gm.code
    gm, record = _run_pass("fold_constants", gm, inputs)
    if inplace:  # torch.export functionalizes some of them away
        assert record.modified is False and gm.code == code
        assert [n.name for n in gm.graph.nodes if is_inplace(n)] == inplace
    gm.graph.lint()
    _check_outputs(model, gm, inputs, calls=3)


@pytest.mark.parametrize("mode", MODES)
def test_fold_constants_leaves_a_graph_without_constants_alone(mode, zoo_case) -> None:
    model, inputs, gm = zoo_case("resnet", mode)
    code = gm.code
    gm, record = _run_pass("fold_constants", gm, inputs)
    assert record.modified is False and record.stats["folded"] == 0
    assert gm.code == code


# --------------------------------------------------------------------------- cse
class Duplicates(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4))
        self.register_buffer("buf", torch.rand(4) + 0.5)

    def forward(self, x):
        if self.how == "expression":
            a = x.relu() + 1
            b = x.relu() + 1
            return a * b
        if self.how == "module_twice":
            return self.lin(x) * torch.sigmoid(self.lin(x))
        if self.how == "attributes":
            return (x + self.buf) * self.buf - self.w * (x * self.w)
        raise AssertionError(self.how)


# name -> (op kinds after cse, nodes merged in symbolic mode)
DUPLICATES = {
    "expression": (Counter({"relu": 1, "add": 1, "mul": 1}), 2),
    "module_twice": (Counter({"linear": 1, "sigmoid": 1, "mul": 1}), 1),
    "attributes": (Counter({"add": 1, "mul": 3, "sub": 1}), None),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(DUPLICATES))
def test_cse_merges_duplicated_pure_subexpressions(case, mode) -> None:
    model = Duplicates(case).eval()
    inputs = (torch.randn(3, 4),)
    gm = fxopt.capture(model, inputs, mode=mode)
    dups = _pure_duplicates(gm)
    gm, record = _run_pass("cse", gm, inputs)
    kinds, merged = DUPLICATES[case]
    assert count_kinds(gm) == kinds
    assert _pure_duplicates(gm) == []
    # merging two nodes can make their users duplicates in turn
    assert record.stats["merged"] == record.nodes[0] - record.nodes[1] >= len(dups)
    if merged is not None:
        assert record.modified and record.stats["merged"] == merged
    gm.graph.lint()
    _check_outputs(model, gm, inputs)
    assert _run_pass("cse", gm, inputs)[1].modified is False


@pytest.mark.parametrize("mode", MODES)
def test_cse_merges_get_attrs_of_one_tensor(mode) -> None:
    model = Duplicates("attributes").eval()
    inputs = (torch.randn(3, 4),)
    gm = fxopt.capture(model, inputs, mode=mode)
    # give every reader of each tensor its own get_attr, as hand-built graphs often do
    for node in [n for n in gm.graph.nodes if n.op == "get_attr"]:
        for user in list(node.users)[1:]:
            with gm.graph.inserting_before(user):
                copy_ = gm.graph.get_attr(node.target)
            user.replace_input_with(node, copy_)
    gm.recompile()
    attrs = Counter(n.target for n in gm.graph.nodes if n.op == "get_attr")
    assert max(attrs.values()) >= 2
    gm, record = _run_pass("cse", gm, inputs)
    assert record.stats["merged"] == sum(attrs.values()) - len(attrs)
    assert Counter(n.target for n in gm.graph.nodes if n.op == "get_attr") == Counter(set(attrs))
    gm.graph.lint()
    _check_outputs(model, gm, inputs)


class Impure(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        if self.how == "rand_like":
            return torch.rand_like(x) - torch.rand_like(x)
        if self.how == "dropout_f":
            return F.dropout(x, 0.5, training=True) - F.dropout(x, 0.5, training=True)
        if self.how == "dropout_module":
            return self.drop(x) - self.drop(x)
        if self.how == "add_twice":
            y = x * 2
            y.add_(1)
            y.add_(1)
            return y
        if self.how == "read_around_a_write":
            y = x.relu()
            a = y * 2
            y.add_(1)
            return a - y * 2
        if self.how == "read_result_around_a_write":
            y = x.relu()
            b = y.add_(1)
            c = b * 2
            y.mul_(3)
            return c - b * 2
        if self.how == "copy_then_write":
            a = x * 2
            b = x * 2
            b.mul_(3)
            return a + b
        raise AssertionError(self.how)


RANDOM_CSE = ["rand_like", "dropout_f", "dropout_module"]
IN_PLACE_CSE = ["add_twice", "read_around_a_write", "read_result_around_a_write", "copy_then_write"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", RANDOM_CSE + IN_PLACE_CSE)
def test_cse_keeps_random_and_in_place_ops(how, mode) -> None:
    model = Impure(how).eval()
    inputs = (torch.randn(3, 4),)
    random = how in RANDOM_CSE
    gm = fxopt.capture(model, inputs, mode=mode, check=not random)
    if how == "dropout_module":
        if mode == "export":
            pytest.skip("torch.export bakes the eval-mode dropout away")
        gm.get_submodule("drop").train()
    code, kinds = gm.code, count_kinds(gm)
    if random:
        res = _call("cse", gm, inputs)
        assert res.modified is False
        with torch.no_grad():
            out = gm(torch.ones(3, 4))
        assert out.abs().max() > 0  # two different draws (one merged draw would give 0)
    else:
        gm, res = _run_pass("cse", gm, inputs)
        _check_outputs(model, gm, inputs)
        assert res.modified is False
    assert gm.code == code and count_kinds(gm) == kinds
    gm.graph.lint()


def test_cse_and_fold_constants_classify_ops_through_the_op_table_and_aten() -> None:
    gm = fx.symbolic_trace(Duplicates("expression"))
    kinds = {n.name: is_pure(n) for n in gm.graph.nodes}
    assert kinds == {
        "x": False,
        "relu": True,
        "add": True,
        "relu_1": True,
        "add_1": True,
        "mul": True,
        "output": False,
    }
    mask = fx.symbolic_trace(CausalAttention("arange"))
    pure = {n.name: is_pure(n) for n in mask.graph.nodes if n.op == "call_function"}
    assert pure["gt"] is True and pure["arange"] is True
    rnd = fx.symbolic_trace(Random("rand_like"))
    assert not any(is_pure(n) for n in rnd.graph.nodes if "rand" in n.name)
    assert all(
        op_of(n).kind != "opaque"
        for n in fx.symbolic_trace(CausalAttention("triu")).graph.nodes
        if n.op == "call_method" and n.target == "bool"
    )
