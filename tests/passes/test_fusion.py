"""fold_bn: batch norm and per-channel affine constants folded into conv / conv_transpose /
linear weights, in the module, functional and ATen forms, captured by symbolic_trace and
torch.export. Each case gets the four checks: the op kinds after the pass, graph.lint(),
outputs against the original within the EXACT tolerance, and cases the pass must refuse
(``modified is False``, the graph untouched, the reason in ``stats["refused"]``)."""

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
from fxopt.capture import annotate
from fxopt.ops import count_kinds, op_of
from fxopt.passes.base import REGISTRY, PassContext
from fxopt.pipeline import PIPELINES
from fxopt.verify import EXACT, compare_outputs

MODES = ("symbolic", "export")
CNNS = ("resnet", "mobilenet", "densenet", "shufflenet", "decoder", "dynamic")
CNN_CASES = [(n, m) for n in CNNS for m in MODES if m == "export" or zoo.get(n).symbolic]
ZOO_CASES = [(n, m) for n in zoo.names() for m in MODES if m == "export" or zoo.get(n).symbolic]
FOLD_INTO = ("conv", "conv_transpose", "linear")


# --------------------------------------------------------------------------- helpers
def _run_pass(name: str, gm: fx.GraphModule, inputs: tuple, **params):
    """Through the PassManager (lint, annotate, verify under EXACT); returns (gm, record)."""
    res = PassManager([fxopt.Pass(name, **params)]).run(gm, inputs)
    (record,) = res.report
    return res.module, record


def _call(gm: fx.GraphModule, inputs: tuple):
    """The bare pass, for graphs the manager would not run the same way twice (train BN)."""
    return REGISTRY["fold_bn"].fn(gm, PassContext(tuple(inputs)))


def _assert_close(want, got) -> None:
    report = compare_outputs(want, got, EXACT)
    assert report.ok(), f"max abs {report.max_abs:.3g}, relative {report.rel:.3g}"


def _check_outputs(model: nn.Module, gm: fx.GraphModule, inputs: tuple) -> None:
    """Against the model, on the example inputs and on fresh ones of the same shapes."""
    fresh = tuple(
        torch.randn_like(x) if x.is_floating_point() else torch.randint_like(x, int(x.max()) + 1)
        for x in inputs
    )
    with torch.no_grad():
        _assert_close(model(*inputs), gm(*inputs))
        _assert_close(model(*fresh), gm(*fresh))


def _is_bn(node: fx.Node) -> bool:
    return node.op.startswith("call") and op_of(node).kind == "batch_norm"


def _bn_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if _is_bn(n)]


def _foldable(gm: fx.GraphModule) -> list[str]:
    """Batch norms fed by a conv / conv_transpose / linear that nothing else reads."""
    out = []
    for node in _bn_nodes(gm):
        src = op_of(node).input
        if src is not None and src.op.startswith("call") and len(src.users) == 1:
            if op_of(src).kind in FOLD_INTO:
                out.append(node.name)
    return out


def _randomize_bn(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """Non-trivial statistics and affine parameters, so a wrong fold shows in the outputs."""
    with torch.no_grad():
        if bn.running_mean is not None:
            bn.running_mean.normal_(0.0, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.5)
    return bn


# --------------------------------------------------------------------------- conv + BN
class Seq(nn.Module):
    """``bn(conv(x))`` in the module form."""

    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = conv, _randomize_bn(bn)

    def forward(self, x):
        return self.bn(self.conv(x))


class Functional(Seq):
    """The same computation with ``F.conv*`` / ``F.linear`` / ``F.batch_norm`` reading the
    weights as attributes (get_attr nodes under symbolic_trace)."""

    def forward(self, x):
        c, b = self.conv, self.bn
        if isinstance(c, nn.Linear):
            y = F.linear(x, c.weight, c.bias)
        elif isinstance(c, nn.modules.conv._ConvTransposeNd):
            fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[
                len(c.kernel_size)
            ]
            y = fn(x, c.weight, c.bias, c.stride, c.padding, c.output_padding, c.groups, c.dilation)
        else:
            fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(c.kernel_size)]
            y = fn(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        return F.batch_norm(y, b.running_mean, b.running_var, b.weight, b.bias, False, 0.1, b.eps)


class TorchBatchNorm(Seq):
    """``torch.batch_norm``, whose arguments come in the ATen order (weight first)."""

    def forward(self, x):
        b = self.bn
        return torch.batch_norm(
            self.conv(x), b.weight, b.bias, b.running_mean, b.running_var, False, 0.1, b.eps, False
        )


# name -> (conv factory, bn factory, input shape)
# fmt: off
CONV_BN: dict[str, tuple] = {
    "conv2d": (lambda: nn.Conv2d(3, 8, 3, padding=1), lambda: nn.BatchNorm2d(8), (2, 3, 8, 8)),
    "conv2d_strided_dilated": (lambda: nn.Conv2d(3, 8, 3, stride=2, dilation=2),
                               lambda: nn.BatchNorm2d(8, eps=1e-3), (2, 3, 11, 11)),
    "conv1d": (lambda: nn.Conv1d(3, 8, 3), lambda: nn.BatchNorm1d(8), (2, 3, 16)),
    "conv3d": (lambda: nn.Conv3d(3, 6, 3, padding=1), lambda: nn.BatchNorm3d(6), (2, 3, 5, 5, 5)),
    "grouped": (lambda: nn.Conv2d(4, 8, 3, padding=1, groups=2), lambda: nn.BatchNorm2d(8),
                (2, 4, 8, 8)),
    "depthwise": (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), lambda: nn.BatchNorm2d(8),
                  (2, 8, 8, 8)),
    "no_bias": (lambda: nn.Conv2d(3, 8, 3, bias=False), lambda: nn.BatchNorm2d(8, eps=1e-2),
                (2, 3, 8, 8)),
    "bn_without_affine": (lambda: nn.Conv2d(3, 8, 1), lambda: nn.BatchNorm2d(8, affine=False),
                          (2, 3, 8, 8)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2), lambda: nn.BatchNorm2d(6),
                         (2, 4, 5, 5)),
    "conv_transpose2d_groups2": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2,
                                   bias=False),
        lambda: nn.BatchNorm2d(6), (2, 4, 5, 5)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(4, 6, 4, stride=2, groups=2),
                         lambda: nn.BatchNorm1d(6), (2, 4, 7)),
    "linear_bn1d": (lambda: nn.Linear(5, 8), lambda: nn.BatchNorm1d(8), (4, 5)),
    "linear_no_bias": (lambda: nn.Linear(5, 8, bias=False), lambda: nn.BatchNorm1d(8), (4, 5)),
}
# fmt: on
FORMS = {"module": Seq, "functional": Functional, "torch_batch_norm": TorchBatchNorm}
FORM_CASES = [(c, f) for c in CONV_BN for f in FORMS if f != "torch_batch_norm" or c == "conv2d"]


def _conv_bn(case: str, form: str) -> tuple[nn.Module, tuple]:
    conv, bn, shape = CONV_BN[case]
    return FORMS[form](conv(), bn()).eval(), (torch.randn(shape),)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("case", "form"), FORM_CASES, ids=[f"{c}-{f}" for c, f in FORM_CASES])
def test_fold_bn_folds_every_conv_kind_in_every_form(case, form, mode) -> None:
    model, inputs = _conv_bn(case, form)
    gm = fxopt.capture(model, inputs, mode=mode)
    before = count_kinds(gm)
    assert before["batch_norm"] == 1
    (bn,) = _bn_nodes(gm)
    want_form = "aten" if mode == "export" else ("module" if form == "module" else "function")
    assert op_of(bn).form == want_form
    producer_kind = op_of(op_of(bn).input).kind
    assert producer_kind in FOLD_INTO

    gm, record = _run_pass("fold_bn", gm, inputs)

    # 1. op kinds: the batch norm is gone, nothing else changed
    after = count_kinds(gm)
    assert after == before - Counter({"batch_norm": 1})
    assert record.modified is True
    assert record.stats == {"folded_bn": 1, "folded_affine": 0}
    # the BN's tensors are gone; a conv without bias gained one
    conv, bn_mod = model.conv, model.bn
    channels = bn_mod.num_features
    dropped = (4 if bn_mod.affine else 2) * channels - (channels if conv.bias is None else 0)
    assert record.params == (record.params[0], record.params[0] - dropped)
    # 2. lint
    gm.graph.lint()
    # 3. outputs
    _check_outputs(model, gm, inputs)
    # 4. nothing left to do
    code = gm.code
    gm, again = _run_pass("fold_bn", gm, inputs)
    assert again.modified is False and gm.code == code
    assert "refused" not in again.stats


def _as_native_batch_norm(gm: fx.GraphModule, inputs: tuple, variant: str) -> fx.Node:
    """Rewrite the aten.batch_norm of an export capture into the tuple-valued ATen forms
    (``_native_batch_norm_legit_no_training`` / ``native_batch_norm``) + ``getitem(0)``, as
    decompositions write it; returns the new batch-norm node."""
    (old,) = _bn_nodes(gm)
    x, w, b, mean, var, _, momentum, eps, _ = old.args
    aten = torch.ops.aten
    with gm.graph.inserting_before(old):
        if variant == "no_training":
            new = gm.graph.call_function(
                aten._native_batch_norm_legit_no_training.default,
                (x, w, b, mean, var, momentum, eps),
            )
        else:
            new = gm.graph.call_function(
                aten.native_batch_norm.default, (x, w, b, mean, var, False, momentum, eps)
            )
        out = gm.graph.call_function(operator.getitem, (new, 0))
    old.replace_all_uses_with(out)
    gm.graph.erase_node(old)
    gm.recompile()
    annotate(gm, inputs)
    return new


@pytest.mark.parametrize("variant", ["no_training", "native"])
def test_fold_bn_folds_the_tuple_valued_aten_forms(variant) -> None:
    model, inputs = _conv_bn("conv2d", "module")
    gm = fxopt.capture(model, inputs, mode="export")
    new = _as_native_batch_norm(gm, inputs, variant)
    assert isinstance(new.meta["shape"], list)  # a tuple of outputs
    _check_outputs(model, gm, inputs)
    gm, record = _run_pass("fold_bn", gm, inputs)
    assert record.stats == {"folded_bn": 1, "folded_affine": 0}
    kinds = count_kinds(gm)
    assert kinds["batch_norm"] == 0 and kinds["getitem"] == 0 and kinds["conv"] == 1
    gm.graph.lint()
    _check_outputs(model, gm, inputs)


def test_fold_bn_refuses_when_a_tuple_valued_bn_has_its_saved_statistics_read() -> None:
    model, inputs = _conv_bn("conv2d", "module")
    gm = fxopt.capture(model, inputs, mode="export")
    new = _as_native_batch_norm(gm, inputs, "native")
    getitem = next(iter(new.users))
    with gm.graph.inserting_after(getitem):
        saved = gm.graph.call_function(getitem.target, (new, 1))
    with gm.graph.inserting_after(saved):
        summed = gm.graph.call_function(torch.ops.aten.sum.default, (saved,))
    with gm.graph.inserting_after(summed):
        total = gm.graph.call_function(torch.ops.aten.add.Tensor, (getitem, summed))
    getitem.replace_all_uses_with(total)
    total.args = (getitem, summed)
    gm.recompile()
    annotate(gm, inputs)
    code = gm.code
    res = _call(gm, inputs)
    assert res.modified is False and gm.code == code
    assert "auxiliary outputs" in res.stats["refused"][new.name]


# --------------------------------------------------------------------------- the zoo
@pytest.fixture(scope="module", params=CNN_CASES, ids=[f"{n}-{m}" for n, m in CNN_CASES])
def cnn(request, zoo_case):
    name, mode = request.param
    return (name, mode, *zoo_case(name, mode))


def test_fold_bn_on_the_zoo_cnns(cnn) -> None:
    name, mode, model, inputs, gm = cnn
    bns = [n.name for n in _bn_nodes(gm)]
    foldable = _foldable(gm)
    assert bns and foldable
    others = [n for n in bns if n not in foldable]

    gm, record = _run_pass("fold_bn", gm, inputs)

    # 1. op kinds: every foldable BN went, the convs stayed
    assert record.modified is True
    assert record.stats["folded_bn"] == len(foldable)
    assert _foldable(gm) == []
    assert [n.name for n in _bn_nodes(gm)] == others
    assert sorted(record.stats.get("refused", {})) == sorted(others)
    if name == "densenet":  # pre-activation BNs read a cat of feature maps
        assert len(others) == 8
        for reason in record.stats["refused"].values():
            assert reason == "input is cat, not conv/conv_transpose/linear"
    else:
        assert others == []
    assert record.params[1] < record.params[0]
    # 2. lint; 3. outputs against the model
    gm.graph.lint()
    _check_outputs(model, gm, inputs)
    # 4. a second run has nothing to fold and says the same about the rest
    code = gm.code
    gm, again = _run_pass("fold_bn", gm, inputs)
    assert again.modified is False and gm.code == code
    assert sorted(again.stats.get("refused", {})) == sorted(others)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_fold_bn_does_not_touch_the_users_model(train) -> None:
    model, inputs = zoo.load("resnet")
    with torch.no_grad():
        want = model(*inputs)
    model.train(train)  # a model left in train mode would update its BN statistics if run
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for mode in MODES:
        res = fxopt.optimize(model, inputs, "fold_bn", mode=mode)
        assert count_kinds(res.module)["batch_norm"] == 0
        assert model.state_dict().keys() == state.keys()
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), k
        assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 9
        assert all(m.training is train for m in model.modules())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(*inputs), want)


# --------------------------------------------------------------------------- refusals
class SharedOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = _randomize_bn(nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class SharedModule(SharedOutput):
    """The conv module is called twice; only the first call is followed by BN."""

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 2)


class NotAfterConv(SharedOutput):
    def forward(self, x):
        return self.bn(torch.relu(self.conv(x)))


class TrainingFunctional(nn.Module):
    """Batch statistics, in either capture mode: F.batch_norm(training=True) without stats,
    and a BatchNorm2d that tracks no running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)
        self.beta = nn.Parameter(torch.randn(4))
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        y = F.batch_norm(self.conv(x), None, None, self.gamma, self.beta, training=True)
        return self.bn(self.conv2(y))


class LinearOnSequence(nn.Module):
    """BatchNorm1d over dim 1 of a linear's (N, L, C) output: channels are not the
    linear's output features."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.lin = nn.Linear(8, features)
        self.bn = _randomize_bn(nn.BatchNorm1d(4))

    def forward(self, x):
        return self.bn(self.lin(x))


class ComputedWeight(nn.Module):
    def __init__(self, computed: str) -> None:
        super().__init__()
        self.computed = computed
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.b = nn.Parameter(torch.randn(4))
        self.bn = _randomize_bn(nn.BatchNorm2d(4))

    def forward(self, x):
        w = self.w * 2 if self.computed == "weight" else self.w
        b = self.b * 2 if self.computed == "bias" else self.b
        return self.bn(F.conv2d(x, w, b))


IMG = (2, 3, 8, 8)
# name -> (model factory, input shape, modes, reason fragment per BN in the order of the graph)
# fmt: off
REFUSALS: dict[str, tuple] = {
    "conv_output_used_elsewhere": (SharedOutput, IMG, MODES, ["output is also used by"]),
    "not_after_conv": (NotAfterConv, IMG, MODES, ["input is relu"]),
    "batch_statistics": (TrainingFunctional, IMG, MODES, ["training mode", "training mode"]),
    "channel_mismatch": (lambda: LinearOnSequence(8), (2, 4, 8), MODES,
                         ["channel mismatch: batch norm has 4 channels"]),
    "linear_on_3d": (lambda: LinearOnSequence(4), (2, 4, 8), MODES, ["only on 2-D"]),
    "shared_module": (SharedModule, IMG, ("symbolic",), ["module conv is called 2 times"]),
    "computed_weight": (lambda: ComputedWeight("weight"), IMG, MODES,
                        ["weight is computed in the graph"]),
    "computed_bias": (lambda: ComputedWeight("bias"), IMG, MODES,
                      ["bias is computed in the graph"]),
}
# fmt: on
REFUSAL_CASES = [(c, m) for c, (_, _, modes, _) in REFUSALS.items() for m in modes]


@pytest.mark.parametrize(
    ("case", "mode"), REFUSAL_CASES, ids=[f"{c}-{m}" for c, m in REFUSAL_CASES]
)
def test_fold_bn_refuses_and_says_why(case, mode) -> None:
    factory, shape, _, reasons = REFUSALS[case]
    model = factory().eval()
    inputs = (torch.randn(shape),)
    gm = fxopt.capture(model, inputs, mode=mode)
    bns = [n.name for n in _bn_nodes(gm)]
    assert len(bns) == len(reasons)
    kinds, code = count_kinds(gm), gm.code

    gm, record = _run_pass("fold_bn", gm, inputs)

    assert record.modified is False
    assert count_kinds(gm) == kinds and gm.code == code
    assert record.params[0] == record.params[1]
    refused = record.stats["refused"]
    assert list(refused) == bns  # named by BN node, in graph order
    for bn, fragment in zip(bns, reasons, strict=True):
        assert fragment in refused[bn], refused[bn]
    gm.graph.lint()
    _check_outputs(model, gm, inputs)


def test_fold_bn_names_the_other_user_of_the_conv_output() -> None:
    model, inputs = SharedOutput().eval(), (torch.randn(IMG),)
    gm = fxopt.capture(model, inputs, mode="symbolic")
    res = _call(gm, inputs)
    assert res.stats["refused"] == {"bn": "conv output is also used by add"}


def test_fold_bn_refuses_a_bn_module_left_in_training_mode() -> None:
    model, inputs = _conv_bn("conv2d", "module")
    gm = fxopt.capture(model, inputs, mode="symbolic")
    gm.get_submodule("bn").train()
    stats = {k: v.clone() for k, v in gm.get_submodule("bn").state_dict().items()}
    code = gm.code
    res = _call(gm, inputs)
    assert res.modified is False and gm.code == code
    assert res.stats["refused"] == {"bn": "batch norm is in training mode (uses batch statistics)"}
    assert count_kinds(gm)["batch_norm"] == 1
    for k, v in gm.get_submodule("bn").state_dict().items():
        assert torch.equal(v, stats[k]), k  # the pass did not run the model
    gm.graph.lint()
    gm.get_submodule("bn").eval()  # back in eval it folds
    gm, record = _run_pass("fold_bn", gm, inputs)
    assert record.stats == {"folded_bn": 1, "folded_affine": 0}
    _check_outputs(model, gm, inputs)


def test_fold_bn_keeps_the_weight_of_a_shared_conv_for_its_other_call() -> None:
    """torch.export writes a module called twice as two aten.conv2d reading one weight; the
    fold gives the BN's conv weights of its own and leaves the other call as it was."""
    model, inputs = SharedModule().eval(), (torch.randn(IMG),)
    gm = fxopt.capture(model, inputs, mode="export")
    gm, record = _run_pass("fold_bn", gm, inputs)
    assert record.stats == {"folded_bn": 1, "folded_affine": 0}
    convs = [n for n in gm.graph.nodes if n.op.startswith("call") and op_of(n).kind == "conv"]
    assert len(convs) == 2
    weights = [op_of(c).params["weight"] for c in convs]
    assert sum(torch.equal(w, model.conv.weight) for w in weights) == 1
    assert torch.equal(gm.conv.weight, model.conv.weight)
    gm.graph.lint()
    _check_outputs(model, gm, inputs)


# --------------------------------------------------------------------------- tied weights
class TiedConv(nn.Module):
    """One weight, two readers: F.conv2d + BN, and a plain F.conv2d (or a sum of it)."""

    def __init__(self, reader: str) -> None:
        super().__init__()
        self.reader = reader
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.b = nn.Parameter(torch.randn(4))
        self.bn = _randomize_bn(nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.bn(F.conv2d(x, self.w, self.b, padding=1))
        if self.reader == "conv":
            return y + F.conv2d(x, self.w, padding=1)
        return y * self.w.sum()


class TiedModule(nn.Module):
    """A conv module + BN whose weight is also read directly by F.conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = _randomize_bn(nn.BatchNorm2d(4))

    def forward(self, x):
        return self.bn(self.conv(x)) - F.conv2d(x, self.conv.weight, padding=1)


class TiedHead(nn.Module):
    """An LM head tied to the embedding, scaled per feature: the affine fold must not
    rescale the embedding table."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.register_buffer("scale", torch.rand(10) + 0.5)

    def forward(self, ids):
        return F.linear(self.embed(ids), self.embed.weight) * self.scale


def _weights_read(gm: fx.GraphModule, skip: str) -> dict[tuple[str, str], torch.Tensor]:
    """The tensors each call node but ``skip`` reads, by (node, parameter or argument)."""
    out = {}
    for node in gm.graph.nodes:
        if not node.op.startswith("call") or node.name == skip:
            continue
        view = op_of(node)
        for key, value in view.params.items():
            if value is not None:
                out[(node.name, key)] = value.detach().clone()
        for i, arg in enumerate(node.args):
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                out[(node.name, str(i))] = _fetch(gm, arg.target).detach().clone()
    return out


def _fetch(gm: fx.GraphModule, path: str) -> torch.Tensor:
    value = gm
    for part in path.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["conv_reader", "sum_reader", "module", "embedding_head"])
def test_tied_weights_keep_their_value_for_the_other_readers(case, mode) -> None:
    if case == "embedding_head":
        model, inputs = TiedHead().eval(), (torch.randint(0, 10, (2, 5)),)
    elif case == "module":
        model, inputs = TiedModule().eval(), (torch.randn(IMG),)
    else:
        model, inputs = TiedConv(case.split("_")[0]).eval(), (torch.randn(IMG),)
    gm = fxopt.capture(model, inputs, mode=mode)
    before = count_kinds(gm)
    folded_into = next(  # the conv / linear that absorbs the BN or the scale
        op_of(n).input.name
        for n in gm.graph.nodes
        if n.op.startswith("call") and op_of(n).kind in ("batch_norm", "mul")
    )
    read = _weights_read(gm, skip=folded_into)
    assert len(read) >= 1
    gm, record = _run_pass("fold_bn", gm, inputs)
    after = count_kinds(gm)
    if case == "embedding_head":
        assert record.stats == {"folded_bn": 0, "folded_affine": 1}
        assert after == before - Counter({"mul": 1})
    else:
        assert record.stats == {"folded_bn": 1, "folded_affine": 0}
        assert after == before - Counter({"batch_norm": 1})
    # every other reader still sees the original tensor
    now = _weights_read(gm, skip=folded_into)
    names = {n.name for n in gm.graph.nodes}
    checked = [key for key in read if key[0] in names]
    assert checked  # there is another reader of the tied tensor
    for key in checked:
        assert torch.equal(now[key], read[key]), key
    gm.graph.lint()
    _check_outputs(model, gm, inputs)


# --------------------------------------------------------------------------- affine constants
class Affine(nn.Module):
    """``fn(self, producer(x))`` with per-channel constants of several shapes at hand."""

    def __init__(self, producer: nn.Module, fn, channels: int) -> None:
        super().__init__()
        self.producer, self.fn = producer, fn
        c = channels
        self.s_c11 = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.t_c11 = nn.Parameter(torch.randn(c, 1, 1))
        self.register_buffer("s_1c11", torch.rand(1, c, 1, 1) + 0.5)
        self.register_buffer("t_1c11", torch.randn(1, c, 1, 1))
        self.register_buffer("s_0d", torch.tensor(1.7))
        self.register_buffer("s_c", torch.rand(c) + 0.5)
        self.register_buffer("t_c", torch.randn(c))
        self.register_buffer("s_chw", torch.rand(c, 6, 6) + 0.5)
        self.register_buffer("s_2c11", torch.rand(2, c, 1, 1) + 0.5)
        self.register_buffer("s_c11_double", torch.rand(c, 1, 1, dtype=torch.float64) + 0.5)

    def forward(self, x):
        return self.fn(self, self.producer(x))


def _conv() -> nn.Module:
    return nn.Conv2d(3, 4, 3, padding=1)


def _conv_t() -> nn.Module:
    return nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2)


def _lin() -> nn.Module:
    return nn.Linear(5, 4)


IMG6 = (1, 3, 6, 6)
# name -> (producer, fn, input shape, affine ops folded)
# fmt: off
FOLDED: dict[str, tuple] = {
    "mul_add_c11_params": (_conv, lambda s, y: y * s.s_c11 + s.t_c11, IMG6, 2),
    "mul_add_1c11_buffers": (_conv, lambda s, y: y * s.s_1c11 + s.t_1c11, IMG6, 2),
    "mul_add_python_scalars": (_conv, lambda s, y: y * 2.5 + 0.5, IMG6, 2),
    "mul_0d_tensor": (_conv, lambda s, y: y * s.s_0d, IMG6, 1),
    "const_plus_conv": (_conv, lambda s, y: s.t_c11 + y, IMG6, 1),
    "const_times_conv": (_conv, lambda s, y: s.s_1c11 * y, IMG6, 1),
    "div": (_conv, lambda s, y: y / s.s_c11, IMG6, 1),
    "sub": (_conv, lambda s, y: y - s.t_1c11, IMG6, 1),
    "torch_mul_method_add": (_conv, lambda s, y: torch.mul(y, s.s_c11).add(s.t_c11), IMG6, 2),
    "chain_of_four": (_conv, lambda s, y: ((y * s.s_c11 - s.t_c11) / s.s_0d + 1.0), IMG6, 4),
    "linear_mul_c": (_lin, lambda s, y: y * s.s_c, (3, 5), 1),
    "linear_mul_add_c_3d": (_lin, lambda s, y: y * s.s_c + s.t_c, (2, 3, 5), 2),
    "conv_transpose_groups2": (_conv_t, lambda s, y: y * s.s_c11 + s.t_1c11, (1, 4, 3, 3), 2),
}
NOT_FOLDED: dict[str, tuple] = {
    "broadcast_to_larger_shape": (_conv, lambda s, y: y * s.s_2c11, IMG6),
    "non_constant_operand": (_conv, lambda s, y: y * y.mean((2, 3), keepdim=True), IMG6),
    "input_operand": (_conv, lambda s, y: y + y.sum(), IMG6),
    "spatially_varying": (_conv, lambda s, y: y * s.s_chw, IMG6),
    "const_minus_conv": (_conv, lambda s, y: s.t_c11 - y, IMG6),
    "scalar_minus_conv": (_conv, lambda s, y: 1.0 - y, IMG6),
    "const_over_conv": (_conv, lambda s, y: s.s_c11 / y, IMG6),
    "promotes_to_double": (_conv, lambda s, y: y * s.s_c11_double, IMG6),
    "conv_output_read_twice": (_conv, lambda s, y: y * s.s_c11 + y, IMG6),
    "after_relu": (_conv, lambda s, y: y.relu() * s.s_c11, IMG6),
    "linear_channel_vector_on_wrong_dim": (_lin, lambda s, y: y * s.s_c[:, None], (4, 5)),
}
# fmt: on
AFFINE_KINDS = ("mul", "div", "add", "sub")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(FOLDED))
def test_fold_bn_folds_per_channel_affine_constants(case, mode) -> None:
    producer, fn, shape, n = FOLDED[case]
    model = Affine(producer(), fn, 4).eval()
    inputs = (torch.randn(shape),)
    gm = fxopt.capture(model, inputs, mode=mode)
    before = count_kinds(gm)
    gm, record = _run_pass("fold_bn", gm, inputs)
    after = count_kinds(gm)
    assert record.modified and record.stats == {"folded_bn": 0, "folded_affine": n}
    assert sum(after[k] for k in AFFINE_KINDS) == 0
    assert after == Counter({k: v for k, v in before.items() if k not in AFFINE_KINDS})
    # the constants are in the weights now, and no longer kept
    consts = ("s_", "t_")
    assert not [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith(consts)]
    assert not [k for k in gm.state_dict() if k.startswith(consts)]
    gm.graph.lint()
    _check_outputs(model, gm, inputs)
    assert _run_pass("fold_bn", gm, inputs)[1].modified is False


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(NOT_FOLDED))
def test_fold_bn_leaves_other_arithmetic_alone(case, mode) -> None:
    producer, fn, shape = NOT_FOLDED[case]
    model = Affine(producer(), fn, 4).eval()
    inputs = (torch.randn(shape),)
    gm = fxopt.capture(model, inputs, mode=mode)
    kinds, code = count_kinds(gm), gm.code
    gm, record = _run_pass("fold_bn", gm, inputs)
    assert record.modified is False
    assert record.stats == {"folded_bn": 0, "folded_affine": 0}
    assert count_kinds(gm) == kinds and gm.code == code
    gm.graph.lint()
    _check_outputs(model, gm, inputs)


def test_fold_bn_folds_bn_then_the_affine_after_it() -> None:
    for mode in MODES:
        conv = nn.Conv2d(3, 4, 3, padding=1)
        model = Affine(
            nn.Sequential(conv, _randomize_bn(nn.BatchNorm2d(4))),
            lambda s, y: y * s.s_c11 + s.t_c11,
            4,
        ).eval()
        inputs = (torch.randn(IMG6),)
        gm = fxopt.capture(model, inputs, mode=mode)
        gm, record = _run_pass("fold_bn", gm, inputs)
        assert record.stats == {"folded_bn": 1, "folded_affine": 2}
        assert count_kinds(gm) == Counter({"conv": 1})
        gm.graph.lint()
        _check_outputs(model, gm, inputs)


# --------------------------------------------------------------------------- default pipeline
def test_the_default_pipeline_is_the_documented_one() -> None:
    assert PIPELINES["default"][:4] == ["cleanup", "fold_constants", "fold_bn", "cse"]
    assert PIPELINES["default"][-2:] == ["cleanup", "flatten_modules"]


@pytest.mark.parametrize(("name", "mode"), ZOO_CASES, ids=[f"{n}-{m}" for n, m in ZOO_CASES])
def test_the_default_pipeline_on_the_zoo(name, mode, zoo_case) -> None:
    model, inputs, gm = zoo_case(name, mode)
    bns = len(_bn_nodes(gm))
    refusable = bns - len(_foldable(gm))
    res = fxopt.optimize(gm, inputs, "default")
    out = res.module
    assert [r.name for r in res.report] == [p.split("(")[0] for p in PIPELINES["default"]]
    assert _foldable(out) == []
    assert len(_bn_nodes(out)) == refusable
    out.graph.lint()
    _check_outputs(model, out, inputs)
    if bns:
        fold = next(r for r in res.report if r.name == "fold_bn")
        assert fold.modified and fold.stats["folded_bn"] == bns - refusable
        assert res.report[-1].params[1] < res.report[0].params[0]


def test_the_default_pipeline_folds_a_bn_behind_a_computed_weight() -> None:
    """fold_bn alone refuses (the weight is computed); fold_constants first makes it a buffer."""
    for mode in MODES:
        model, inputs = ComputedWeight("weight").eval(), (torch.randn(IMG),)
        res = fxopt.optimize(model, inputs, "default", mode=mode)
        kinds = count_kinds(res.module)
        assert kinds["batch_norm"] == 0 and kinds["mul"] == 0 and kinds["conv"] == 1
        _check_outputs(model, res.module, inputs)
