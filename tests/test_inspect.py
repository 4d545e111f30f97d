"""fxopt.inspect: node table, params and MACs (checked against hand counts), networkx,
Graphviz pictures and graph diffs, on the zoo in both capture modes."""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import shutil
import stat
import sys
import types
from pathlib import Path

import networkx as nx
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import zoo
from fxopt.capture import annotate
from fxopt.errors import CaptureError, FxoptError
from fxopt.manager import graph_stats

# The module objects (``fxopt.inspect`` itself is a plain function in fxopt/__init__.py).
fi = importlib.import_module("fxopt.inspect")
fv = importlib.import_module("fxopt.visualize")
MODES = ("symbolic", "export")


def _rows(summary: fi.ModelSummary) -> dict[str, fi.NodeRow]:
    return {r.name: r for r in summary.rows}


# --------------------------------------------------------------------------- hand counts
def _hand_macs(model: nn.Module, inputs: tuple) -> dict[str, dict[str, int]]:
    """MACs per kind and module path, from forward hooks on the eager model.

    conv: out.numel * Cin/groups * kh * kw; conv_transpose: in.numel * Cout/groups * kh * kw;
    linear: out.numel * in_features; attention, per query head and summed over heads:
    q @ k^T is L * S * head_dim and attn @ v is L * S * head_dim, so B * L * S * E * 2 in all.
    nn.MultiheadAttention adds its q/k/v projections and the output projection.
    """
    hand: dict[str, dict[str, int]] = {}

    def hook(path: str, m: nn.Module, args: tuple, out) -> None:
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            n = {"conv": out.numel() * m.in_channels // m.groups * kh * kw}
        elif isinstance(m, nn.ConvTranspose2d):
            kh, kw = m.kernel_size
            n = {"conv_transpose": args[0].numel() * m.out_channels // m.groups * kh * kw}
        elif isinstance(m, nn.Linear):
            n = {"linear": out.numel() * m.in_features}
        elif isinstance(m, nn.MultiheadAttention):
            assert m.batch_first
            (b, length, e), source = args[0].shape, args[1].shape[1]
            proj = b * (length + 2 * source) * e * e + b * length * e * e
            n = {"attention_proj": proj, "attention_core": b * length * source * e * 2}
        elif isinstance(m, zoo.GroupedQueryAttention):
            b, length, _ = args[0].shape
            n = {"attention_core": b * m.heads * length * length * m.head_dim * 2}
        else:
            return
        for kind, macs in n.items():
            hand.setdefault(kind, {})[path] = hand.get(kind, {}).get(path, 0) + macs

    handles = [
        m.register_forward_hook(functools.partial(hook, p)) for p, m in model.named_modules()
    ]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return hand


def _total(hand: dict[str, dict[str, int]], kind: str) -> int:
    return sum(hand.get(kind, {}).values())


def _macs_per_module(summary: fi.ModelSummary, kind: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in summary.rows:
        if r.kind == kind:
            out[r.module_path] = out.get(r.module_path, 0) + r.macs
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["resnet", "mobilenet", "decoder"])
def test_conv_macs_match_a_hand_count_layer_by_layer(name: str, mode: str, zoo_case) -> None:
    model, inputs, gm = zoo_case(name, mode)
    summary = fi.inspect(gm)
    hand = _hand_macs(model, inputs)
    if name == "mobilenet":  # the grouped cases this test exists for are really there
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert any(m.groups == m.in_channels > 1 for m in convs)
        assert any(1 < m.groups < m.in_channels for m in convs)
    if name == "decoder":
        assert len(hand["conv_transpose"]) == 2
    for kind in ("conv", "conv_transpose", "linear"):
        assert _macs_per_module(summary, kind) == hand.get(kind, {}), kind
        assert summary.macs_by_kind.get(kind, 0) == _total(hand, kind), kind
    assert summary.macs == sum(_total(hand, k) for k in hand)


@pytest.mark.parametrize("mode", MODES)
def test_linear_macs_and_params_of_the_mlp(mode: str, zoo_case) -> None:
    model, inputs, gm = zoo_case("mlp", mode)
    summary = fi.inspect(gm)
    hand = _hand_macs(model, inputs)
    expected = {"net.0": 4 * 128 * 64, "net.3": 4 * 128 * 128, "net.6": 4 * 10 * 128}
    assert _macs_per_module(summary, "linear") == hand["linear"] == expected
    assert summary.macs == summary.macs_by_kind["linear"] == _total(hand, "linear") == 103_424
    linear_params = {r.module_path: r.params for r in summary.rows if r.kind == "linear"}
    assert linear_params == {"net.0": 64 * 128 + 128, "net.3": 128 * 128 + 128, "net.6": 1290}
    assert summary.params == sum(p.numel() for p in model.parameters()) == 26_122


@pytest.mark.parametrize("mode", MODES)
def test_transformer_attention_macs_match_a_hand_count(mode: str, zoo_case) -> None:
    model, inputs, gm = zoo_case("transformer", mode)
    summary = fi.inspect(gm)
    hand = _hand_macs(model, inputs)
    proj, core, linear = (_total(hand, k) for k in ("attention_proj", "attention_core", "linear"))
    by_kind = summary.macs_by_kind
    if mode == "symbolic":  # nn.MultiheadAttention is one call_module node
        assert _macs_per_module(summary, "attention") == {
            p: hand["attention_proj"][p] + hand["attention_core"][p] for p in hand["attention_core"]
        }
        assert by_kind["attention"] == proj + core
        assert by_kind["linear"] == linear
    else:  # decomposed: in/out projections are aten.linear, the core is SDPA
        assert "attention" not in summary.kinds
        assert _macs_per_module(summary, "scaled_dot_product") == hand["attention_core"]
        assert by_kind["scaled_dot_product"] == core == 2 * 2 * 16 * 16 * 64 * 2
        assert by_kind["linear"] == linear + proj
    assert summary.macs == proj + core + linear


def test_transformer_macs_agree_between_capture_modes(zoo_case) -> None:
    symbolic = fi.inspect(zoo_case("transformer", "symbolic")[2])
    export = fi.inspect(zoo_case("transformer", "export")[2])
    assert symbolic.macs == export.macs == 3_481_600
    assert symbolic.params == export.params


@pytest.mark.parametrize("mode", MODES)
def test_gqa_counts_every_query_head(mode: str, zoo_case) -> None:
    model, inputs, gm = zoo_case("gqa", mode)
    summary = fi.inspect(gm)
    hand = _hand_macs(model, inputs)
    # 2 blocks x batch 2 x 4 query heads x 16 x 16 scores x head_dim 16 x (qk + av)
    assert _macs_per_module(summary, "scaled_dot_product") == hand["attention_core"]
    assert summary.macs_by_kind["scaled_dot_product"] == 2 * 65_536
    assert _macs_per_module(summary, "linear") == hand["linear"]
    assert summary.macs == _total(hand, "attention_core") + _total(hand, "linear")


class MatMuls(nn.Module):
    def forward(self, a, b, c):
        x = torch.matmul(a, b)  # (2, 4, 6) @ (6, 5): broadcast
        y = torch.bmm(x, c)  # (2, 4, 5) @ (2, 5, 7)
        z = y @ y.transpose(1, 2)  # (2, 4, 7) @ (2, 7, 4)
        w = z.matmul(a)  # (2, 4, 4) @ (2, 4, 6)
        return torch.mm(w[0], b)  # (4, 6) @ (6, 5)


@pytest.mark.parametrize("mode", MODES)
def test_matmul_macs_match_a_hand_count(mode: str) -> None:
    inputs = (torch.randn(2, 4, 6), torch.randn(6, 5), torch.randn(2, 5, 7))
    summary = fi.inspect(fxopt.capture(MatMuls(), inputs, mode=mode))
    rows = [r for r in summary.rows if r.kind == "matmul"]
    hand = [2 * 4 * 5 * 6, 2 * 4 * 7 * 5, 2 * 4 * 4 * 7, 2 * 4 * 6 * 4, 4 * 5 * 6]
    assert [r.macs for r in rows] == hand
    assert summary.macs == summary.macs_by_kind["matmul"] == sum(hand)


class WeightFirstMatMul(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))
        self.v = nn.Parameter(torch.randn(6))

    def forward(self, a):
        p = self.w @ a  # (3, 4) @ (2, 4, 6) -> (2, 3, 6): 144 MACs
        q = self.v @ a.transpose(1, 2)  # (6,) @ (2, 6, 4) -> (2, 4): 48 MACs
        r = torch.matmul(a[0, 0], a[0, 1])  # (6,) . (6,): 6 MACs
        return p, q, r


@pytest.mark.parametrize("mode", MODES)
def test_matmul_macs_with_a_weight_or_vector_first_operand(mode: str) -> None:
    summary = fi.inspect(fxopt.capture(WeightFirstMatMul(), (torch.randn(2, 4, 6),), mode=mode))
    assert [r.macs for r in summary.rows if r.kind == "matmul"] == [144, 48, 6]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["resnet", "mobilenet", "transformer", "gqa", "mlp"])
def test_totals_agree_with_graph_stats(name: str, mode: str, zoo_case) -> None:
    gm = zoo_case(name, mode)[2]
    summary = fi.inspect(gm)
    _, weights, macs = graph_stats(gm)
    assert (summary.params, summary.macs) == (weights, macs)
    assert summary.nodes == len(gm.graph.nodes)
    assert summary.opaque == []


# --------------------------------------------------------------------------- the table
@pytest.mark.parametrize("mode", MODES)
def test_table_shows_every_node_with_shapes_and_totals(mode: str, zoo_case) -> None:
    _, _, gm = zoo_case("mlp", mode)
    summary = fi.inspect(gm)
    rows = _rows(summary)
    assert rows["x"].op == "placeholder" and rows["x"].shape == (4, 64)
    assert rows["output"].shape == (4, 10) and rows["output"].dtype == "float32"
    assert summary.kinds == {"linear": 3, "dropout": 2, "relu": 1, "gelu": 1}
    assert summary.ops == 7
    text = str(summary)
    lines = text.splitlines()
    assert lines[0] == f"{summary.name} (captured with {mode})"
    assert lines[1].split() == list(fi._COLUMNS)
    body = lines[3 : lines.index(lines[2], 3)]
    assert [line.split()[0] for line in body] == [r.name for r in summary.shown()]
    assert "26,122" in text and "103,424" in text and "opaque: none" in text
    first_linear = next(line for line in body if " linear " in line)
    assert "[4, 128]" in first_linear and "8.32k" in first_linear and "32.77k" in first_linear


def test_long_targets_are_cut_and_weights_fold_into_their_ops(zoo_case) -> None:
    _, _, gm = zoo_case("transformer", "export")
    summary = fi.inspect(gm)
    short = summary.table(max_width=20)
    assert "aten.scaled_dot_p..." in short
    path = "blocks.0.attn.out_proj"  # module paths keep their informative tail
    assert f" ...{path[-17:]} " in summary.table(max_width=20, weights=True)
    assert all(len(cell) <= 20 for line in short.splitlines()[3:40] for cell in line.split("  "))
    # 30 get_attr nodes: their tensors are counted on the ops that read them.
    assert sum(r.op == "get_attr" for r in summary.rows) == 30
    assert len(summary.shown()) == summary.nodes - 30
    assert len(summary.shown(weights=True)) == summary.nodes
    assert "111 (79 ops, 30 get_attr)" in str(summary)
    assert _rows(summary)["embedding"].params == 100 * 64


def test_multi_output_nodes_and_json(zoo_case) -> None:
    _, _, gm = zoo_case("transformer", "symbolic")
    summary = fi.inspect(gm)
    attn = _rows(summary)["blocks_0_attn"]
    assert attn.kind == "attention" and attn.form == "module"
    assert attn.shape == [(2, 16, 64), None]  # (output, weights) with need_weights=False
    assert "([2, 16, 64], -)" in str(summary)
    data = json.loads(json.dumps(summary.to_dict()))
    assert data["totals"]["macs"] == summary.macs and data["totals"]["params"] == summary.params
    assert data["totals"]["kinds"]["dropout"] == 7
    row = next(r for r in data["rows"] if r["name"] == "blocks_0_attn")
    assert row["shape"] == [[2, 16, 64], None] and row["dtype"] == ["float32", None]
    assert row["module_path"] == "blocks.0.attn" and row["inputs"] == ["blocks_0_norm1"]


def test_markdown(zoo_case) -> None:
    summary = fi.inspect(zoo_case("mlp", "symbolic")[2])
    md = summary.to_markdown().splitlines()
    assert md[0] == f"### {summary.name}"
    assert md[2] == "| " + " | ".join(fi._COLUMNS) + " |"
    table = [line for line in md if line.startswith("|")]
    assert len(table) == 2 + summary.nodes
    assert md[4].startswith("| x | placeholder |")
    assert md[5].startswith("| net_0 | linear | module |")
    assert "- **params**: 26,122 (26.12k), each tensor once" in md


class Tied(nn.Module):
    """Embedding tied to the output head, and one matrix used by two F.linear calls."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, ids):
        h = F.linear(F.linear(self.emb(ids), self.w), self.w)
        return self.head(h)


@pytest.mark.parametrize("mode", MODES)
def test_shared_weights_are_counted_once(mode: str) -> None:
    gm = fxopt.capture(Tied(), (torch.randint(0, 10, (2, 5)),), mode=mode)
    summary = fi.inspect(gm)
    assert summary.name == "Tied" and summary.frontend == mode
    ops = [r for r in summary.rows if r.op.startswith("call")]
    assert [r.kind for r in ops] == ["embedding", "linear", "linear", "linear"]
    assert [r.params for r in ops] == [80, 64, 64, 80]
    assert summary.params == 80 + 64
    assert sum(r.params for r in summary.rows if r.op == "get_attr") == 0
    assert summary.macs == 2 * 5 * 8 * 8 * 2 + 2 * 5 * 10 * 8


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return torch.special.erfinv(x.clamp(-0.5, 0.5)) * 2, self.scale


def test_opaque_ops_and_output_only_weights() -> None:
    gm = fxopt.capture(Odd(), (torch.randn(2, 3),), mode="symbolic")
    summary = fi.inspect(gm)
    assert summary.opaque == ["special_erfinv"]
    assert "opaque: special_erfinv (torch._C._special.special_erfinv)" in str(summary)
    assert _rows(summary)["scale"].params == summary.params == 3  # read by no op: on its own row
    dot = fv.to_dot(gm)
    assert '"special_erfinv" [' in dot and 'color="#c92a2a"' in dot


def test_graphs_without_shapes_and_plain_modules(zoo_case) -> None:
    model, inputs, _ = zoo_case("mlp", "symbolic")
    bare = fx.symbolic_trace(copy.deepcopy(model))
    summary = fi.inspect(bare)
    assert summary.macs == 0 and summary.params == 26_122
    assert "no shapes recorded" in str(summary)
    assert fi.inspect(bare, inputs).macs == 103_424  # example_inputs annotate the graph
    assert fi.inspect(model, inputs).macs == 103_424  # a plain module is captured first
    with pytest.raises(CaptureError, match="example_inputs"):
        fi.inspect(model)


def test_fxopt_inspect_is_a_plain_function(zoo_case) -> None:
    gm = zoo_case("mlp", "symbolic")[2]
    assert str(fxopt.inspect(gm)) == str(fi.inspect(gm))
    assert isinstance(fxopt.inspect, types.FunctionType)
    assert type(fi) is types.ModuleType  # no callable-module class swap
    # the documented picture calls still work through the function
    assert fxopt.inspect.to_dot is fv.to_dot and fxopt.inspect.diff is fv.diff
    assert fxopt.inspect.render is fv.render and fxopt.inspect.to_networkx is fv.to_networkx


def test_inspect_and_visualize_import_one_way() -> None:
    """visualize builds on inspect; inspect never imports visualize (no cycle)."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(fi.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "fxopt.visualize" not in imported and "fxopt" not in imported
    assert not hasattr(fi, "render")


@pytest.mark.parametrize("name", ["resnet", "mlp"])
def test_by_module_adds_up(name: str, zoo_case) -> None:
    summary = fi.inspect(zoo_case(name, "symbolic")[2])
    parts = summary.by_module(1)
    assert sum(p["macs"] for p in parts.values()) == summary.macs
    assert sum(p["nodes"] for p in parts.values()) == summary.nodes
    if name == "resnet":
        assert parts["layer1"]["macs"] == 2 * 4_718_592


# --------------------------------------------------------------------------- networkx
@pytest.mark.parametrize("mode", MODES)
def test_networkx_graph_mirrors_the_fx_graph(mode: str, zoo_case) -> None:
    _, _, gm = zoo_case("resnet", mode)
    g = fv.to_networkx(gm)
    assert isinstance(g, nx.DiGraph) and nx.is_directed_acyclic_graph(g)
    assert list(g.nodes) == [n.name for n in gm.graph.nodes]
    expected = {(a.name, n.name) for n in gm.graph.nodes for a in n.all_input_nodes}
    assert set(g.edges) == expected
    nodes = {n.name: n for n in gm.graph.nodes}
    for src, _, data in g.edges(data=True):
        assert data["shape"] == nodes[src].meta["shape"]
    assert sum(d["macs"] for _, d in g.nodes(data=True)) == g.graph["macs"] == graph_stats(gm)[2]
    conv = next(n for n, d in g.nodes(data=True) if d["kind"] == "conv")
    assert g.nodes[conv]["module_path"] == "stem.0" and g.nodes[conv]["params"] == 16 * 3 * 9
    assert nx.dag_longest_path(g)[-1] == "output"


# --------------------------------------------------------------------------- Graphviz
def _dot_nodes_and_edges(dot: str) -> tuple[set[str], set[tuple[str, str]]]:
    nodes, edges = set(), set()
    for line in dot.splitlines():
        line = line.strip()
        if " -> " in line:
            src, _, rest = line.partition(" -> ")
            edges.add((src.strip('"'), rest.split(" [")[0].strip('"')))
        elif line.startswith('"') and line.endswith("];"):
            nodes.add(line.split('" [')[0][1:])
    return nodes, edges


def _check_dot_syntax(dot: str) -> None:
    assert dot.startswith("digraph ") and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    nodes, edges = _dot_nodes_and_edges(dot)
    assert all(a in nodes and b in nodes for a, b in edges), "edge to an undeclared node"


@pytest.mark.parametrize("mode", MODES)
def test_to_dot_labels_colours_and_clusters(mode: str, zoo_case) -> None:
    _, _, gm = zoo_case("resnet", mode)
    dot = fv.to_dot(gm, highlight={"output": "red"})
    _check_dot_syntax(dot)
    nodes, edges = _dot_nodes_and_edges(dot)
    calls = {n.name for n in gm.graph.nodes if n.op != "get_attr"}
    assert nodes == calls  # export-mode weights (get_attr) are hidden by default
    assert edges == {
        (a.name, n.name) for n in gm.graph.nodes for a in n.all_input_nodes if a.op != "get_attr"
    }
    conv = next(n for n in gm.graph.nodes if fxopt.ops.kind_of(n) == "conv")
    line = next(line for line in dot.splitlines() if line.strip().startswith(f'"{conv.name}" ['))
    assert f"{conv.name}\\nconv\\n[2, 16, 32, 32]\\n884.74k MACs" in line
    assert 'fillcolor="#8ecae6"' in line
    assert 'label="[2, 3, 32, 32]"' in next(line for line in dot.splitlines() if '"x" -> ' in line)
    output = next(line for line in dot.splitlines() if line.strip().startswith('"output" ['))
    assert 'fillcolor="red"' in output and 'penwidth="3"' in output
    for top in ("stem", "layer1", "layer2", "layer3"):
        assert f'label="{top}"; style="rounded,dashed"' in dot
    weights = fv.to_dot(gm, show_weights=True, clusters=False)
    _check_dot_syntax(weights)
    assert _dot_nodes_and_edges(weights)[0] == {n.name for n in gm.graph.nodes}
    assert "subgraph" not in weights


def test_to_dot_rejects_unknown_highlights_and_escapes_text(zoo_case) -> None:
    gm = zoo_case("mlp", "symbolic")[2]
    with pytest.raises(FxoptError, match="net_9"):
        fv.to_dot(gm, highlight={"net_9": "red"})

    class Quoted(nn.Module):
        def extra_repr(self) -> str:
            return 'say "hi" \\ bye'

        def forward(self, x):
            return x + 1

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = Quoted()

        def forward(self, x):
            return self.q(x)

    gm = fxopt.capture(Wrap(), (torch.randn(2),), mode="symbolic", leaf_modules=[Quoted])
    assert _rows(fi.inspect(gm))["q"].target == 'Quoted(say "hi" \\ bye)'
    dot = fv.to_dot(gm)
    assert 'tooltip="Quoted(say \\"hi\\" \\\\ bye) @ q"' in dot
    _check_dot_syntax(dot)


@pytest.fixture
def no_dot(monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None if cmd == "dot" else real(cmd))


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_render_without_graphviz_writes_dot_and_says_what_to_do(
    tmp_path: Path, no_dot, zoo_case
) -> None:
    gm = zoo_case("mlp", "symbolic")[2]
    res = fv.render(gm, tmp_path / "out" / "model.svg")
    assert res.dot_path == tmp_path / "out" / "model.dot" and res.image_path is None
    assert res.dot_path.read_text() == fv.to_dot(gm)
    assert "Graphviz 'dot' is not installed" in res.message
    assert "apt-get install graphviz" in res.message
    assert f"dot -Tsvg {res.dot_path} -o {tmp_path / 'out' / 'model.svg'}" in str(res)
    assert not (tmp_path / "out" / "model.svg").exists()
    assert _leftovers(tmp_path / "out") == []
    # path without a suffix, or ending in .dot, names the same files
    assert fv.render(gm, tmp_path / "out" / "model").dot_path == res.dot_path
    assert fv.render(gm, tmp_path / "out" / "model.dot", format="png").dot_path == res.dot_path


FAKE_DOT = """#!{python}
import sys
args = sys.argv[1:]
if "{mode}" == "fail":
    sys.stderr.write("Error: <stdin>: syntax error in line 1\\n")
    sys.exit(1)
fmt, src, out = args[0][2:], args[1], args[args.index("-o") + 1]
with open(out, "w") as f:
    f.write("<" + fmt + ">" + str(len(open(src).read())) + "</" + fmt + ">")
"""


def _fake_dot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    exe = tmp_path / "bin" / "dot"
    exe.parent.mkdir()
    exe.write_text(FAKE_DOT.replace("{python}", sys.executable).replace("{mode}", mode))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: str(exe) if cmd == "dot" else None)


@pytest.mark.skipif(os.name == "nt", reason="the fake dot is a shebang script")
def test_render_runs_dot_when_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zoo_case
) -> None:
    _fake_dot(tmp_path, monkeypatch, "ok")
    gm = zoo_case("mlp", "export")[2]
    res = fv.render(gm, tmp_path / "pics" / "mlp.svg")
    assert res.image_path == tmp_path / "pics" / "mlp.svg"
    assert res.image_path.read_text() == f"<svg>{len(fv.to_dot(gm))}</svg>"
    assert res.message == f"wrote {res.dot_path} and {res.image_path}"
    assert fv.render(gm, tmp_path / "pics" / "mlp", format="png").image_path.read_text()[:5] == (
        "<png>"
    )
    assert _leftovers(tmp_path / "pics") == []


@pytest.mark.skipif(os.name == "nt", reason="the fake dot is a shebang script")
def test_render_reports_a_failing_dot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zoo_case
) -> None:
    _fake_dot(tmp_path, monkeypatch, "fail")
    with pytest.raises(FxoptError, match=r"exit code 1.*syntax error in line 1.*dot -Tsvg"):
        fv.render(zoo_case("mlp", "symbolic")[2], tmp_path / "m.svg")
    assert (tmp_path / "m.dot").exists() and not (tmp_path / "m.svg").exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")
def test_render_with_real_graphviz(tmp_path: Path, zoo_case) -> None:
    _, _, gm = zoo_case("transformer", "symbolic")
    res = fv.render(gm, tmp_path / "t.svg")
    assert "<svg" in res.image_path.read_text()
    d = fv.diff(gm, fxopt.optimize(gm, zoo_case("transformer", "symbolic")[1]).module)
    assert "<svg" in d.render(tmp_path / "d").image_path.read_text()


def test_render_into_an_unwritable_place_raises(tmp_path: Path, no_dot, zoo_case) -> None:
    gm = zoo_case("mlp", "symbolic")[2]
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    with pytest.raises(FxoptError, match="cannot write .*file.txt"):
        fv.render(gm, blocker / "model.svg")
    with pytest.raises(FxoptError, match="Graphviz format"):
        fv.render(gm, tmp_path / "m", format="svg; rm -rf /")
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(FxoptError, match="writable"):
                fv.render(gm, locked / "model.svg")
            assert list(locked.iterdir()) == []
        finally:
            locked.chmod(0o700)


# --------------------------------------------------------------------------- diff
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["transformer", "mlp"])
def test_diff_after_cleanup_lists_the_removed_dropouts(name: str, mode: str, zoo_case) -> None:
    model, inputs, before = zoo_case(name, mode)
    after = fxopt.optimize(model, inputs, "default", mode=mode).module
    d = fv.diff(before, after)
    dropouts = [n.name for n in before.graph.nodes if fxopt.ops.kind_of(n) == "dropout"]
    assert len(dropouts) == {"transformer": 7, "mlp": 2}[name]
    # cleanup may learn to drop more no-ops; the dropouts must be among what it removed
    assert [r.name for r in d.removed if r.kind == "dropout"] == dropouts
    assert d.counts()["removed"]["dropout"] == len(dropouts)
    assert not any(r.kind == "dropout" for r in d.after.rows + d.added)
    kept = [n.name for n in after.graph.nodes if n.name not in {r.name for r in d.added}]
    assert [r.name for r in d.kept] == kept
    assert len(d.kept) + len(d.removed) == d.before.nodes
    text = str(d)
    assert f"- {len(dropouts)} dropout" in text.split("removed:")[1].splitlines()[0]
    removed_names = next(line for line in text.splitlines() if "removed nodes:" in line)
    assert set(dropouts) <= set(removed_names.split(": ", 1)[1].split(", "))
    assert f"MACs:    {d.before.macs:,} -> {d.after.macs:,} (+0)" in text
    dot = d.to_dot()
    _check_dot_syntax(dot)
    nodes, edges = _dot_nodes_and_edges(dot)
    assert {f"removed:{n}" for n in dropouts} <= nodes
    removed_line = next(line for line in dot.splitlines() if f'"removed:{dropouts[0]}" [' in line)
    assert 'style="dashed,filled"' in removed_line and 'color="#c92a2a"' in removed_line
    # the removed node hangs between its old producer and consumer
    old = next(n for n in before.graph.nodes if n.name == dropouts[0])
    assert (old.all_input_nodes[0].name, f"removed:{old.name}") in edges


def test_diff_of_hand_edits_reports_added_and_changed_nodes(zoo_case) -> None:
    _, inputs, before = zoo_case("mlp", "symbolic")
    after = zoo_case("mlp", "symbolic")[2]  # a private copy, free to edit
    # same module path, fewer params: kept but "changed"
    setattr(after.get_submodule("net"), "6", nn.Linear(128, 10, bias=False))
    last = next(n for n in after.graph.nodes if n.name == "net_6")
    with after.graph.inserting_after(last):
        relu = after.graph.call_function(torch.relu, (last,))
    last.replace_all_uses_with(relu, delete_user_cb=lambda user: user is not relu)
    dropout = next(n for n in after.graph.nodes if n.name == "net_2")
    dropout.replace_all_uses_with(dropout.args[0])
    after.graph.erase_node(dropout)
    after.recompile()
    annotate(after, inputs)
    d = fv.diff(before, after)
    assert [r.name for r in d.added] == [relu.name] and d.added[0].kind == "relu"
    assert [r.name for r in d.removed] == ["net_2"]
    assert [(old.params, new.params) for old, new in d.changed] == [(1290, 1280)]
    text = str(d)
    assert "added:   + 1 relu" in text and "removed: - 1 dropout" in text
    assert "changed net_6: params 1290 -> 1280" in text
    assert "params:  26,122 -> 26,112 (-10)" in text
    dot = d.to_dot()
    _check_dot_syntax(dot)
    added_line = next(line for line in dot.splitlines() if f'"{relu.name}" [' in line)
    assert 'fillcolor="#8ce99a"' in added_line
    assert ("net_6", relu.name) in _dot_nodes_and_edges(dot)[1]
