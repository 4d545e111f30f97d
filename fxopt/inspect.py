"""See what a captured graph computes: a node table with params and MACs, a networkx graph,
Graphviz pictures, and the difference between two graphs.

Example::

    import fxopt
    gm = fxopt.capture(model, (x,))
    print(fxopt.inspect(gm))                        # node table, totals at the bottom
    fxopt.inspect.render(gm, "out/model.svg")       # writes out/model.dot (+ .svg with Graphviz)
    res = fxopt.optimize(model, (x,), "default")
    print(fxopt.inspect.diff(gm, res.module))       # "removed: - 8 dropout"

``fxopt.inspect`` is a plain function (fxopt/__init__.py) that calls
``fxopt.inspect.inspect`` here; the pictures live in fxopt/visualize.py (``render``,
``to_dot``, ``to_networkx``, ``diff``), which imports this module and never the reverse,
and ``fxopt.inspect.render`` / ``.diff`` / ``.to_dot`` / ``.to_networkx`` reach them.
Params count the weight tensors an op reads (module parameters and buffers for
``call_module``, ``get_attr``-fed tensors for function and ATen forms); totals count each
tensor once however many ops share it. MACs come from the op table (``fxopt.ops``).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import _get_qualified_name

from fxopt.capture import capture, normalize_inputs
from fxopt.errors import CaptureError
from fxopt.graph_utils import annotate, human_count
from fxopt.ops import OPAQUE, op_of

if TYPE_CHECKING:
    pass

_CALLS = ("call_module", "call_function", "call_method")
_OPERATORS = (torch._ops.OperatorBase, torch._ops.OpOverloadPacket)  # print as aten.x.y
_COLUMNS = ("name", "kind", "form", "target", "module", "shape", "dtype", "params", "MACs")
# Weights may be stored in low precision; integer buffers (BN's num_batches_tracked) are not.
_WEIGHT_DTYPES = (torch.int8, torch.uint8, torch.qint8, torch.quint8, torch.qint32)


@dataclass
class NodeRow:
    """One fx node as ``inspect`` sees it.

    ``kind``/``category``/``form`` come from ``fxopt.ops`` (``kind`` and ``category`` are the
    fx opcode for placeholder, get_attr and output nodes); ``shape`` is a tuple of ints, a
    list of those for multi-output nodes, or None for non-tensor values; ``inputs`` names
    the producers of this node's arguments.
    """

    name: str
    op: str
    kind: str
    category: str
    form: str
    target: str
    module_path: str
    shape: Any
    dtype: Any
    params: int
    macs: int
    inputs: list[str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (shapes as lists, dtypes as strings)."""
        return {**vars(self), "shape": _jsonable(self.shape), "inputs": list(self.inputs)}

    def cells(self) -> list[str]:
        """The row as table text, in ``_COLUMNS`` order."""
        counts = [human_count(n) if n else "" for n in (self.params, self.macs)]
        text = [self.name, self.kind, self.form, self.target, self.module_path]
        return [*text, _shape_text(self.shape), _dtype_text(self.dtype), *counts]


@dataclass
class ModelSummary:
    """Rows for every node plus totals; ``str(summary)`` is a terminal table.

    Example::

        s = fxopt.inspect(gm)
        s.macs, s.params, s.macs_by_kind["conv"], s.opaque
        print(s.to_markdown())
    """

    name: str
    frontend: str
    rows: list[NodeRow]
    params: int  # each tensor counted once across the graph
    macs: int

    @property
    def nodes(self) -> int:
        return len(self.rows)

    @property
    def ops(self) -> int:
        """Number of call_module / call_function / call_method nodes."""
        return sum(1 for r in self.rows if r.op in _CALLS)

    @property
    def kinds(self) -> dict[str, int]:
        """Op-kind counts of the call nodes, most frequent first."""
        return dict(Counter(r.kind for r in self.rows if r.op in _CALLS).most_common())

    @property
    def macs_by_kind(self) -> dict[str, int]:
        return _sum_by_kind(self.rows, "macs")

    @property
    def params_by_kind(self) -> dict[str, int]:
        return _sum_by_kind(self.rows, "params")

    @property
    def opaque(self) -> list[str]:
        """Names of the nodes the op table does not know."""
        return [r.name for r in self.rows if r.kind == OPAQUE]

    def by_module(self, depth: int = 1) -> dict[str, dict[str, int]]:
        """Nodes, params and MACs per module path cut to ``depth`` parts ("" is the root).

        Example::

            fxopt.inspect(gm).by_module(1)["layer1"]["macs"]
        """
        out: dict[str, dict[str, int]] = {}
        for r in self.rows:
            entry = out.setdefault(".".join(r.module_path.split(".")[:depth]), Counter())
            entry.update(nodes=1, params=r.params, macs=r.macs)
        return {k: dict(v) for k, v in out.items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict: ``{"name", "frontend", "rows": [...], "totals": {...}}``."""
        totals = {"nodes": self.nodes, "ops": self.ops, "params": self.params}
        totals.update(macs=self.macs, kinds=self.kinds, macs_by_kind=self.macs_by_kind)
        totals.update(params_by_kind=self.params_by_kind, opaque=self.opaque)
        rows = [r.to_dict() for r in self.rows]
        return {"name": self.name, "frontend": self.frontend, "rows": rows, "totals": totals}

    def totals(self) -> list[tuple[str, str]]:
        """The footer of the table as (label, text) pairs."""
        by_kind = ", ".join(f"{k} {v:,}" for k, v in self.macs_by_kind.items())
        opaque = ", ".join(f"{r.name} ({r.target})" for r in self.rows if r.kind == OPAQUE)
        weights = sum(1 for r in self.rows if r.op == "get_attr")
        lines = [
            ("nodes", f"{self.nodes} ({self.ops} ops, {weights} get_attr)"),
            ("ops", ", ".join(f"{k} {n}" for k, n in self.kinds.items()) or "none"),
            ("params", f"{self.params:,} ({human_count(self.params)}), each tensor once"),
            ("MACs", f"{self.macs:,} ({human_count(self.macs)})" + (by_kind and f" = {by_kind}")),
            ("opaque", opaque or "none"),
        ]
        if not any(r.shape is not None for r in self.rows):
            lines.append(("note", "no shapes recorded: pass example_inputs to count MACs"))
        return lines

    def shown(self, weights: bool = False) -> list[NodeRow]:
        """Rows for the table: get_attr nodes whose tensors an op already counts are left out."""
        return [r for r in self.rows if weights or r.op != "get_attr" or r.params]

    def table(self, max_width: int = 44, weights: bool = False) -> str:
        """The node table with totals at the bottom; cells longer than ``max_width`` are cut.

        ``weights`` adds a row for every get_attr node (``torch.export`` graphs have one per
        parameter; by default their tensors show up in the params of the ops that read them).
        """
        cells = [
            [_cut(c, max_width, i == 4) for i, c in enumerate(r.cells())]
            for r in self.shown(weights)
        ]
        widths = [max(len(row[i]) for row in [_COLUMNS, *cells]) for i in range(len(_COLUMNS))]

        def line(row: Sequence[str]) -> str:
            padded = [
                c.rjust(w) if i >= 7 else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
            return "  ".join(padded).rstrip()

        rule = "  ".join("-" * w for w in widths)
        title = self.name + (f" (captured with {self.frontend})" if self.frontend else "")
        out = [title, line(_COLUMNS), rule, *(line(row) for row in cells), rule]
        return "\n".join(out + [f"{label + ':':<8}{text}" for label, text in self.totals()])

    def to_markdown(self, weights: bool = False) -> str:
        """The table as GitHub markdown, totals as a list below it."""
        out = [f"### {self.name}", "", "| " + " | ".join(_COLUMNS) + " |"]
        out.append("|" + "---|" * 7 + "---:|" * 2)
        out += ["| " + " | ".join(_md(c) for c in r.cells()) + " |" for r in self.shown(weights)]
        out += [""] + [f"- **{label}**: {_md(text)}" for label, text in self.totals()]
        return "\n".join(out)

    __str__ = table


def inspect(
    gm: fx.GraphModule | nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
) -> ModelSummary:
    """Summarize a graph: one row per node, params, MACs, op kinds, opaque ops.

    ``gm`` is normally a GraphModule from ``fxopt.capture``; with ``example_inputs`` its
    shape metadata is refreshed first (needed for graphs that fxopt did not capture). A
    plain ``nn.Module`` is captured with ``mode="auto"`` and needs ``example_inputs``.

    Example::

        summary = fxopt.inspect(gm)
        print(summary)                      # the table
        summary.macs_by_kind["linear"]      # 103424
    """
    if not isinstance(gm, fx.GraphModule):
        if not isinstance(gm, nn.Module) or example_inputs is None:
            raise CaptureError(
                f"inspect() needs a torch.fx.GraphModule, or an nn.Module with example_inputs; "
                f"got {type(gm).__name__}. Call fxopt.inspect(model, (x,)) or "
                "fxopt.inspect(fxopt.capture(model, (x,)))"
            )
        gm = capture(gm, example_inputs)
    elif example_inputs is not None:
        annotate(gm, normalize_inputs(example_inputs))
    rows, read, attrs = [], {}, []
    for node in gm.graph.nodes:
        row, tensors = _row(gm, node)
        rows.append(row)
        if node.op == "get_attr":
            attrs.append((row, tensors))
        else:
            read.update(tensors)
    for row, tensors in attrs:  # a get_attr row counts only what no op reads (output-only, dead)
        own = {key: t for key, t in tensors.items() if key not in read}
        row.params = sum(t.numel() for t in own.values())
        read.update(own)
    frontend = gm.meta.get("fxopt", {}).get("capture", {}).get("frontend", "")
    params, macs = sum(t.numel() for t in read.values()), sum(r.macs for r in rows)
    return ModelSummary(type(gm).__name__, frontend, rows, params, macs)


def _row(gm: fx.GraphModule, node: fx.Node) -> tuple[NodeRow, dict[Any, torch.Tensor]]:
    kind = category = node.op
    form, macs, tensors = "", 0, []
    if node.op in _CALLS:
        try:
            view = op_of(node)
        except (AttributeError, ValueError):  # call_module whose submodule is gone
            kind = category = OPAQUE
        else:
            kind, category, form, macs = view.kind, view.category, view.form, view.macs()
            if view.module is not None:
                tensors += [*view.module.parameters(), *view.module.buffers()]
        tensors += [_resolve(gm, a.target) for a in node.all_input_nodes if a.op == "get_attr"]
    elif node.op == "get_attr":
        tensors.append(_resolve(gm, node.target))
    unique = {_tensor_key(t): t for t in tensors if isinstance(t, torch.Tensor) and _is_weight(t)}
    path = node.meta.get("fxopt_module_path") or (node.op == "call_module" and str(node.target))
    row = NodeRow(
        name=node.name,
        op=node.op,
        kind=kind,
        category=category,
        form=form,
        target=_target_text(gm, node),
        module_path=path or "",
        shape=node.meta.get("shape"),
        dtype=_dtype_value(node.meta.get("dtype")),
        params=sum(t.numel() for t in unique.values()),
        macs=macs,
        inputs=[n.name for n in node.all_input_nodes],
    )
    return row, unique


def _resolve(gm: fx.GraphModule, target: Any) -> Any:
    obj: Any = gm
    for part in str(target).split("."):
        obj = getattr(obj, part, None)
    return obj


def _is_weight(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex() or t.dtype in _WEIGHT_DTYPES


def _tensor_key(t: torch.Tensor) -> Any:
    """Aliases of one storage (tied weights, views) share a key."""
    with contextlib.suppress(RuntimeError, NotImplementedError):
        ptr = t.untyped_storage().data_ptr()
        if ptr:
            return (t.device.type, ptr, t.storage_offset(), tuple(t.shape), t.dtype)
    return ("id", id(t))


def _target_text(gm: fx.GraphModule, node: fx.Node) -> str:
    target = node.target
    if node.op == "call_module":
        with contextlib.suppress(AttributeError):
            mod = gm.get_submodule(target)
            return f"{type(mod).__name__}({' '.join(mod.extra_repr().split())})"
    elif node.op == "call_method":
        return f"Tensor.{target}"
    elif node.op == "call_function" and not isinstance(target, _OPERATORS):
        try:
            return _get_qualified_name(target)
        except Exception:  # noqa: BLE001 - lambdas, partials, C functions without a module
            return getattr(target, "__name__", repr(target))
    return str(target)


def _sum_by_kind(rows: list[NodeRow], field_name: str) -> dict[str, int]:
    out: Counter[str] = Counter()
    for r in rows:
        out[r.kind] += getattr(r, field_name)
    return {k: v for k, v in out.most_common() if v}


def _dtype_value(dtype: Any) -> Any:
    if isinstance(dtype, (list, tuple)):
        return [_dtype_value(d) for d in dtype]
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def _jsonable(shape: Any) -> Any:
    if isinstance(shape, (list, tuple)):
        return [_jsonable(s) for s in shape]
    return int(shape) if shape is not None else None


def _shape_text(shape: Any) -> str:
    if shape is None:
        return "-"
    if isinstance(shape, list):  # one entry per output
        return "(" + ", ".join(_shape_text(s) for s in shape) + ")"
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _dtype_text(dtype: Any) -> str:
    if isinstance(dtype, list):
        return ",".join(d or "-" for d in dtype)
    return dtype or "-"


def _md(text: str) -> str:
    return text.replace("|", "\\|") or " "


def _cut(text: str, width: int, left: bool = False) -> str:
    if len(text) <= width:
        return text
    return "..." + text[3 - width :] if left else text[: width - 3] + "..."


__all__ = ["ModelSummary", "NodeRow", "inspect"]
