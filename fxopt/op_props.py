"""The op table's vocabulary: categories, properties and effects (see ``fxopt.ops``).

Every ``OpDef`` has one ``Category`` and a set of ``Prop`` flags. A pass asks the table
(``fxopt.ops.has_prop(node, Prop.COMMUTATIVE)``) instead of keeping its own list of op
kinds, so supporting a new op with all it implies is one ``register_op`` entry::

    register_op(OpDef("my_norm", "norm", functions=(my_norm,)))   # fp32 in ``half`` at once

A category brings its default properties (``CATEGORY_PROPS``: a norm is fp32-sensitive, a
view is plumbing that may alias its input); an entry adds its own on top.

``Effects`` says what running an op does besides computing its result. Tabled ops declare
theirs; for ops the table does not list, ``inferred_effects`` reads what ATen knows (the
``nondeterministic_seeded`` tag, schema mutability and aliasing) and assumes the worst of
anything else. ``dce``, ``cse`` and ``fold_constants`` all ask the same ``fxopt.ops.effects``.
"""

from __future__ import annotations

import enum
import functools
import operator

import torch
import torch.fx as fx


class Category(enum.StrEnum):
    """What family an op belongs to; str-valued, so ``view.category == "norm"`` holds."""

    CONV = "conv"
    LINEAR = "linear"
    MATMUL = "matmul"
    ATTENTION = "attention"
    EMBEDDING = "embedding"
    NORM = "norm"
    ACTIVATION = "activation"
    SOFTMAX = "softmax"
    ELEMENTWISE = "elementwise"
    REDUCTION = "reduction"
    POOLING = "pooling"
    RESIZE = "resize"
    CONCAT = "concat"
    SPLIT = "split"
    SHAPE = "shape"
    LAYOUT = "layout"
    INDEX = "index"
    BROADCAST = "broadcast"
    CAST = "cast"
    SHAPE_QUERY = "shape_query"
    DROPOUT = "dropout"
    IDENTITY = "identity"
    CHECK = "check"
    OPAQUE = "opaque"  # not in the table: fxopt never guesses what it does


class Prop(enum.StrEnum):
    """A property a pass may rely on. Held as data on each ``OpDef`` (``entry.props``)."""

    COMMUTATIVE = "commutative"  # f(a, b) == f(b, a): rule patterns match both orders
    HALF_COMPUTE = "half_compute"  # holds the weights and MACs: worth running in fp16/bf16
    FP32_SENSITIVE = "fp32_sensitive"  # its range or accumulation needs fp32 (the deny list)
    FP32_ONLY = "fp32_only"  # no fp16/bf16 kernel: runs in fp32 whatever the policy
    PLUMBING = "plumbing"  # moves or reshapes data, computes nothing: not reported as compute
    MAY_ALIAS = "may_alias"  # its result may share storage with an input (views, no-op casts)
    WEIGHT_QUANT = "weight_quant"  # static int8 quantizes its weight along with its input
    FOLD_INTO = "fold_into"  # a following batch norm / per-channel affine folds into its weights
    SPARSIFY = "sparsify"  # its weight (dim 1 = input channels) is zeroed by ``sparsify``
    IDENTITY_IN_EVAL = "identity_in_eval"  # with training=False (or an eval module) it returns
    # its input: remove_dropout bypasses it (dropout, stochastic depth, drop path)


_PLUMBING = frozenset({Prop.PLUMBING})
_VIEW = frozenset({Prop.PLUMBING, Prop.MAY_ALIAS})
CATEGORY_PROPS: dict[Category, frozenset[Prop]] = {
    Category.NORM: frozenset({Prop.FP32_SENSITIVE}),
    Category.SOFTMAX: frozenset({Prop.FP32_SENSITIVE}),
    Category.SHAPE: _VIEW,
    Category.LAYOUT: _VIEW,
    Category.INDEX: _VIEW,
    Category.SPLIT: _VIEW,
    Category.BROADCAST: _VIEW,
    Category.CAST: _VIEW,
    Category.IDENTITY: _VIEW,
    Category.CONCAT: _PLUMBING,
    Category.SHAPE_QUERY: _PLUMBING,
    Category.DROPOUT: frozenset({Prop.PLUMBING, Prop.IDENTITY_IN_EVAL}),
    Category.CHECK: _PLUMBING,
}


class Effects(enum.Flag):
    """What running an op does besides computing its result (``PURE``: nothing).

    Callers ask the question they have::

        effects(node).removable_if_unused      # dce
        effects(node).foldable                 # fold_constants
        Effects.INPLACE in effects(node)       # is its input written?
    """

    PURE = 0
    RANDOM = enum.auto()  # draws from the RNG (or reads uninitialised memory): two calls differ
    INPLACE = enum.auto()  # writes into one of its inputs
    ALIAS = enum.auto()  # its result may share storage with an input
    SIDE_EFFECT = enum.auto()  # matters beyond its result: a check, a graph input or output
    UNKNOWN = enum.auto()  # fxopt cannot tell (an op neither the table nor ATen describes)

    @property
    def pure(self) -> bool:
        """Same inputs, same result, and nothing else happens (aliasing is allowed)."""
        return not self & _IMPURE

    @property
    def removable_if_unused(self) -> bool:
        """Whether a node whose result nobody reads may be erased."""
        return self.pure

    @property
    def foldable(self) -> bool:
        """Whether it may be computed once, at compile time, when its inputs are constant."""
        return self.pure

    @property
    def cse_safe(self) -> bool:
        """Whether two identical calls may be merged into one."""
        return self.pure


_IMPURE = Effects.RANDOM | Effects.INPLACE | Effects.SIDE_EFFECT | Effects.UNKNOWN

# ----------------------------------------------------------------------- what ATen says
# Names that are random or stateful whatever their schema says.
_RANDOM_NAMES = frozenset({
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like",
    "bernoulli", "multinomial", "normal", "poisson", "uniform", "uniform_", "normal_",
    "dropout", "empty", "empty_like", "empty_strided", "manual_seed", "seed",
})
# Python operators on tensors, by the ATen op they call (add, mul, getitem... are in the table).
_OPERATORS = {"gt": "gt", "ge": "ge", "lt": "lt", "le": "le", "eq": "eq", "ne": "ne",
              "and_": "bitwise_and", "or_": "bitwise_or", "xor": "bitwise_xor",
              "invert": "bitwise_not", "floordiv": "floor_divide", "mod": "remainder"}
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _writes_an_input(schema: torch._C.FunctionSchema) -> bool:
    """A positional argument marked ``(a!)``: ``add_``'s ``self``; not an ``out=`` buffer."""
    return any(a.alias_info is not None and a.alias_info.is_write and not a.kwarg_only
               for a in schema.arguments)


def _overload_effects(op: torch._ops.OpOverload) -> Effects:
    """Effects of one ATen overload, from its tags and schema (writes come from
    ``writes_input``, which reads the same schema)."""
    out = Effects.PURE
    if torch.Tag.nondeterministic_seeded in op.tags:
        out |= Effects.RANDOM
    if any(r.alias_info is not None for r in op._schema.returns):
        out |= Effects.ALIAS
    return out


@functools.cache
def _aten_packet_effects(name: str) -> Effects:
    """Effects of ``aten.<name>`` called through a torch function, Tensor method or operator,
    which may dispatch to any of its overloads (``out=`` forms aside): the union of theirs,
    and ``UNKNOWN`` when one of them writes an input (``x.add_`` is caught by its name)."""
    if name in _RANDOM_NAMES:
        return Effects.RANDOM
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return Effects.UNKNOWN | Effects.ALIAS
    out = Effects.PURE
    for overload in packet.overloads():
        op = getattr(packet, overload)
        if op._schema.is_mutable and not _writes_an_input(op._schema):
            continue  # an out= form: writes only the buffer it is handed
        out |= _overload_effects(op)
        if _writes_an_input(op._schema):
            out |= Effects.UNKNOWN
    return out


def _aten_name(node: fx.Node) -> str | None:
    """The ATen op an untabled function, method or operator node calls, if there is one."""
    target = node.target
    if node.op == "call_method":
        return str(target)
    if node.op != "call_function":
        return None
    module = getattr(target, "__module__", "")
    if module in ("torch", "torch.functional"):
        return getattr(target, "__name__", None)
    if module == "_operator":
        return _OPERATORS.get(getattr(target, "__name__", ""))
    return None


def inferred_effects(node: fx.Node) -> Effects:
    """Effects of a call node the op table does not list: ATen's word for an ATen overload
    (its tags and schema), a torch function, Tensor method or Python operator (the ATen op
    of that name); ``UNKNOWN | ALIAS`` for anything else (a user function, an unknown
    module, a custom op outside ATen).

    >>> [n.name for n in gm.graph.nodes if inferred_effects(n).pure]  # doctest: +SKIP
    ['sin']
    """
    target = node.target
    if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
        if target.namespace != "aten":
            found = Effects.UNKNOWN | Effects.ALIAS
        elif target._schema.name.split("::")[-1] in _RANDOM_NAMES:
            found = Effects.RANDOM | _overload_effects(target)
        else:
            found = _overload_effects(target)
    else:
        name = _aten_name(node)
        found = _aten_packet_effects(name) if name else Effects.UNKNOWN | Effects.ALIAS
    return found | (Effects.INPLACE if writes_input(node) else Effects.PURE)


def writes_input(node: fx.Node) -> bool:
    """True if ``node`` writes into one of its inputs (``x.add_(1)``, ``F.relu(x, inplace=True)``,
    ``nn.ReLU(inplace=True)``, ``aten.add_``), whatever the table says of its kind.

    >>> [n.name for n in gm.graph.nodes if writes_input(n)]  # doctest: +SKIP
    ['add_']
    """
    target = node.target
    if node.op == "call_method":
        return target.endswith("_") and not target.endswith("__")
    if node.op == "call_module":
        root = node.graph.owning_module
        return root is not None and bool(getattr(root.get_submodule(target), "inplace", False))
    if node.op != "call_function":
        return False
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    if node.kwargs.get("inplace") is True:
        return True
    try:
        if target in _INPLACE_OPERATORS:
            return True
    except TypeError:  # unhashable target
        return False
    name = getattr(target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")
