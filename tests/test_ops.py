"""The canonical op view: one kind, one set of attrs and params, one way to replace a weight,
whether an op was written as a module, a torch/F function or a Tensor method, and whether it
was captured by symbolic_trace or torch.export."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import ops
from fxopt.ops import OpDef, count_kinds, kind_of, op_of, register_op

PLUMBING = {"getitem", "size"}
MODES = ("symbolic", "export")


class Forms(nn.Module):
    """Applies each form of one op to the input and returns all results."""

    def __init__(self, mod: nn.Module | None, forms: list) -> None:
        super().__init__()
        self.mod = mod if mod is not None else nn.Identity()
        self.forms = forms

    def forward(self, x: torch.Tensor):
        return tuple(f(self, x) for f in self.forms)


def _bn() -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(4, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn


def _img() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8)


def _ids() -> torch.Tensor:
    return torch.randint(0, 10, (2, 5))


def _seq() -> torch.Tensor:
    return torch.randn(2, 6, 8)


# kind -> (module factory or None, input factory, forms); forms read weights from self.mod so
# that every form of one op computes the same thing with the same tensors
# fmt: off
FAMILIES: dict[str, tuple] = {
    "conv": (lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1), _img, [
        lambda s, x: s.mod(x),
        lambda s, x: F.conv2d(x, s.mod.weight, s.mod.bias, stride=2, padding=1),
        lambda s, x: torch.conv2d(x, s.mod.weight, s.mod.bias, (2, 2), (1, 1)),
    ]),
    "grouped_conv": (lambda: nn.Conv2d(4, 8, 3, padding=1, groups=2), _img, [
        lambda s, x: s.mod(x),
        lambda s, x: F.conv2d(x, s.mod.weight, s.mod.bias, 1, 1, 1, 2),
        lambda s, x: torch.conv2d(x, s.mod.weight, s.mod.bias, padding=1, groups=2),
    ]),
    "conv_transpose": (lambda: nn.ConvTranspose2d(4, 3, 3, 2, 1, output_padding=1), _img, [
        lambda s, x: s.mod(x),
        lambda s, x: F.conv_transpose2d(x, s.mod.weight, s.mod.bias, 2, 1, 1),
        lambda s, x: torch.conv_transpose2d(x, s.mod.weight, s.mod.bias, 2, 1, (1, 1)),
    ]),
    "linear": (lambda: nn.Linear(8, 5), _seq, [
        lambda s, x: s.mod(x),
        lambda s, x: F.linear(x, s.mod.weight, s.mod.bias),
        lambda s, x: F.linear(x, weight=s.mod.weight, bias=s.mod.bias),
    ]),
    "batch_norm": (_bn, _img, [
        lambda s, x: s.mod(x),
        lambda s, x: F.batch_norm(x, s.mod.running_mean, s.mod.running_var, s.mod.weight,
                                  s.mod.bias, False, 0.1, 1e-3),
        lambda s, x: torch.batch_norm(x, s.mod.weight, s.mod.bias, s.mod.running_mean,
                                      s.mod.running_var, False, 0.1, 1e-3, False),
    ]),
    "layer_norm": (lambda: nn.LayerNorm(8, eps=1e-6), _seq, [
        lambda s, x: s.mod(x),
        lambda s, x: F.layer_norm(x, (8,), s.mod.weight, s.mod.bias, 1e-6),
        lambda s, x: torch.layer_norm(x, [8], s.mod.weight, s.mod.bias, 1e-6),
    ]),
    "group_norm": (lambda: nn.GroupNorm(2, 4, eps=1e-4), _img, [
        lambda s, x: s.mod(x),
        lambda s, x: F.group_norm(x, 2, s.mod.weight, s.mod.bias, 1e-4),
        lambda s, x: torch.group_norm(x, 2, s.mod.weight, s.mod.bias, 1e-4),
    ]),
    "embedding": (lambda: nn.Embedding(10, 3), _ids, [
        lambda s, x: s.mod(x),
        lambda s, x: F.embedding(x, s.mod.weight),
        lambda s, x: torch.embedding(s.mod.weight, x),
    ]),
    "scaled_dot_product": (None, lambda: torch.randn(2, 2, 6, 8), [
        lambda s, x: F.scaled_dot_product_attention(x, x, x, is_causal=True),
        lambda s, x: F.scaled_dot_product_attention(x, x * 1, x * 1, None, 0.0, True),
    ]),
    "relu": (nn.ReLU, _img, [
        lambda s, x: s.mod(x), lambda s, x: F.relu(x), lambda s, x: torch.relu(x),
        lambda s, x: x.relu(),
    ]),
    "gelu": (nn.GELU, _img, [lambda s, x: s.mod(x), lambda s, x: F.gelu(x)]),
    "hardswish": (nn.Hardswish, _img, [lambda s, x: s.mod(x), lambda s, x: F.hardswish(x)]),
    "hardsigmoid": (nn.Hardsigmoid, _img, [
        lambda s, x: s.mod(x), lambda s, x: F.hardsigmoid(x),
    ]),
    "silu": (nn.SiLU, _img, [lambda s, x: s.mod(x), lambda s, x: F.silu(x)]),
    "add": (None, _img, [
        lambda s, x: x + x, lambda s, x: torch.add(x, x), lambda s, x: x.add(x),
    ]),
    "mul": (None, _img, [
        lambda s, x: x * x, lambda s, x: torch.mul(x, x), lambda s, x: x.mul(x),
    ]),
    "cat": (None, _img, [
        lambda s, x: torch.cat([x, x], 1), lambda s, x: torch.cat((x, x), dim=1),
        lambda s, x: torch.concat([x, x], 1),
    ]),
    "split": (None, _img, [
        lambda s, x: torch.split(x, 2, 1)[1], lambda s, x: x.split(2, dim=1)[0],
    ]),
    "chunk": (None, _img, [
        lambda s, x: torch.chunk(x, 2, 1)[1], lambda s, x: x.chunk(2, dim=1)[0],
    ]),
    "flatten": (nn.Flatten, _img, [
        lambda s, x: s.mod(x), lambda s, x: torch.flatten(x, 1), lambda s, x: x.flatten(1),
    ]),
    "reshape": (None, _img, [
        lambda s, x: x.view(2, -1), lambda s, x: x.reshape(2, -1),
        lambda s, x: torch.reshape(x, (2, -1)),
    ]),
    "unsqueeze": (None, _img, [
        lambda s, x: x.unsqueeze(0), lambda s, x: torch.unsqueeze(x, 0),
    ]),
    "squeeze": (None, _img, [
        lambda s, x: x[:1].squeeze(0), lambda s, x: torch.squeeze(x[:1], 0),
    ]),
    "clamp": (None, _img, [
        lambda s, x: x.clamp(0, 6), lambda s, x: torch.clamp(x, 0, 6),
        lambda s, x: torch.clip(x, min=0, max=6),
    ]),
    "permute": (None, _img, [
        lambda s, x: x.permute(0, 2, 3, 1), lambda s, x: torch.permute(x, (0, 2, 3, 1)),
        lambda s, x: x.permute([0, 2, 3, 1]),
    ]),
    "transpose": (None, _img, [
        lambda s, x: x.transpose(1, 2), lambda s, x: torch.transpose(x, 1, 2),
    ]),
    "max_pool": (lambda: nn.MaxPool2d(2), _img, [
        lambda s, x: s.mod(x), lambda s, x: F.max_pool2d(x, 2),
        lambda s, x: F.max_pool2d(x, (2, 2), 2), lambda s, x: torch.max_pool2d(x, 2),
    ]),
    "avg_pool": (lambda: nn.AvgPool2d(2), _img, [
        lambda s, x: s.mod(x), lambda s, x: F.avg_pool2d(x, 2),
    ]),
    "adaptive_avg_pool": (lambda: nn.AdaptiveAvgPool2d(1), _img, [
        lambda s, x: s.mod(x), lambda s, x: F.adaptive_avg_pool2d(x, 1),
        lambda s, x: F.adaptive_avg_pool2d(x, (1, 1)),
    ]),
    "mean": (None, _img, [
        lambda s, x: x.mean((2, 3)), lambda s, x: torch.mean(x, (2, 3)),
        lambda s, x: x.mean(dim=[2, 3], keepdim=False),
    ]),
    "sum": (None, _img, [lambda s, x: x.sum(1), lambda s, x: torch.sum(x, dim=1)]),
    "matmul": (None, _img, [
        lambda s, x: x @ x, lambda s, x: torch.matmul(x, x), lambda s, x: x.matmul(x),
    ]),
    "bmm": (None, _seq, [
        lambda s, x: torch.bmm(x, x.transpose(1, 2)), lambda s, x: x.bmm(x.transpose(1, 2)),
    ]),
    "softmax": (lambda: nn.Softmax(dim=-1), _img, [
        lambda s, x: s.mod(x), lambda s, x: F.softmax(x, -1), lambda s, x: torch.softmax(x, -1),
        lambda s, x: x.softmax(dim=-1),
    ]),
}
# fmt: on
# the kind a family is expected to have, where it differs from the family's name
KIND = {"grouped_conv": "conv", "bmm": "matmul"}
# other kinds a family's forms use on purpose
EXTRA = {"scaled_dot_product": {"mul": 2}, "bmm": {"transpose": 2}}


def _build(family: str) -> tuple[nn.Module, tuple]:
    make_mod, make_input, forms = FAMILIES[family]
    model = Forms(make_mod() if make_mod else None, forms).eval()
    return model, (make_input(),)


_CAPTURES: dict = {}


def _capture(family: str, mode: str) -> tuple[nn.Module, tuple, fx.GraphModule]:
    if (family, mode) not in _CAPTURES:
        torch.manual_seed(1)
        model, inputs = _build(family)
        _CAPTURES[family, mode] = (model, inputs, fxopt.capture(model, inputs, mode=mode))
    return _CAPTURES[family, mode]


def _kinds(gm: fx.GraphModule) -> Counter:
    return Counter({k: v for k, v in count_kinds(gm).items() if k not in PLUMBING})


def _views(gm: fx.GraphModule, kind: str) -> list[ops.OpView]:
    return [op_of(n) for n in gm.graph.nodes if n.op.startswith("call") and kind_of(n) == kind]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_form_is_one_kind_in_both_front_ends(family) -> None:
    kind = KIND.get(family, family)
    n_forms = len(FAMILIES[family][2])
    want = Counter({kind: n_forms, **EXTRA.get(family, {})})
    forms_seen = set()
    for mode in MODES:
        model, inputs, gm = _capture(family, mode)
        assert _kinds(gm) == want, mode
        views = _views(gm, kind)
        assert all(v.known and v.kind == kind for v in views)
        forms_seen |= {v.form for v in views}
        torch.testing.assert_close(gm(*inputs), model(*inputs))
    # the family really exercised several spellings, and the ATen one
    assert "aten" in forms_seen
    assert len(forms_seen) >= 2


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("family", list(FAMILIES))
def test_attrs_and_params_agree_across_forms_and_front_ends(family) -> None:
    kind = KIND.get(family, family)
    views = [v for mode in MODES for v in _views(_capture(family, mode)[2], kind)]
    first = views[0]
    for view in views[1:]:
        assert view.attrs == first.attrs, f"{view}: {view.attrs} != {first}: {first.attrs}"
        assert view.params.keys() == first.params.keys()
        for name in first.params:
            assert _same(view.params[name], first.params[name]), f"{view} {name}"


@pytest.mark.parametrize(
    ("family", "attrs"),
    [
        ("conv", {"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "groups": 1}),
        ("grouped_conv", {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 2}),
        (
            "conv_transpose",
            {
                "stride": (2, 2),
                "padding": (1, 1),
                "dilation": (1, 1),
                "groups": 1,
                "output_padding": (1, 1),
            },
        ),
        ("batch_norm", {"eps": 1e-3, "momentum": 0.1}),
        ("layer_norm", {"normalized_shape": (8,), "eps": 1e-6}),
        ("group_norm", {"num_groups": 2, "eps": 1e-4}),
        ("embedding", {"padding_idx": None}),
        ("scaled_dot_product", {"is_causal": True, "scale": None, "dropout_p": 0.0}),
        ("max_pool", {"kernel_size": (2, 2), "stride": (2, 2), "padding": (0, 0)}),
        ("adaptive_avg_pool", {"output_size": (1, 1)}),
        ("softmax", {"dim": -1}),
        ("cat", {"dim": 1}),
        ("mean", {"dim": (2, 3), "keepdim": False}),
        ("permute", {"dims": (0, 2, 3, 1)}),
        ("transpose", {"dim0": 1, "dim1": 2}),
    ],
)
def test_attrs_have_one_spelling(family, attrs) -> None:
    kind = KIND.get(family, family)
    for mode in MODES:
        for view in _views(_capture(family, mode)[2], kind):
            assert view.attrs == attrs, view


@pytest.mark.parametrize(
    ("family", "params"),
    [
        ("conv", {"weight": (8, 4, 3, 3), "bias": (8,)}),
        ("batch_norm", {"weight": (4,), "bias": (4,), "running_mean": (4,), "running_var": (4,)}),
        ("embedding", {"weight": (10, 3)}),
        ("linear", {"weight": (5, 8), "bias": (5,)}),
    ],
)
def test_params_are_the_modules_own_tensors(family, params) -> None:
    kind = KIND.get(family, family)
    for mode in MODES:
        model = _capture(family, mode)[0]
        for view in _views(_capture(family, mode)[2], kind):
            got = {k: tuple(v.shape) for k, v in view.params.items()}
            assert got == params, view
            for name, value in view.params.items():
                assert torch.equal(value, getattr(model.mod, name)), (view, name)


def test_the_main_input_is_the_activation_not_the_weight() -> None:
    for mode in MODES:
        gm = _capture("embedding", mode)[2]
        for view in _views(gm, "embedding"):
            assert view.input is not None and view.input.op == "placeholder", view


def test_macs_of_conv_and_linear_are_counted_the_same_in_every_form() -> None:
    for family, want in (("conv", 8 * 4 * 4 * 2 * 4 * 9 + 0), ("linear", 2 * 6 * 5 * 8)):
        kind = KIND.get(family, family)
        for mode in MODES:
            for view in _views(_capture(family, mode)[2], kind):
                assert view.macs() == want, view


# --------------------------------------------------------------------------- set_param
class ConvForms(nn.Module):
    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        if self.functional:
            return F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)
        return self.conv(x)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("functional", [False, True], ids=["module", "function"])
def test_set_param_replaces_the_weight_in_every_form(mode, functional) -> None:
    model = ConvForms(functional).eval()
    x = torch.randn(2, 3, 6, 6)
    gm = fxopt.capture(model, (x,), mode=mode)
    (view,) = _views(gm, "conv")
    if mode == "export":
        assert view.form == "aten"
    else:
        assert view.form == ("function" if functional else "module")
    new_w, new_b = torch.randn(4, 3, 3, 3), torch.randn(4)
    view.set_param("weight", new_w)
    op_of(view.node).set_param("bias", new_b)
    gm.graph.lint()
    gm.recompile()
    torch.testing.assert_close(gm(x), F.conv2d(x, new_w, new_b, padding=1))
    fresh = op_of(view.node)
    assert torch.equal(fresh.params["weight"], new_w)
    assert torch.equal(fresh.params["bias"], new_b)
    # the user's model is untouched
    assert not torch.equal(model.conv.weight, new_w)
    # and a missing parameter is a KeyError naming it
    with pytest.raises(KeyError, match="running_mean"):
        fresh.set_param("running_mean", new_b)


@pytest.mark.parametrize("mode", MODES)
def test_set_param_can_drop_a_bias(mode) -> None:
    model = ConvForms(functional=True).eval()
    x = torch.randn(1, 3, 5, 5)
    gm = fxopt.capture(model, (x,), mode=mode)
    (view,) = _views(gm, "conv")
    view.set_param("bias", None)
    gm.recompile()
    assert op_of(view.node).params["bias"] is None
    torch.testing.assert_close(gm(x), F.conv2d(x, model.conv.weight, None, padding=1))


class TiedLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return F.linear(x, self.w), F.linear(x.relu(), self.w)


class TiedEmbedding(nn.Module):
    """Embedding table reused as the output projection, as language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def forward(self, ids):
        h = self.embed(ids)
        return h, F.linear(h, self.embed.weight)


@pytest.mark.parametrize("mode", MODES)
def test_set_param_leaves_a_tied_weight_alone_for_its_other_user(mode) -> None:
    model = TiedLinears().eval()
    x = torch.randn(3, 4)
    gm = fxopt.capture(model, (x,), mode=mode)
    first, second = _views(gm, "linear")
    assert first.param_node("weight") is second.param_node("weight")  # really tied
    before = gm(x)
    new = torch.zeros(4, 4)
    first.set_param("weight", new)
    gm.graph.lint()
    gm.recompile()
    after = gm(x)
    assert torch.equal(after[0], torch.zeros(3, 4))
    torch.testing.assert_close(after[1], before[1])
    assert torch.equal(op_of(second.node).params["weight"], model.w)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("which", ["linear", "embedding"])
def test_set_param_on_a_weight_tied_to_a_module(mode, which) -> None:
    model = TiedEmbedding().eval()
    ids = torch.randint(0, 10, (2, 5))
    gm = fxopt.capture(model, (ids,), mode=mode)
    before = gm(ids)
    (view,) = _views(gm, which)
    view.set_param("weight", torch.zeros(10, 4))
    gm.graph.lint()
    gm.recompile()
    h, logits = gm(ids)
    if which == "linear":
        torch.testing.assert_close(h, before[0])
        assert torch.equal(logits, torch.zeros_like(logits))
    else:
        assert torch.equal(h, torch.zeros_like(h))
        torch.testing.assert_close(logits, F.linear(h, model.embed.weight))
        # the projection still reads the original table
        (lin,) = _views(gm, "linear")
        assert torch.equal(lin.params["weight"], model.embed.weight)


# --------------------------------------------------------------------------- unknown ops
class MyScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 3

    @staticmethod
    def backward(ctx, grad):
        return grad * 3


class Custom(nn.Module):
    def forward(self, x):
        return x.flip(-1) + 1


class Unknowns(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.custom = Custom()

    def forward(self, x):
        spectrum = torch.fft.rfft(x).abs()
        return spectrum, self.custom(x), MyScale.apply(x)


def test_unknown_ops_are_opaque_never_guessed() -> None:
    model = Unknowns().eval()
    x = torch.randn(2, 8)
    gm = fxopt.capture(model, (x,), mode="symbolic", leaf_modules=[Custom])
    views = {n.name: op_of(n) for n in gm.graph.nodes if n.op.startswith("call")}
    rfft = next(v for v in views.values() if v.node.target is torch.fft.rfft)
    custom = next(v for v in views.values() if v.node.op == "call_module")
    for view in (rfft, custom):
        assert view.kind == ops.OPAQUE and not view.known
        assert view.attrs == {} and view.params == {}
        assert view.macs() == 0
        assert not ops.is_pure(view.node)
    # the abs after it is still known
    assert "abs" in {v.kind for v in views.values()}
    exported = fxopt.capture(model, (x,), mode="export")
    kinds = count_kinds(exported)
    assert kinds[ops.OPAQUE] >= 2  # aten.fft_rfft and aten.flip are not guessed either


# --------------------------------------------------------------------------- register_op
def my_swish(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x) * weight


torch.fx.wrap("my_swish")


class UsesSwish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return my_swish(x, self.w)


@pytest.fixture
def swish_registered():
    entry = register_op(
        OpDef(
            "my_swish",
            "activation",
            functions=(my_swish,),
            signature=("input", "weight"),
            params=("weight",),
            macs=lambda view: 7,
        )
    )
    yield entry
    ops.OP_TABLE.remove(entry)
    del ops._BY_FUNCTION[my_swish]


def test_an_unregistered_function_is_opaque() -> None:
    gm = fxopt.capture(UsesSwish(), (torch.randn(2, 6),), mode="symbolic")
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert node.target is my_swish
    assert kind_of(node) == ops.OPAQUE


def test_one_register_op_call_makes_an_op_known(swish_registered) -> None:
    model = UsesSwish().eval()
    x = torch.randn(2, 6)
    gm = fxopt.capture(model, (x,), mode="symbolic")
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    view = op_of(node)
    assert (view.kind, view.category, view.form) == ("my_swish", "activation", "function")
    assert ops.is_pure(node)
    assert view.macs() == 7
    assert torch.equal(view.params["weight"], model.w)
    view.set_param("weight", torch.ones(6))
    gm.recompile()
    torch.testing.assert_close(gm(x), x * torch.sigmoid(x))
    assert count_kinds(gm)["my_swish"] == 1


def test_registration_does_not_outlive_its_test() -> None:
    assert my_swish not in ops._BY_FUNCTION
    assert all(e.kind != "my_swish" for e in ops.OP_TABLE)


# --------------------------------------------------------------------------- purity
class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.lin(x)
        y.add_(1)
        F.relu(y, inplace=True)
        self.act(y)
        return y * 2


def test_in_place_ops_are_not_pure() -> None:
    gm = fxopt.capture(InPlace(), (torch.randn(2, 4),), mode="symbolic")
    by_name = {n.name: n for n in gm.graph.nodes}
    assert ops.is_inplace(by_name["add_"]) and not ops.is_pure(by_name["add_"])
    assert ops.is_inplace(by_name["relu"]) and not ops.is_pure(by_name["relu"])
    assert ops.is_inplace(by_name["act"]) and not ops.is_pure(by_name["act"])
    assert not ops.is_inplace(by_name["mul"]) and ops.is_pure(by_name["mul"])
    assert not ops.is_inplace(by_name["lin"]) and ops.is_pure(by_name["lin"])
    exported = fxopt.capture(InPlace(), (torch.randn(2, 4),), mode="export")
    mutating = [n for n in exported.graph.nodes if ops.is_inplace(n)]
    assert mutating and not any(ops.is_pure(n) for n in mutating)


def test_dropout_is_never_pure_and_placeholders_are_not_pure() -> None:
    gm = fxopt.capture(
        nn.Sequential(nn.Linear(3, 3), nn.Dropout()), (torch.randn(2, 3),), mode="symbolic"
    )
    kinds = {n.name: (kind_of(n), ops.is_pure(n)) for n in gm.graph.nodes}
    assert kinds["input_1"] == ("placeholder", False)
    assert kinds["_0"] == ("linear", True)
    assert kinds["_1"] == ("dropout", False)


# --------------------------------------------------------------------------- addmm as linear
class Conv1D(nn.Module):
    """GPT-2's Conv1D: ``addmm(bias, x, W)`` with ``W`` stored ``[in, out]``."""

    def __init__(self, nin: int = 8, nout: int = 6, beta: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nin, nout))
        self.bias = nn.Parameter(torch.randn(nout))
        self.beta = beta

    def forward(self, x):
        flat = x.view(-1, x.size(-1))
        if self.beta != 1.0:
            return torch.addmm(self.bias, flat, self.weight, beta=self.beta)
        return torch.addmm(self.bias, flat, self.weight)


def _addmm_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if "addmm" in str(n.target))


@pytest.mark.parametrize("mode", MODES)
def test_addmm_is_linear_with_weight_in_linear_layout(mode):
    model, x = Conv1D().eval(), torch.randn(2, 3, 8)
    gm = fxopt.capture(model, (x,), mode=mode)
    view = op_of(_addmm_node(gm))
    assert view.kind == "linear" and view.input.op != "get_attr"
    assert torch.equal(view.params["weight"], model.weight.t())  # [out, in], as nn.Linear
    assert torch.equal(view.params["bias"], model.bias)
    assert view.macs() == 6 * 6 * 8
    assert fxopt.inspect(gm).macs_by_kind["linear"] == 6 * 6 * 8
    # set_param takes the linear layout and stores it back as addmm's [in, out]
    new_w = torch.randn(6, 8)
    view.set_param("weight", new_w)
    gm.graph.lint()
    gm.recompile()
    expected = F.linear(x.view(-1, 8), new_w, model.bias)
    torch.testing.assert_close(gm(x), expected)
    assert torch.equal(op_of(_addmm_node(gm)).params["weight"], new_w)


def test_addmm_with_scaled_terms_or_matrix_self_stays_opaque():
    x = torch.randn(6, 8)
    gm = fxopt.capture(Conv1D(beta=0.5).eval(), (x,), mode="export")
    assert kind_of(_addmm_node(gm)) == "opaque"

    class Residual(nn.Module):  # addmm(h, x, W): a residual add of a matrix, not a bias
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return torch.addmm(x, x, self.w)

    gm = fxopt.capture(Residual().eval(), (x,), mode="export")
    assert kind_of(_addmm_node(gm)) == "opaque"
