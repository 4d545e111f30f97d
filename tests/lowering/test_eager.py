"""The eager backend: lower -> folder -> load, identical outputs, no pickle, safe failures."""

from __future__ import annotations

import json
import pickle

import pytest
import safetensors.torch
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxopt.errors import InputSpecError, LoweringError
from fxopt.lowering import load, lower
from fxopt.lowering.graph_json import graph_from_json, graph_to_json

torch.manual_seed(0)


# --------------------------------------------------------------------------- models


class ResCNN(nn.Module):
    """Conv + BN + ReLU, a residual add, a channel cat, pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(8, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.bn1(self.conv1(x)))
        x = torch.cat([x, self.branch(x)], dim=1)
        return self.fc(torch.flatten(self.pool(x), 1))


class Block(nn.Module):
    """Pre-norm transformer block: nn.MultiheadAttention, then SDPA by hand, then a GELU MLP."""

    def __init__(self, d: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln2(x)).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln3(x))


class Methods(nn.Module):
    """Method calls, getattr(x, "shape"), slices, Ellipsis, dtypes, devices and infinities."""

    def forward(self, x):
        n = x.shape[0]  # getattr(x, "shape") in the graph
        y = x.view(n, -1).transpose(0, 1).contiguous(memory_format=torch.contiguous_format)
        z = x.flatten(1)[..., 1:7:2].to(torch.float64).clamp(min=float("-inf"), max=10.0)
        m = x.flatten(1).masked_fill(x.flatten(1) > 2.5, float("-inf"))
        w = x.new_zeros((2, 3), dtype=torch.float16, device=torch.device("cpu"))
        return y.t() * 2, z, m, w, x.size(1)


class Tied(nn.Module):
    """Tied embedding/head weights, a buffer that views another, a non-contiguous buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight
        self.act = nn.ReLU()
        self.register_buffer("big", torch.randn(5, 8))
        self.register_buffer("part", self.big[1:2])
        self.register_buffer("tr", torch.randn(8, 8).t())

    def forward(self, idx):
        h = self.act(self.emb(idx)) + self.part
        return self.head(self.act(h @ self.tr + self.big))


class WithConstant(nn.Module):
    def forward(self, x):
        return x * torch.tensor([1.0, -2.0, 3.0]) + 1


class Wrap(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x)


class Wrap3(Wrap):
    def forward(self, q, k, v):
        return self.m(q, k, v)


def _trained(m: nn.Module, *inputs) -> nn.Module:
    """A few train-mode batches so BN statistics are data-driven, then eval."""
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(*(x * (1 + torch.rand(())) if x.is_floating_point() else x for x in inputs))
    return m.eval()


def _export(m: nn.Module, args: tuple, dynamic_shapes=None) -> fx.GraphModule:
    return torch.export.export(m, args, strict=False, dynamic_shapes=dynamic_shapes).module()


def _assert_same(got, want) -> None:
    g, gs = torch.utils._pytree.tree_flatten(got)
    w, ws = torch.utils._pytree.tree_flatten(want)
    assert gs == ws
    for a, b in zip(g, w, strict=True):
        if isinstance(b, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)
        else:
            assert a == b


@pytest.fixture
def no_pickle(monkeypatch):
    """Makes any unpickling during the test an error."""

    def refuse(*args, **kwargs):
        raise AssertionError("pickle/torch.load used while loading an artifact")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)

    class Refusing(pickle.Unpickler):
        __init__ = refuse

    monkeypatch.setattr(pickle, "Unpickler", Refusing)
    monkeypatch.setattr(torch, "load", refuse)


def _leftovers(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _roundtrip(gm, inputs, path, fresh=None, monkeypatch=None):
    with torch.no_grad():
        want = gm(*inputs)
    art = lower(gm, "eager", inputs, path=path)
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["model.py", "graph.json", "weights.safetensors", "manifest.json"]
    )
    assert _leftovers(path.parent) == []
    _assert_same(art(*inputs), want)
    loaded = load(path)
    assert not loaded.module.training
    _assert_same(loaded(*inputs), want)
    if fresh is not None:
        with torch.no_grad():
            _assert_same(loaded(*fresh), gm(*fresh))
    m = loaded.manifest
    assert m["format"] == "fxopt-eager" and m["format_version"] == 1
    for key in ("fxopt_version", "torch_version", "created", "pipeline", "capture", "modules"):
        assert key in m
    assert m["inputs"][0]["shape"] == list(inputs[0].shape)
    assert m["inputs"][0]["dtype"] == str(inputs[0].dtype).removeprefix("torch.")
    assert len(m["outputs"]) == len(torch.utils._pytree.tree_leaves(want))
    return loaded


# --------------------------------------------------------------------------- round trips

CASES = {
    "cnn": (lambda: ResCNN(), lambda b: (torch.randn(b, 3, 8, 8),)),
    "block": (lambda: Block(), lambda b: (torch.randn(b, 6, 16),)),
    "tied": (lambda: Tied(), lambda b: (torch.randint(0, 10, (b, 5)),)),
    "constant": (lambda: WithConstant(), lambda b: (torch.randn(b, 3),)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_symbolic_trace_roundtrip(name, tmp_path, no_pickle):
    make, inputs = CASES[name]
    m = _trained(make(), *inputs(4))
    gm = fx.symbolic_trace(m)
    _roundtrip(gm, inputs(2), tmp_path / "art", fresh=inputs(5))


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_roundtrip(name, tmp_path, no_pickle):
    make, inputs = CASES[name]
    m = _trained(make(), *inputs(4))
    batch = torch.export.Dim("batch", min=2, max=64)
    gm = _export(m, inputs(3), dynamic_shapes=({0: batch},))
    loaded = _roundtrip(gm, inputs(3), tmp_path / "art", fresh=inputs(7))
    assert "_guards_fn" in loaded.manifest["modules"]


def test_methods_graph_roundtrip(tmp_path, no_pickle):
    gm = fx.symbolic_trace(Methods())
    ops = {(n.op, str(n.target)) for n in gm.graph.nodes}
    assert ("call_method", "view") in ops and (
        "call_function",
        "<built-in function getattr>",
    ) in ops
    x = torch.randn(2, 3, 4)
    x[0, 0, 0] = 3.0
    loaded = _roundtrip(gm, (x,), tmp_path / "art", fresh=(torch.randn(6, 3, 4),))
    assert [n.op for n in loaded.module.graph.nodes] == [n.op for n in gm.graph.nodes]
    assert loaded.module.code == gm.code


def test_tied_and_shared_tensors_are_realiased(tmp_path, no_pickle):
    gm = fx.symbolic_trace(Tied().eval())
    gm.add_module("act_again", gm.act)  # one module object at two paths
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "act")
    node.target = "act_again"
    gm.recompile()
    loaded = _roundtrip(gm, (torch.randint(0, 10, (2, 5)),), tmp_path / "art")
    lm = loaded.module
    assert lm.head.weight is lm.emb.weight
    assert lm.act_again is lm.act
    assert lm.part.untyped_storage().data_ptr() == lm.big.untyped_storage().data_ptr()
    torch.testing.assert_close(lm.tr, gm.tr)
    tensors = loaded.manifest["tensors"]
    assert tensors["head.weight"]["alias_of"] == "emb.weight"
    assert tensors["emb.weight"]["kind"] == "parameter"
    assert tensors["big"]["kind"] == "buffer"
    stored = safetensors.torch.load_file(str(tmp_path / "art" / "weights.safetensors"))
    assert "head.weight" not in stored


def test_plain_tensor_attribute(tmp_path, no_pickle):
    root = nn.Module()
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(torch.mul, (x, g.get_attr("scale"))))
    gm = fx.GraphModule(root, fx.Graph())
    gm.graph = g
    gm.scale = torch.tensor([2.0, 3.0])  # a plain attribute, neither parameter nor buffer
    gm.recompile()
    assert "scale" not in gm._buffers
    loaded = _roundtrip(gm, (torch.ones(2),), tmp_path / "art")
    assert loaded.manifest["tensors"]["scale"]["kind"] == "attribute"
    assert "scale" not in loaded.module._buffers


def test_export_constant_and_cond(tmp_path, no_pickle):
    class Cond(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            y = torch.cond(x.sum() > 0, lambda x: self.a(x).relu(), lambda x: self.b(x) - 1, (x,))
            return y + torch.tensor([1.0, 0.0, 0.0, 2.0])

    gm = _export(Cond().eval(), (torch.ones(2, 4),))
    loaded = _roundtrip(gm, (torch.ones(2, 4),), tmp_path / "art")
    with torch.no_grad():
        _assert_same(loaded(-torch.ones(2, 4)), gm(-torch.ones(2, 4)))
    kinds = {i["kind"] for i in loaded.manifest["tensors"].values()}
    assert "attribute" in kinds  # the lifted constant


def test_export_guard_is_kept_as_data(tmp_path):
    gm = _export(ResCNN().eval(), (torch.randn(2, 3, 8, 8),))
    art = lower(gm, "eager", (torch.randn(2, 3, 8, 8),), path=tmp_path / "art")
    with pytest.raises(InputSpecError, match=r"expected 2 \(static\)"):
        art(torch.randn(3, 3, 8, 8))  # the artifact's input spec refuses it first
    with pytest.raises(InputSpecError, match="exported for 2"):
        art.module(torch.randn(3, 3, 8, 8))  # and the graph's own guard still does


def test_guard_written_under_its_old_module_still_loads(tmp_path):
    # InputGuard lived in fxopt.lowering.graph_json when format_version 1 was first written
    gm = _export(ResCNN().eval(), (torch.randn(2, 3, 8, 8),))
    lower(gm, "eager", (torch.randn(2, 3, 8, 8),), path=tmp_path / "art")
    manifest = tmp_path / "art" / "manifest.json"
    assert json.loads(manifest.read_text())["modules"]["_guards_fn"]["class"] == (
        "fxopt.lowering.input_guard.InputGuard"
    )
    old = "fxopt.lowering.graph_json.InputGuard"
    _edit(manifest, lambda d: d["modules"]["_guards_fn"].update({"class": old}))
    art = load(tmp_path / "art")
    with pytest.raises(InputSpecError, match="exported for 2"):
        art.module(torch.randn(3, 3, 8, 8))
    # only that one recorded move is mapped: other class names stay strict
    _edit(manifest, lambda d: d["modules"]["_guards_fn"].update({"class": old + "X"}))
    with pytest.raises(LoweringError, match="does not exist"):
        load(tmp_path / "art")


def test_pipeline_and_capture_recorded(tmp_path):
    gm = fx.symbolic_trace(ResCNN().eval())
    gm.meta["fxopt"] = {"pipeline": ["cleanup", {"name": "fold_bn"}], "capture": {"mode": "fx"}}
    art = lower(gm, "eager", (torch.randn(1, 3, 8, 8),), path=tmp_path / "art")
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["pipeline"] == ["cleanup", {"name": "fold_bn"}]
    assert manifest["capture"] == {"mode": "fx"}
    assert art.module.meta["fxopt"]["pipeline"] == manifest["pipeline"]
    text = (tmp_path / "art" / "model.py").read_text()
    assert "fxopt.load" in text and "def forward" in text and "Conv2d" in text


def test_training_module_is_not_touched(tmp_path):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).train()
    gm = fx.symbolic_trace(m)
    before = gm.get_submodule("1").running_mean.clone()
    x = torch.randn(2, 3, 6, 6)
    art = lower(gm, "eager", (x,), path=tmp_path / "art")
    assert gm.training and gm.get_submodule("1").training
    torch.testing.assert_close(gm.get_submodule("1").running_mean, before)
    torch.testing.assert_close(art(x), m.eval()(x))


def test_inplace_graph_leaves_example_inputs_alone(tmp_path):
    class Inplace(nn.Module):
        def forward(self, x):
            x.add_(1)
            return x * 2

    x = torch.zeros(3)
    art = lower(fx.symbolic_trace(Inplace()), "eager", (x,), path=tmp_path / "art")
    assert torch.equal(x, torch.zeros(3))
    assert torch.equal(art(torch.zeros(3)), torch.full((3,), 2.0))


def test_save_copies_the_artifact(tmp_path, no_pickle):
    gm = fx.symbolic_trace(ResCNN().eval())
    x = torch.randn(1, 3, 8, 8)
    art = lower(gm, "eager", (x,), path=tmp_path / "a")
    copy = art.save(tmp_path / "b")
    assert copy.path == tmp_path / "b"
    _assert_same(load(tmp_path / "b")(x), art(x))


def test_graph_json_roundtrip_without_files():
    gm = fx.symbolic_trace(Methods())
    doc = json.loads(json.dumps(graph_to_json(gm), allow_nan=False))
    rebuilt = graph_from_json(doc, gm)
    assert rebuilt.code == gm.code


# --------------------------------------------------------------------------- module coverage

MODULES = [
    (nn.Conv1d(3, 4, 3, stride=2, padding=1, bias=False), [(2, 3, 10)]),
    (nn.Conv2d(3, 4, 3, padding="same", dilation=2, padding_mode="reflect"), [(2, 3, 8, 8)]),
    (nn.Conv3d(2, 4, 3, groups=2), [(1, 2, 5, 5, 5)]),
    (nn.ConvTranspose2d(4, 2, 3, stride=2, output_padding=1), [(2, 4, 5, 5)]),
    (nn.Linear(5, 3, bias=False), [(2, 5)]),
    (nn.BatchNorm1d(4, momentum=None), [(3, 4)]),
    (nn.BatchNorm2d(4, affine=False, eps=1e-3), [(2, 4, 3, 3)]),
    (nn.LayerNorm([4, 5], eps=1e-3, bias=False), [(2, 3, 4, 5)]),
    (nn.GroupNorm(2, 4), [(2, 4, 3, 3)]),
    (nn.Embedding(10, 4, padding_idx=0), ["idx"]),
    (
        nn.MultiheadAttention(8, 2, batch_first=True, kdim=6, vdim=5),
        [(2, 3, 8), (2, 4, 6), (2, 4, 5)],
    ),
    (
        nn.MultiheadAttention(8, 2, bias=False, add_bias_kv=True, add_zero_attn=True),
        [(3, 2, 8)] * 3,
    ),
    (nn.ReLU(inplace=True), [(2, 5)]),
    (nn.GELU(approximate="tanh"), [(2, 5)]),
    (nn.Hardswish(), [(2, 5)]),
    (nn.Hardsigmoid(), [(2, 5)]),
    (nn.SiLU(), [(2, 5)]),
    (nn.Sigmoid(), [(2, 5)]),
    (nn.Tanh(), [(2, 5)]),
    (nn.LeakyReLU(0.2), [(2, 5)]),
    (nn.PReLU(3), [(2, 3, 4)]),
    (nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), [(2, 3, 9, 9)]),
    (nn.AvgPool2d(2, count_include_pad=False, divisor_override=3), [(2, 3, 8, 8)]),
    (nn.AdaptiveAvgPool2d((2, None)), [(2, 3, 8, 6)]),
    (nn.Dropout(0.3), [(2, 5)]),
    (nn.Identity(), [(2, 5)]),
    (nn.Flatten(0, -1), [(2, 3, 4)]),
    (nn.Softmax(dim=1), [(2, 5)]),
    (nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), [(1, 2, 3, 4)]),
    (nn.Upsample(size=(5, 7), mode="nearest"), [(1, 2, 3, 4)]),
    (nn.LSTM(4, 6, num_layers=2, batch_first=True, bidirectional=True), [(2, 3, 4)]),
]


@pytest.mark.parametrize(
    "module,shapes", MODULES, ids=[f"{type(m).__name__}{i}" for i, (m, _) in enumerate(MODULES)]
)
def test_leaf_modules_rebuild(module, shapes, tmp_path, no_pickle):
    for p in module.parameters():
        nn.init.normal_(p)  # no all-zero/all-one init that could hide a wrong assignment
    for b in module.buffers():
        if b.is_floating_point():
            b.uniform_(0.5, 1.5)
    inputs = tuple(torch.randint(1, 10, (2, 5)) if s == "idx" else torch.randn(*s) for s in shapes)
    gm = fx.symbolic_trace((Wrap3 if len(inputs) == 3 else Wrap)(module).eval())
    assert any(n.op == "call_module" for n in gm.graph.nodes)
    loaded = _roundtrip(gm, inputs, tmp_path / "art")
    assert type(loaded.module.m) is type(module)
    assert loaded.module.m.extra_repr() == module.extra_repr()
    spec = loaded.manifest["modules"]["m"]
    assert spec["class"].startswith("torch.nn.") and spec["extra_repr"] == module.extra_repr()


# --------------------------------------------------------------------------- errors


class Custom(nn.Module):
    def forward(self, x):
        return x * 2


def test_custom_leaf_module_is_refused(tmp_path):
    class LeafTracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, Custom) or super().is_leaf_module(m, qualname)

    root = nn.Sequential(nn.Linear(3, 3), Custom())
    gm = fx.GraphModule(root, LeafTracer().trace(root))
    with pytest.raises(LoweringError, match="mode='export'") as e:
        lower(gm, "eager", (torch.randn(1, 3),), path=tmp_path / "art")
    assert "Custom" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_parent_is_a_file(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    gm = fx.symbolic_trace(ResCNN().eval())
    with pytest.raises(LoweringError, match="file.txt"):
        lower(gm, "eager", (torch.randn(1, 3, 8, 8),), path=blocker / "sub" / "art")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
    assert blocker.read_text() == "not a folder"


def test_missing_parents_are_created(tmp_path):
    gm = fx.symbolic_trace(ResCNN().eval())
    lower(gm, "eager", (torch.randn(1, 3, 8, 8),), path=tmp_path / "a" / "b" / "art")
    assert (tmp_path / "a" / "b" / "art" / "manifest.json").is_file()


def test_overwrite_previous_artifact(tmp_path):
    path = tmp_path / "art"
    x = torch.randn(1, 3, 8, 8)
    lower(fx.symbolic_trace(ResCNN().eval()), "eager", (x,), path=path)
    second = fx.symbolic_trace(ResCNN().eval())
    lower(second, "eager", (x,), path=path)
    _assert_same(load(path)(x), second(x))
    assert _leftovers(tmp_path) == []


def test_refuse_to_overwrite_other_things(tmp_path):
    gm = fx.symbolic_trace(ResCNN().eval())
    x = (torch.randn(1, 3, 8, 8),)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(LoweringError, match="not an fxopt artifact"):
        lower(gm, "eager", x, path=folder)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    a_file = tmp_path / "model"
    a_file.write_text("data")
    with pytest.raises(LoweringError, match="refusing to overwrite"):
        lower(gm, "eager", x, path=a_file)
    assert a_file.read_text() == "data"
    assert _leftovers(tmp_path) == []


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    gm = fx.symbolic_trace(ResCNN().eval())
    with pytest.raises(LoweringError, match="No space left"):
        lower(gm, "eager", (torch.randn(1, 3, 8, 8),), path=tmp_path / "new" / "art")
    assert list(tmp_path.iterdir()) == []  # neither the temp folder nor the parent it made


def test_failed_overwrite_keeps_previous_artifact(tmp_path, monkeypatch):
    x = torch.randn(1, 3, 8, 8)
    gm = fx.symbolic_trace(ResCNN().eval())
    lower(gm, "eager", (x,), path=tmp_path / "art")
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: 1 / 0)
    with pytest.raises(LoweringError):
        lower(fx.symbolic_trace(ResCNN().eval()), "eager", (x,), path=tmp_path / "art")
    monkeypatch.undo()
    _assert_same(load(tmp_path / "art")(x), gm(x))
    assert _leftovers(tmp_path) == []


def test_constructor_that_does_not_rebuild_is_refused(tmp_path, monkeypatch):
    from fxopt.lowering import eager_rebuild

    monkeypatch.setitem(eager_rebuild._KWARG_RULES, nn.Linear, {"out_features": lambda m: 7})
    gm = fx.symbolic_trace(ResCNN().eval())
    with pytest.raises(LoweringError, match="does not rebuild"):
        lower(gm, "eager", (torch.randn(1, 3, 8, 8),), path=tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


def test_verification_failure_leaves_nothing(tmp_path, monkeypatch):
    save = safetensors.torch.save_file

    def corrupt(tensors, *args, **kwargs):
        save(
            {k: v * 2 if v.is_floating_point() else v for k, v in tensors.items()}, *args, **kwargs
        )

    monkeypatch.setattr(safetensors.torch, "save_file", corrupt)
    gm = fx.symbolic_trace(ResCNN().eval())
    with pytest.raises(LoweringError, match="verification failed"):
        lower(gm, "eager", (torch.randn(1, 3, 8, 8),), path=tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments():
    gm = fx.symbolic_trace(ResCNN().eval())
    x = (torch.randn(1, 3, 8, 8),)
    with pytest.raises(LoweringError, match="path="):
        lower(gm, "eager", x)
    with pytest.raises(LoweringError, match="eager"):
        lower(gm, "tflite", x, path="never")
    with pytest.raises(LoweringError, match="GraphModule"):
        lower(ResCNN(), "eager", x, path="never")


@pytest.fixture
def artifact(tmp_path):
    gm = fx.symbolic_trace(ResCNN().eval())
    lower(gm, "eager", (torch.randn(1, 3, 8, 8),), path=tmp_path / "art")
    return tmp_path / "art"


def _edit(path, fn):
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def test_load_newer_format(artifact):
    _edit(artifact / "manifest.json", lambda d: d.update(format_version=99))
    with pytest.raises(LoweringError, match="upgrade fxopt"):
        load(artifact)


def test_load_missing_file(artifact):
    (artifact / "weights.safetensors").unlink()
    with pytest.raises(LoweringError, match="weights.safetensors is missing"):
        load(artifact)


def test_load_unknown_path(tmp_path):
    with pytest.raises(LoweringError, match="no such"):
        load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoweringError, match="what kind of artifact"):
        load(tmp_path / "empty")


def _set_first(op, key, value):
    def edit(doc):
        node = next(n for n in doc["graph"]["nodes"] if n["op"] == op)
        node[key] = value

    return edit


@pytest.mark.parametrize(
    "op,key,value",
    [
        ("call_function", "target", "os.system"),
        ("call_function", "target", "builtins.eval"),
        ("call_function", "target", "torch.load"),
        ("call_function", "target", "torch._import_dotted_name"),
        ("call_function", "target", "_operator.attrgetter"),
        ("call_method", "target", "view(); import os; os.system('true'); x.view"),
        ("call_method", "target", "__reduce_ex__"),
        ("get_attr", "target", 'fc").x; import os #'),
        ("placeholder", "target", "x=os.system('true')"),
        ("call_function", "kwargs", {"x=os.system('true'), y": 1}),
    ],
)
def test_load_refuses_tampered_graph(tmp_path, op, key, value):
    gm = fx.symbolic_trace(Methods())
    if op == "get_attr":
        gm = fx.symbolic_trace(WithConstant())
    lower(gm, "eager", (torch.randn(2, 3),), path=tmp_path / "art")
    _edit(tmp_path / "art" / "graph.json", _set_first(op, key, value))
    with pytest.raises(LoweringError):
        load(tmp_path / "art")


def test_load_refuses_foreign_class(artifact):
    _edit(artifact / "manifest.json", lambda d: d["modules"]["fc"].update({"class": "os.system"}))
    with pytest.raises(LoweringError, match="not allowed"):
        load(artifact)
