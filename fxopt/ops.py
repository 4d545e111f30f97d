"""The canonical op view: what a node *is*, whatever form it was captured in.

``nn.Conv2d`` as a ``call_module``, ``F.conv2d`` / ``torch.conv2d`` as a ``call_function``
and ``aten.conv2d.default`` from ``torch.export`` are one op kind (``"conv"``) with one way
to read attributes and parameters and one way to replace a parameter::

    view = fxopt.ops.op_of(node)
    view.kind                  # "conv"
    view.attrs["groups"]       # 1
    w = view.params["weight"]  # a tensor, or None when computed in the graph
    view.set_param("weight", w * 2)

Every op is one ``OpDef`` entry in ``OP_TABLE`` (see ``fxopt/op_table.py``): the module
classes, functions, Tensor methods and ATen packets it covers, the names of its
arguments (one positional order shared by all forms), which arguments are parameters,
and how to count its MACs. A node the table does not know has kind ``"opaque"``: fxopt
never guesses what an unknown op does.

What passes may *do* with an op is data on its entry too: a ``Category`` (an enum, so a typo
fails at registration), ``Prop`` flags read with ``has_prop`` / ``kinds_with``, and the
``Effects`` that ``effects(node)`` reports to ``dce``, ``cse`` and ``fold_constants`` alike
(see ``fxopt/op_props.py``), and so is how channels flow through it (``flow``, a rule of
``fxopt/op_flow.py``), which pruning reads.
"""

from __future__ import annotations

import difflib
import operator
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxopt.errors import SpecError
from fxopt.graph_utils import fresh_attr  # noqa: F401 - shared helper, re-exported here
from fxopt.op_props import CATEGORY_PROPS, Category, Effects, Prop

OPAQUE = "opaque"


@dataclass(frozen=True)
class OpDef:
    """One row of the op table.

    ``signature`` lists argument names in positional order for the function, method and
    ATen forms (ATen overloads use their own schema when it names the same arguments).
    ``params`` are the arguments that hold weights; ``attrs`` the hyper-parameters.
    ``module_attrs`` maps a canonical attribute to the module attribute holding it when
    the names differ (``{"normalized_shape": "normalized_shape"}`` is implied).
    ``category`` is a ``Category`` (or its string value); ``props`` adds ``Prop`` flags to the
    category's defaults (``CATEGORY_PROPS``); ``effects`` is what the op does besides computing
    its result (``Effects.RANDOM`` for dropout). In-place forms (``relu_``, ``inplace=True``) add
    ``Effects.INPLACE`` by themselves, and ``Prop.MAY_ALIAS`` adds ``Effects.ALIAS``.
    ``aten_names``, ``transposed`` and ``applies`` let an ATen op with another argument order
    or weight layout be one more form of a kind: ``aten.addmm`` is a ``linear``.
    ``qualnames`` matches ``call_function`` targets by ``module.qualname`` without importing
    their library: the ``torch.fx.wrap``-ped helpers of torchvision or timm, say
    ``"torchvision.ops.stochastic_depth.stochastic_depth"``.
    """

    kind: str
    category: Category
    modules: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()
    aten: tuple[str, ...] = ()
    qualnames: tuple[str, ...] = ()
    signature: tuple[str, ...] = ("input",)
    defaults: dict[str, Any] = field(default_factory=dict)
    params: tuple[str, ...] = ()
    attrs: tuple[str, ...] = ()
    module_attrs: dict[str, str] = field(default_factory=dict)
    macs: Callable[[OpView], int] | None = None
    props: frozenset[Prop] = frozenset()
    effects: Effects = Effects.PURE
    # brings ``attrs`` of every form to one spelling (conv ``stride=2`` -> ``(2, 2)``)
    normalize: Callable[[dict[str, Any], OpView], dict[str, Any]] | None = None
    # ATen schema argument -> our name, where they differ by more than ``self``/``input``
    # (``aten.addmm(self, mat1, mat2)`` is ``linear(bias, input, weight)``)
    aten_names: dict[str, str] = field(default_factory=dict)
    # parameters the graph holds transposed from the kind's layout (``addmm``'s ``mat2`` is
    # ``[in, out]``, a linear weight ``[out, in]``): ``params`` reads them in the kind's
    # layout and ``set_param`` writes them back transposed
    transposed: tuple[str, ...] = ()
    # the entry covers only nodes this accepts (``addmm`` is linear only with
    # ``alpha == beta == 1`` and a 1-D bias); other nodes of the same target stay opaque
    applies: Callable[[fx.Node], bool] | None = None
    # how channels flow through the op: a rule name in ``fxopt.op_flow.FLOW_RULES``; None
    # blocks pruning through it (``fxopt.prune.groups`` names the op in the reason)
    flow: str | None = None

    def __post_init__(self) -> None:
        category = _enum_value(Category, self.category, f"op {self.kind!r}: category")
        props = frozenset(_enum_value(Prop, p, f"op {self.kind!r}: property") for p in self.props)
        object.__setattr__(self, "category", category)
        object.__setattr__(self, "props", props | CATEGORY_PROPS.get(category, frozenset()))


def _enum_value(enum_type: type, value: Any, what: str) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        names = [str(m) for m in enum_type]
        close = difflib.get_close_matches(str(value), names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise SpecError(
            f"{what} {value!r} is not one of fxopt's: {hint}use one of {', '.join(names)}"
        ) from None


OP_TABLE: list[OpDef] = []
_BY_MODULE: dict[type, OpDef] = {}
_BY_FUNCTION: dict[Any, OpDef] = {}
_BY_METHOD: dict[str, OpDef] = {}
_BY_ATEN: dict[str, OpDef] = {}
_BY_QUALNAME: dict[str, OpDef] = {}


def register_op(entry: OpDef) -> OpDef:
    """Add one op to the table; later registrations override earlier ones for a target.

    Example::

        register_op(OpDef("swish", "activation", functions=(my_swish,)))
    """
    OP_TABLE.append(entry)
    for m in entry.modules:
        _BY_MODULE[m] = entry
    for f in entry.functions:
        _BY_FUNCTION[f] = entry
    for name in entry.methods:
        _BY_METHOD[name] = entry
    for name in entry.aten:
        _BY_ATEN[name] = entry
    for name in entry.qualnames:
        _BY_QUALNAME[name] = entry
    return entry


def unregister_op(entry: OpDef) -> None:
    """Remove ``entry`` from the table; targets it had taken over go back to earlier entries.

    Example::

        entry = register_op(OpDef("swish", "activation", functions=(my_swish,)))
        unregister_op(entry)
    """
    if not any(e is entry for e in OP_TABLE):
        raise KeyError(f"op {entry.kind!r}: this entry is not registered")
    kept = [e for e in OP_TABLE if e is not entry]
    OP_TABLE.clear()
    for index in (_BY_MODULE, _BY_FUNCTION, _BY_METHOD, _BY_ATEN, _BY_QUALNAME):
        index.clear()
    for e in kept:
        register_op(e)


@contextmanager
def registered(*entries: OpDef) -> Iterator[tuple[OpDef, ...]]:
    """Register ``entries`` for the duration of a ``with`` block (tests, experiments).

    Example::

        with registered(OpDef("my_norm", "norm", functions=(my_norm,))):
            fxopt.optimize(model, (x,), "half")
    """
    done = tuple(register_op(e) for e in entries)
    try:
        yield done
    finally:
        for e in reversed(done):
            unregister_op(e)


def _aten_keys(target: Any) -> list[str]:
    """'conv2d.default' and 'conv2d' for aten.conv2d.default."""
    if isinstance(target, torch._ops.OpOverload):
        if target.namespace != "aten":
            return []
        packet = target._schema.name.split("::")[-1]
        return [f"{packet}.{target._overloadname}", packet]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return [target._qualified_op_name.split("::")[-1]]
    return []


def lookup(node: fx.Node) -> tuple[OpDef | None, str]:
    """The table entry for ``node`` and the form it was captured in."""
    entry, form = _lookup(node)
    if entry is not None and entry.applies is not None and not entry.applies(node):
        return None, form
    return entry, form


def _lookup(node: fx.Node) -> tuple[OpDef | None, str]:
    if node.op == "call_module":
        mod = _owning_module(node).get_submodule(node.target)
        for cls in type(mod).__mro__:
            if cls in _BY_MODULE:
                return _BY_MODULE[cls], "module"
        return None, "module"
    if node.op == "call_method":
        return _BY_METHOD.get(node.target), "method"
    if node.op == "call_function":
        keys = _aten_keys(node.target)
        if keys:
            for k in keys:
                if k in _BY_ATEN:
                    return _BY_ATEN[k], "aten"
            return None, "aten"
        try:
            found = _BY_FUNCTION.get(node.target)
        except TypeError:  # unhashable target
            found = None
        return found or _BY_QUALNAME.get(qualname(node.target)), "function"
    return None, node.op


def qualname(fn: Any) -> str:
    """``module.qualname`` of a plain Python function (what ``OpDef.qualnames`` lists), or ""
    for anything else.

    >>> qualname(torch.nn.functional.relu)
    'torch.nn.functional.relu'
    """
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else ""


def _owning_module(node: fx.Node) -> nn.Module:
    gm = node.graph.owning_module
    if gm is None:
        raise ValueError(f"node {node.name} belongs to a graph without an owning module")
    return gm


def fetch_attr(root: nn.Module, path: str) -> Any:
    """The object at dotted ``path`` under ``root``: what a get_attr node with that target reads.

    Example::

        fetch_attr(gm, "layer1.0.conv1.weight")
    """
    return operator.attrgetter(path)(root) if path else root


def _set_path(root: nn.Module, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    owner = fetch_attr(root, ".".join(parents)) if parents else root
    if isinstance(getattr(owner, leaf, None), nn.Parameter) or isinstance(value, nn.Parameter):
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        if leaf in owner._buffers:
            del owner._buffers[leaf]
        owner._parameters[leaf] = value
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    elif isinstance(owner, nn.Module):
        owner.register_buffer(leaf, value)
    else:
        setattr(owner, leaf, value)


def _aten_name(name: str, target: torch._ops.OpOverload) -> str:
    """Our name for an ATen schema argument: ``self`` (and embedding's ``indices``) is ``input``."""
    if name in ("self", "indices"):
        others = {a.name for a in target._schema.arguments}
        if "input" not in others and (name == "self" or "self" not in others):
            return "input"
    return name


class OpView:
    """A node seen through the op table. See the module docstring for an example."""

    def __init__(self, node: fx.Node):
        self.node = node
        self.entry, self.form = lookup(node)
        self.kind = self.entry.kind if self.entry else OPAQUE
        self.category = self.entry.category if self.entry else Category.OPAQUE
        self.module = (
            _owning_module(node).get_submodule(node.target) if node.op == "call_module" else None
        )
        self._bound = self._bind() if self.entry and self.form != "module" else {}

    # ------------------------------------------------------------------ binding
    def _names(self) -> tuple[str, ...]:
        target = self.node.target
        if self.form == "aten" and isinstance(target, torch._ops.OpOverload):
            # the schema is the truth for ATen (aten.embedding takes weight first); only its
            # name for the main tensor differs from ours
            names = self.entry.aten_names
            return tuple(
                names.get(a.name) or _aten_name(a.name, target) for a in target._schema.arguments
            )
        return self.entry.signature

    def _bind(self) -> dict[str, Any]:
        names = self._names()
        bound = dict(self.entry.defaults)
        target = self.node.target
        kwargs = dict(self.node.kwargs)
        if self.form == "aten" and isinstance(target, torch._ops.OpOverload):
            bound = {k: v for k, v in bound.items() if k in names}  # schema names rule here
            for name, a in zip(names, target._schema.arguments, strict=True):
                if a.has_default_value():
                    bound[name] = a.default_value
            renamed = self.entry.aten_names
            kwargs = {renamed.get(k) or _aten_name(k, target): v for k, v in kwargs.items()}
        args = self.node.args
        if len(args) > len(names):  # e.g. varargs x.view(2, 3) / x.permute(0, 2, 1)
            bound.update(zip(names[:-1], args[: len(names) - 1]))
            bound[names[-1]] = tuple(args[len(names) - 1 :])
        else:
            bound.update(zip(names, args))
        bound.update(kwargs)
        return bound

    # ------------------------------------------------------------------ reading
    @property
    def known(self) -> bool:
        return self.entry is not None

    @property
    def input(self) -> fx.Node | None:
        """The main activation input (the ``input`` argument, else the first argument)."""
        bound = self._bound.get("input")
        if isinstance(bound, fx.Node):
            return bound
        first = self.node.args[0] if self.node.args else None
        return first if isinstance(first, fx.Node) else None

    def arg(self, name: str, default: Any = None) -> Any:
        """A bound argument of a function/method/ATen form (nodes stay nodes)."""
        return self._bound.get(name, default)

    @property
    def attrs(self) -> dict[str, Any]:
        if not self.entry:
            return {}
        if self.module is not None:
            out = {}
            for a in self.entry.attrs:
                src = self.entry.module_attrs.get(a, a)
                if hasattr(self.module, src):
                    out[a] = getattr(self.module, src)
        else:
            out = {a: self._bound[a] for a in self.entry.attrs if a in self._bound}
        # ATen schemas give int[] where modules give tuples: one spelling for all forms
        out = {a: tuple(v) if isinstance(v, list) else v for a, v in out.items()}
        return self.entry.normalize(out, self) if self.entry.normalize else out

    def param_node(self, name: str) -> fx.Node | None:
        """The graph node feeding parameter ``name`` (function/ATen forms), else None."""
        value = self._bound.get(name)
        return value if isinstance(value, fx.Node) else None

    @property
    def params(self) -> dict[str, torch.Tensor | None]:
        """Parameter tensors by canonical name; None if absent or computed in the graph."""
        if not self.entry:
            return {}
        if self.module is not None:
            return {p: getattr(self.module, p, None) for p in self.entry.params}
        out: dict[str, torch.Tensor | None] = {}
        root = _owning_module(self.node)
        for p in self.entry.params:
            src = self._bound.get(p)
            if isinstance(src, fx.Node) and src.op == "get_attr":
                out[p] = fetch_attr(root, src.target)
            elif isinstance(src, torch.Tensor):
                out[p] = src
            else:
                out[p] = None
            if p in self.entry.transposed and out[p] is not None:
                out[p] = out[p].t()
        return out

    # ------------------------------------------------------------------ writing
    def set_param(self, name: str, value: torch.Tensor | None) -> None:
        """Replace parameter ``name`` with ``value`` in every capture form.

        A tensor other nodes also read (a get_attr with other users, or a weight tied to a
        module called elsewhere, as in ``F.linear(h, self.embed.weight)``) is not overwritten:
        a fresh attribute is registered for this node alone, so tied weights elsewhere keep
        their value. A module called from several nodes changes for all of them.
        """
        if not self.entry or name not in self.entry.params:
            raise KeyError(f"{self.kind} op {self.node.name} has no parameter {name!r}")
        graph, root = self.node.graph, _owning_module(self.node)
        if self.module is not None:
            old = getattr(self.module, name, None)
            path = f"{self.node.target}.{name}"
            readers = [n for n in graph.nodes if n.op == "get_attr" and n.target == path]
            if readers and isinstance(old, torch.Tensor):  # keep the old tensor for them
                keep = fresh_attr(root, path.replace(".", "_"))
                root.register_buffer(keep, old.detach())
                for n in readers:
                    n.target = keep
            if value is None:
                setattr(self.module, name, None)
            elif isinstance(old, nn.Parameter) or old is None and name in ("weight", "bias"):
                setattr(self.module, name, nn.Parameter(value, requires_grad=False))
            else:
                self.module.register_buffer(name, value)
            return
        src = self._bound.get(name)
        if value is None:
            self._replace_arg(name, None)
            return
        if name in self.entry.transposed:
            value = value.t().contiguous()
        if (
            isinstance(src, fx.Node)
            and src.op == "get_attr"
            and len(src.users) == 1
            and not _read_elsewhere(graph, src)
        ):
            _set_path(root, src.target, value)
            return
        attr = fresh_attr(root, f"{self.node.name}_{name}")
        root.register_buffer(attr, value)
        with graph.inserting_before(self.node):
            new = graph.get_attr(attr)
        self._replace_arg(name, new)

    def set_arg(self, name: str, value: Any) -> None:
        """Replace bound argument ``name`` (function/method/ATen forms), e.g. a conv's
        ``groups`` after pruning or a split's sizes.

        Example::

            op_of(conv_node).set_arg("groups", 4)
        """
        if self.form == "module":
            raise KeyError(f"{self.kind} op {self.node.name} is a module call: set the "
                           f"module's attribute instead of argument {name!r}")
        self._replace_arg(name, value)

    def _replace_arg(self, name: str, value: Any) -> None:
        names = self._names()
        idx = names.index(name) if name in names else None
        args = list(self.node.args)
        if idx is not None and idx < len(args):
            args[idx] = value
            self.node.args = tuple(args)
        elif name in self.node.kwargs or idx is None:
            self.node.kwargs = {**self.node.kwargs, name: value}
        else:  # positional slot not yet present: fill defaults up to it
            while len(args) < idx:
                args.append(self._bound.get(names[len(args)]))
            args.append(value)
            self.node.args = tuple(args)
        self._bound[name] = value

    # ------------------------------------------------------------------ metadata
    @property
    def out_shape(self) -> tuple[int, ...] | None:
        s = self.node.meta.get("shape")
        return tuple(s) if isinstance(s, (tuple, torch.Size)) else None

    def in_shape(self, i: int = 0) -> tuple[int, ...] | None:
        """Shape of the ``i``-th tensor argument (repeats kept: ``mha(x, x, x)`` has three)."""
        flat = [a for a in _flat_nodes((self.node.args, self.node.kwargs)) if a.op != "get_attr"]
        if i >= len(flat):
            return None
        s = flat[i].meta.get("shape")
        return tuple(s) if isinstance(s, (tuple, torch.Size)) else None

    def macs(self) -> int:
        """Multiply-accumulates of this op at the captured shapes (0 when not counted)."""
        if not self.entry or self.entry.macs is None:
            return 0
        try:
            return int(self.entry.macs(self))
        except (TypeError, ValueError, IndexError, AttributeError):
            return 0

    def __repr__(self) -> str:
        return f"OpView({self.node.name}: {self.kind} [{self.form}])"


def _flat_nodes(value: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(value, out.append)
    return out


def _read_elsewhere(graph: fx.Graph, src: fx.Node) -> bool:
    """Whether a node besides get_attr ``src`` reads its attribute (same path, or through a
    call of the module that owns it)."""
    path = str(src.target)
    for n in graph.nodes:
        if n is src:
            continue
        if n.op == "get_attr" and n.target == path:
            return True
        if n.op == "call_module" and path.startswith(f"{n.target}."):
            return True
    return False


def model_bytes(module: nn.Module) -> int:
    """Bytes held by all parameters, buffers and tensor attributes (each storage view once),
    packed dtypes at their real size: a uint8 holding two int4 values counts one byte.

    >>> model_bytes(nn.Linear(64, 32))
    8320
    """
    seen: set[tuple] = set()
    total = 0
    for mod in module.modules():
        tensors = [*mod._parameters.values(), *mod._buffers.values()]
        tensors += [v for v in vars(mod).values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            key = t is not None and (t.data_ptr(), t.numel(), t.dtype, tuple(t.stride()))
            if key and key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def op_of(node: fx.Node) -> OpView:
    """The canonical view of ``node``: kind, form, params, attrs, MACs.

    Example::

        kinds = [fxopt.ops.op_of(n).kind for n in gm.graph.nodes]
    """
    return OpView(node)


def kind_of(node: fx.Node) -> str:
    """Just the kind (``"conv"``, ``"add"``, ``"opaque"``, ...)."""
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    entry, _ = lookup(node)
    return entry.kind if entry else OPAQUE


def count_kinds(gm: fx.GraphModule) -> Counter:
    """How many nodes of each kind a graph holds (placeholders etc. excluded)."""
    return Counter(
        kind_of(n) for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")
    )


def has_prop(node_or_view: fx.Node | OpView, prop: Prop) -> bool:
    """Whether the op table gives the op of ``node_or_view`` property ``prop`` (False for
    placeholders, outputs, attributes and ops the table does not know).

    Example::

        has_prop(node, Prop.COMMUTATIVE)        # True for add and mul
    """
    if isinstance(node_or_view, OpView):
        entry = node_or_view.entry
    elif node_or_view.op.startswith("call"):
        entry = lookup(node_or_view)[0]
    else:
        entry = None
    return entry is not None and prop in entry.props


def kinds_with(prop: Prop) -> frozenset[str]:
    """The op kinds whose table entries have ``prop``.

    >>> sorted(kinds_with(Prop.COMMUTATIVE))
    ['add', 'mul']
    """
    return frozenset(e.kind for e in OP_TABLE if prop in e.props)


# The effects model (what running a node does besides computing its result) has its own
# file; it reads the table through ``lookup``, so it is imported once that exists.
# The table itself lives in its own file; importing it fills OP_TABLE.
from fxopt import op_table as _op_table  # noqa: E402,F401
from fxopt.op_effects import effects, is_inplace, is_pure  # noqa: E402,F401
