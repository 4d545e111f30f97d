"""Pictures and graph views: networkx export, Graphviz DOT/SVG, and before/after diffs.

Example::

    fxopt.inspect.render(gm, "out/model.svg")      # DOT always, SVG when Graphviz is installed
    print(fxopt.inspect.diff(before, after))       # added / removed nodes by kind
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.fx as fx

from fxopt.errors import FxoptError
from fxopt.graph_utils import human_count
from fxopt.inspect import _CALLS, ModelSummary, NodeRow, _shape_text, inspect
from fxopt.ops import OPAQUE

if TYPE_CHECKING:
    import networkx


def to_networkx(
    gm: fx.GraphModule, example_inputs: Sequence[Any] | None = None
) -> networkx.DiGraph:
    """A ``networkx.DiGraph`` with one node per fx node and an edge per data dependency.

    Node attributes: op, kind, category, form, target, module_path, shape, dtype, params,
    macs. Edge attributes: the producer's shape and dtype. Graph attributes: name, params,
    macs.

    Example::

        g = fxopt.inspect.to_networkx(gm)
        max(g.nodes, key=lambda n: g.nodes[n]["macs"])     # the heaviest op
        networkx.dag_longest_path(g)                        # the critical path
    """
    import networkx as nx

    summary = inspect(gm, example_inputs)
    g = nx.DiGraph(name=summary.name, params=summary.params, macs=summary.macs)
    for r in summary.rows:
        g.add_node(r.name, **{k: v for k, v in vars(r).items() if k not in ("name", "inputs")})
    for r in summary.rows:
        for src in r.inputs:
            g.add_edge(src, r.name, shape=g.nodes[src]["shape"], dtype=g.nodes[src]["dtype"])
    return g


# --------------------------------------------------------------------------- Graphviz
# Fill colour per op category: "colour:category,category ...".
_FILL = {
    category: colour
    for entry in (
        "#8ecae6:conv #95d5b2:linear,matmul #ffd166:attention #cdb4db:norm "
        "#ffe5b4:activation,softmax #a2d2ff:pooling #caf0f8:concat,split,embedding "
        "#dee2e6:dropout,identity #ffffff:placeholder,output #fff3bf:get_attr #ff8787:opaque"
    ).split()
    for colour, categories in [entry.split(":")]
    for category in categories.split(",")
}


def to_dot(
    gm: fx.GraphModule,
    highlight: dict[str, str] | None = None,
    *,
    example_inputs: Sequence[Any] | None = None,
    show_weights: bool = False,
    clusters: bool = True,
) -> str:
    """Graphviz DOT source: nodes labelled name / kind / shape, filled by op category.

    ``highlight`` maps node names to colours (``{"conv1": "red"}``); ``get_attr`` nodes are
    hidden unless ``show_weights`` or highlighted; ``clusters`` boxes nodes by top-level
    module path. Edges carry the producer's shape.

    Example::

        src = fxopt.inspect.to_dot(gm, highlight={"layer1_conv1": "orange"})
        Path("model.dot").write_text(src)
    """
    summary = inspect(gm, example_inputs)
    highlight = dict(highlight or {})
    unknown = sorted(set(highlight) - {r.name for r in summary.rows})
    if unknown:
        raise FxoptError(
            f"to_dot(highlight=...) names nodes that are not in {summary.name}: "
            f"{', '.join(unknown)}; its nodes are named like "
            f"{', '.join(r.name for r in summary.rows[:6])}, ..."
        )
    style = {name: {"fillcolor": colour, "penwidth": "3"} for name, colour in highlight.items()}
    nodes = [(r.name, r, style.get(r.name, {})) for r in summary.rows]
    edges = [(src, r.name, {}) for r in summary.rows for src in r.inputs]
    shown = {r.name for r in summary.rows if show_weights or r.op != "get_attr" or r.name in style}
    return _dot_source(summary.name, nodes, edges, shown, clusters)


def _dot_source(
    title: str,
    nodes: list[tuple[str, NodeRow, dict[str, str]]],
    edges: list[tuple[str, str, dict[str, str]]],
    shown: set[str],
    clusters: bool,
) -> str:
    out = [
        f"digraph {_q(title)} {{",
        f"  graph [label={_q(title)}, labelloc=t, fontname=Helvetica];",
        '  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=10];',
        '  edge [fontname=Helvetica, fontsize=8, color="#555555"];',
    ]
    groups: dict[str, list[str]] = {}
    for node_id, row, style in nodes:
        if node_id in shown:
            top = row.module_path.split(".")[0] if clusters and row.op in _CALLS else ""
            groups.setdefault(top, []).append(_node_stmt(node_id, row, style))
    for index, (top, stmts) in enumerate(groups.items()):
        if top and len(stmts) > 1:  # one box per top-level module with more than one node
            out.append(f"  subgraph cluster_{index} {{")
            out.append(f'    label={_q(top)}; style="rounded,dashed"; color="#adb5bd";')
            out += ["    " + s for s in stmts] + ["  }"]
        else:
            out += ["  " + s for s in stmts]
    rows = {node_id: row for node_id, row, _ in nodes}
    for src, dst, style in edges:
        if src in shown and dst in shown:
            attrs = {"label": _shape_text(rows[src].shape), **style}
            out.append(f"  {_q(src)} -> {_q(dst)} [{_attrs(attrs)}];")
    return "\n".join(out + ["}"]) + "\n"


def _node_stmt(node_id: str, row: NodeRow, style: dict[str, str]) -> str:
    lines = [row.name, row.kind, _shape_text(row.shape)]
    lines += [f"{human_count(row.macs)} MACs"] if row.macs else []
    attrs = {"label": "\\n".join(_esc(line) for line in lines)}
    attrs["fillcolor"] = _FILL.get(row.category, "#f1f3f5")
    attrs["tooltip"] = _esc(f"{row.target} @ {row.module_path or '(root)'}")
    if row.op in ("placeholder", "output"):
        attrs.update(shape="oval", style="filled")
    if row.kind == OPAQUE:
        attrs.update(color="#c92a2a", penwidth="2")
    return f"{_q(node_id)} [{_attrs({**attrs, **style}, raw=('label', 'tooltip'))}];"


def _attrs(attrs: dict[str, str], raw: tuple[str, ...] = ()) -> str:
    """``raw`` values are already escaped (they may hold DOT's own ``\\n``)."""
    return ", ".join(f'{k}="{v}"' if k in raw else f"{k}={_q(v)}" for k, v in attrs.items())


def _esc(text: str) -> str:
    return " ".join(str(text).split()).replace("\\", "\\\\").replace('"', '\\"')


def _q(text: str) -> str:
    return f'"{_esc(text)}"'


@dataclass
class RenderResult:
    """What ``render`` wrote: the DOT file always, the picture when Graphviz is installed."""

    dot_path: Path
    image_path: Path | None
    message: str

    def __str__(self) -> str:
        return self.message


def render(
    gm: fx.GraphModule, path: str | os.PathLike, format: str = "svg", **dot_options: Any
) -> RenderResult:
    """Write ``<path>.dot`` and, when Graphviz ``dot`` is installed, ``<path>.<format>``.

    ``path`` may end in ``.dot`` or ``.<format>``; missing directories are created and both
    files are written atomically (temporary name, then rename). Without Graphviz nothing is
    raised: ``message`` says how to make the picture. ``dot_options`` go to ``to_dot``.

    Example::

        res = fxopt.inspect.render(gm, "out/model.svg")
        print(res.message)      # "wrote out/model.dot and out/model.svg"
    """
    return _render(to_dot(gm, **dot_options), path, format)


def _render(source: str, path: str | os.PathLike, format: str) -> RenderResult:
    if not re.fullmatch(r"[a-z0-9_]+(:[a-z0-9_]+)*", format):
        raise FxoptError(f"render(format={format!r}): use a Graphviz format: 'svg', 'png', 'pdf'")
    path, ext = Path(path), format.split(":")[0]
    stem = path.with_suffix("") if path.suffix.lower() in (".dot", f".{ext}") else path
    dot_path, image_path = (stem.parent / f"{stem.name}.{e}" for e in ("dot", ext))
    with _atomic(dot_path) as tmp:
        Path(tmp).write_text(source, encoding="utf-8")
    if ext == "dot":
        return RenderResult(dot_path, None, f"wrote {dot_path}")
    command = f"dot -T{format} {dot_path} -o {image_path}"
    exe = shutil.which("dot")
    if exe is None:
        message = (
            f"Graphviz 'dot' is not installed; wrote {dot_path} - install graphviz (apt-get "
            "install graphviz, brew install graphviz or conda install graphviz) and run "
            f"`{command}`"
        )
        return RenderResult(dot_path, None, message)
    with _atomic(image_path) as tmp:
        try:
            run = [exe, f"-T{format}", str(dot_path), "-o", tmp]
            proc = subprocess.run(run, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            raise FxoptError(
                f"could not run Graphviz ({type(e).__name__}: {e}); the DOT file is at "
                f"{dot_path} - run `{command}` yourself"
            ) from e
        if proc.returncode != 0:
            detail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[:3])
            raise FxoptError(
                f"Graphviz dot failed (exit code {proc.returncode}) on {dot_path}: "
                f"{detail or 'no message'}; the DOT file is kept - check that {format!r} is "
                f"a format `dot -T?` lists, then run `{command}`"
            )
    return RenderResult(dot_path, image_path, f"wrote {dot_path} and {image_path}")


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[str]:
    """A temporary file next to ``path``, renamed onto it when the block succeeds."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        raise FxoptError(
            f"cannot write {path}: {type(e).__name__}: {e.strerror or e}; choose a writable "
            "directory with free space (or create it and check its permissions)"
        ) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# --------------------------------------------------------------------------- diff
@dataclass
class GraphDiff:
    """Nodes added, removed, kept (and kept but changed) between two graphs.

    Nodes match when they have the same name, opcode, op kind and target (the module path
    for ``call_module``). ``added`` holds after-rows, ``removed`` before-rows, ``kept``
    after-rows, and ``changed`` (before, after) pairs of kept nodes whose shape, dtype,
    params or MACs differ.
    """

    before: ModelSummary
    after: ModelSummary
    added: list[NodeRow]
    removed: list[NodeRow]
    kept: list[NodeRow]
    changed: list[tuple[NodeRow, NodeRow]]

    def counts(self) -> dict[str, dict[str, int]]:
        """Op kinds added and removed: ``{"added": {...}, "removed": {"dropout": 8}}``."""
        added = Counter(r.kind for r in self.added).most_common()
        return {"added": dict(added), "removed": dict(Counter(r.kind for r in self.removed))}

    def __str__(self) -> str:
        b, a, counts = self.before, self.after, self.counts()

        def by_kind(sign: str, kinds: dict[str, int]) -> str:
            return ", ".join(f"{sign} {n} {k}" for k, n in kinds.items()) or "none"

        lines = [
            f"{a.name}: {b.nodes} -> {a.nodes} nodes ({len(self.removed)} removed, "
            f"{len(self.added)} added, {len(self.kept)} kept, {len(self.changed)} changed)",
            f"  removed: {by_kind('-', counts['removed'])}",
            f"  added:   {by_kind('+', counts['added'])}",
            f"  params:  {b.params:,} -> {a.params:,} ({a.params - b.params:+,})",
            f"  MACs:    {b.macs:,} -> {a.macs:,} ({a.macs - b.macs:+,})",
        ]
        for label, rows in (("removed", self.removed), ("added", self.added)):
            if rows:
                lines.append(f"  {label} nodes: " + ", ".join(r.name for r in rows))
        for old, new in self.changed:
            what = [
                f"{f} {_value_text(getattr(old, f))} -> {_value_text(getattr(new, f))}"
                for f in ("shape", "dtype", "params", "macs")
                if getattr(old, f) != getattr(new, f)
            ]
            lines.append(f"  changed {new.name}: {'; '.join(what)}")
        return "\n".join(lines)

    def to_dot(self, *, show_weights: bool = False, clusters: bool = True) -> str:
        """The after-graph plus the removed nodes: added green, removed red and dashed.

        Example::

            Path("diff.dot").write_text(fxopt.inspect.diff(before, after).to_dot())
        """
        added, removed = {r.name for r in self.added}, {r.name for r in self.removed}

        def rid(name: str) -> str:  # removed nodes get their own ids: a name may be reused
            return f"removed:{name}" if name in removed else name

        green = {"fillcolor": "#8ce99a", "color": "#2b8a3e", "penwidth": "2"}
        red = {"fillcolor": "#ffc9c9", "color": "#c92a2a", "fontcolor": "#c92a2a"}
        red.update(style="dashed,filled", penwidth="2")
        nodes = [(r.name, r, green if r.name in added else {}) for r in self.after.rows]
        nodes += [(rid(r.name), r, red) for r in self.removed]
        edges = [(src, r.name, {}) for r in self.after.rows for src in r.inputs]
        gone = {"color": "#c92a2a", "style": "dashed"}
        edges += [
            (rid(src), rid(r.name), gone)
            for r in self.before.rows
            for src in r.inputs
            if r.name in removed or src in removed
        ]
        shown = {node_id for node_id, r, _ in nodes if show_weights or r.op != "get_attr"}
        return _dot_source(f"{self.after.name} (diff)", nodes, edges, shown, clusters)

    def render(self, path: str | os.PathLike, format: str = "svg") -> RenderResult:
        """Write the diff picture the way ``fxopt.inspect.render`` writes a graph."""
        return _render(self.to_dot(), path, format)


def _value_text(value: Any) -> str:
    return _shape_text(value) if isinstance(value, (tuple, list)) else str(value)


def diff(before: fx.GraphModule, after: fx.GraphModule) -> GraphDiff:
    """What changed between two graphs (e.g. before and after a pipeline).

    Example::

        gm = fxopt.capture(model, (x,))
        res = fxopt.optimize(model, (x,), "default")
        d = fxopt.inspect.diff(gm, res.module)
        print(d)                 # removed: - 8 dropout, - 1 identity
        d.counts()["removed"]    # {"dropout": 8, "identity": 1}
    """
    old, new = inspect(before), inspect(after)
    old_keys = {_match_key(r): r for r in old.rows}
    kept = [r for r in new.rows if _match_key(r) in old_keys]
    matched = {r.name for r in kept}
    changed = [(old_keys[_match_key(r)], r) for r in kept]
    return GraphDiff(
        old,
        new,
        added=[r for r in new.rows if r.name not in matched],
        removed=[r for r in old.rows if r.name not in matched],
        kept=kept,
        changed=[(o, n) for o, n in changed if _signature(o) != _signature(n)],
    )


def _match_key(row: NodeRow) -> tuple[str, str, str, str]:
    # A module's text (its extra_repr) changes when a pass resizes it; its path does not.
    target = row.module_path if row.op == "call_module" else row.target
    return row.name, row.op, row.kind, target


def _signature(row: NodeRow) -> tuple:
    return row.shape, row.dtype, row.params, row.macs
