"""Built-in rewrite rules, as data: each is a pattern, a replacement and a check.

Rule sets (each registered as a pass that runs it to a fixed point):

* ``eliminate_noops`` — ``x*1``, ``x/1``, ``x+0``, ``x-0``, ``.contiguous()`` on a
  contiguous tensor, ``.to()`` to the dtype/device it already has;
* ``simplify`` — transpose/permute pairs, reshape chains, single-input ``cat``, split
  then cat, consecutive linear layers, hardswish/hardsigmoid/GELU spelled out, double
  negation.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.graph_utils import fresh_attr
from fxopt.ops import is_inplace, op_of
from fxopt.passes.rules import Match, ParamRef, Rule, RuleSet, register_rules

# --------------------------------------------------------------------------- shared checks


def _same_tensor_type(a: fx.Node, b: object) -> bool:
    if not isinstance(b, fx.Node):
        return False
    return (
        a.meta.get("shape") is not None
        and tuple(a.meta["shape"]) == tuple(b.meta.get("shape") or ())
        and a.meta.get("dtype") == b.meta.get("dtype")
        and a.meta.get("device") == b.meta.get("device")
    )


def _strides(node: fx.Node) -> tuple | None:
    """The strides of ``node``'s result, ignoring size-1 dims (their stride never matters)."""
    meta = node.meta.get("tensor_meta")
    stride, shape = getattr(meta, "stride", None), getattr(meta, "shape", None)
    if stride is None or shape is None:
        return None
    return tuple(s for s, n in zip(stride, shape) if n != 1)


def _is_contiguous(node: object) -> bool:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "memory_format", None) == torch.contiguous_format


def passthrough(match: Match, source: str = "x") -> str | None:
    """Refuse unless the root returns ``source`` unchanged in shape, dtype, device and memory
    layout, and nothing writes into the root's result or the source in place afterwards
    (a copy would then matter)."""
    root = match.root
    if any(is_inplace(u) for u in root.users):
        return f"{root.name} is written in place by a later op"
    if not _same_tensor_type(root, match[source]):
        return "the result differs from the input in shape, dtype or device"
    # cat/split+cat/-(-x) make a fresh dense tensor: a later .view() may need that layout
    if _strides(root) is None or _strides(root) != _strides(match[source]):
        return "the result differs from the input in memory layout (strides)"
    # the root's result is a fresh tensor: once it is the source itself, a later in-place
    # write into the source would change it too
    writers = [u for u in match[source].users if u is not root and is_inplace(u)]
    if writers:
        order = {n: i for i, n in enumerate(root.graph.nodes)}
        later = [u.name for u in writers if order[u] > order[root]]
        if later:
            return f"{match[source].name} is written in place later by {', '.join(later)}"
    return None


def _rank(match: Match, name: str = "x") -> int | None:
    shape = match.shape(name)
    return len(shape) if shape is not None else None


def _norm_dims(dims, rank: int) -> list[int] | None:
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        return None
    return [d % rank for d in dims]


# --------------------------------------------------------------------------- no-ops
def _neutral(value: int):
    def check(match: Match) -> str | None:
        c = match["c"]
        if not isinstance(c, numbers.Number) or isinstance(c, bool) or c != value:
            return f"constant is {c!r}, not {value}"
        return passthrough(match)

    return check


def _contiguous_check(match: Match) -> str | None:
    meta = match["x"].meta.get("tensor_meta") if isinstance(match["x"], fx.Node) else None
    if getattr(meta, "memory_format", None) != torch.contiguous_format:
        return "input is not known to be contiguous"
    fmt = op_of(match.root).arg("memory_format", torch.contiguous_format)
    if fmt not in (None, torch.contiguous_format):
        return f"asks for {fmt}"
    return passthrough(match)


def _to_check(match: Match) -> str | None:
    node = match.root
    view = op_of(node)
    if node.kwargs.get("copy") or view.arg("copy", False) is True:
        return "an explicit copy was requested"
    if "memory_format" in node.kwargs or view.arg("memory_format") is not None:
        return "a memory format was requested"
    return passthrough(match)


NOOP_RULES = RuleSet([
    Rule("mul_by_one", lambda x, c: x * c, lambda x, c: x, _neutral(1)),
    Rule("div_by_one", lambda x, c: x / c, lambda x, c: x, lambda m: (
        "division has a rounding mode" if op_of(m.root).arg("rounding_mode") is not None
        else _neutral(1)(m))),
    Rule("add_zero", lambda x, c: x + c, lambda x, c: x, _neutral(0)),  # 0 * alpha is 0
    Rule("sub_zero", lambda x, c: x - c, lambda x, c: x, _neutral(0)),
    Rule("add_zero_alpha", lambda x, c, a: torch.add(x, c, alpha=a), lambda x, c, a: x,
         _neutral(0)),
    Rule("sub_zero_alpha", lambda x, c, a: torch.sub(x, c, alpha=a), lambda x, c, a: x,
         _neutral(0)),
    Rule("contiguous_noop", lambda x: x.contiguous(), lambda x: x, _contiguous_check),
    Rule("to_same_type", lambda x, d: x.to(d), lambda x, d: x, _to_check),
    Rule("to_same_type_kw", lambda x, d: x.to(dtype=d), lambda x, d: x, _to_check),
    Rule("to_same_device_kw", lambda x, v: x.to(device=v), lambda x, v: x, _to_check),
    Rule("to_same_type_layout", lambda x, d, lay, v: x.to(dtype=d, layout=lay, device=v),
         lambda x, d, lay, v: x, _to_check),
    Rule("cast_method_noop", lambda x: x.float(), lambda x: x, _to_check),
])


# --------------------------------------------------------------------------- layout
def _transpose_pair_check(match: Match) -> str | None:
    rank = _rank(match)
    if rank is None:
        return "input rank unknown"
    first = _norm_dims([match["a"], match["b"]], rank)
    second = _norm_dims([match["c"], match["d"]], rank)
    if first is None or second is None or sorted(first) != sorted(second):
        return f"transposes {first} then {second} do not cancel"
    return passthrough(match)


def _permute_compose(match: Match) -> list[int] | None:
    rank = _rank(match)
    # x.permute(0) on a 1-D tensor binds the lone dim as an int
    p, q = ([v] if isinstance(v, int) else v for v in (match["p"], match["q"]))
    p = _norm_dims(p, rank) if rank is not None else None
    q = _norm_dims(q, rank) if rank is not None else None
    if p is None or q is None or len(p) != rank or len(q) != rank:
        return None
    return [p[i] for i in q]


def _permute_pair_check(match: Match) -> str | None:
    if _permute_compose(match) is None:
        return "permutations are not constant"
    return None


def _permute_pair_rewrite(match: Match, graph: fx.Graph):
    composed = _permute_compose(match)
    if composed == list(range(len(composed))):
        return match["x"]
    return graph.call_method("permute", (match["x"], composed))


def _reshape_chain_check(match: Match) -> str | None:
    if any(is_inplace(u) for u in match.root.users):
        return f"{match.root.name} is written in place by a later op"
    # a reshape of a non-contiguous tensor may copy; one reshape may then be a view where
    # the chain made a copy (a later in-place write or .view() would see the difference)
    if not _is_contiguous(match["x"]):
        return "input is not contiguous: the chain may copy where one reshape would not"
    return None


def _zero_pad_check(match: Match) -> str | None:
    pad = match["p"]
    if not isinstance(pad, (list, tuple)) or any(not isinstance(v, int) or v != 0 for v in pad):
        return f"pads by {pad!r}"
    return passthrough(match)  # zero padding is the identity in every mode


def _single_cat_check(match: Match) -> str | None:
    return passthrough(match)


def _reshape_noop_check(match: Match) -> str | None:
    shape = match["s"]
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) for d in shape):
        return "target shape is not a literal"
    if tuple(shape) != tuple(match.shape("x") or ()):
        return f"reshapes {match.shape('x')} to {tuple(shape)}"
    return passthrough(match)


def _split_parts_check(parts: int):
    def check(match: Match) -> str | None:
        split = match.root.args[0][0].args[0] if match.root.args else None
        shapes = split.meta.get("shape") if isinstance(split, fx.Node) else None
        if not isinstance(shapes, list) or len(shapes) != parts:
            return f"the split has {len(shapes) if isinstance(shapes, list) else '?'} parts"
        return passthrough(match)

    return check


def _split_cat_rules() -> list[Rule]:
    """cat(split(x)[0], ..., split(x)[n-1]) in order is x, for n = 2..4, split and chunk."""
    def make(split_fn, n: int):
        def pattern(x, s, d):
            parts = split_fn(x, s, d)
            return torch.cat([parts[i] for i in range(n)], d)

        return pattern

    rules = []
    for n in (2, 3, 4):
        for name, fn in (("split", torch.split), ("chunk", torch.chunk)):
            rules.append(Rule(f"{name}_then_cat_{n}", make(fn, n), lambda x, s, d: x,
                              _split_parts_check(n)))
    return rules


# --------------------------------------------------------------------------- linear chains
def _merge_linear_check(match: Match) -> str | None:
    w1, w2 = match.tensor("w1"), match.tensor("w2")
    if w1 is None or w2 is None:
        return "weights are computed in the graph"
    for name in ("b1", "b2"):
        # nn.Linear(bias=False) binds a ParamRef to its absent bias: no bias, not computed
        absent = isinstance(match[name], ParamRef) and match[name].value is None
        if match[name] is not None and not absent and match.tensor(name) is None:
            return f"{name} is computed in the graph"
    out_f, hidden = w2.shape
    in_f = w1.shape[1]
    if out_f * in_f > hidden * (in_f + out_f):
        return (f"merged weight {out_f}x{in_f} would cost more than the two layers "
                f"({hidden} hidden units)")
    return None


def _merge_linear_rewrite(match: Match, graph: fx.Graph):
    w1, w2 = match.tensor("w1").detach().double(), match.tensor("w2").detach().double()
    b1, b2 = match.tensor("b1"), match.tensor("b2")
    dtype = match.tensor("w1").dtype
    weight = (w2 @ w1).to(dtype)
    bias = torch.zeros(w2.shape[0], dtype=torch.float64)
    if b1 is not None:
        bias = bias + w2 @ b1.detach().double()
    if b2 is not None:
        bias = bias + b2.detach().double()
    gm = graph.owning_module
    names = []
    for suffix, value in (("weight", weight), ("bias", bias.to(dtype))):
        name = fresh_attr(gm, f"{match.root.name}_merged_{suffix}")
        gm.register_buffer(name, value.contiguous())
        names.append(graph.get_attr(name))
    return graph.call_function(F.linear, (match["x"], names[0], names[1]))


# --------------------------------------------------------------------------- activations
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3))))


def _gelu_tanh_cubed(x):
    return 0.5 * x * (1 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * (x * x * x))))


def _gelu_erf(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _gelu_erf_mul(x):
    return x * 0.5 * (1 + torch.erf(x * (1 / math.sqrt(2))))


def _float_input(match: Match) -> str | None:
    dtype = match["x"].meta.get("dtype") if isinstance(match["x"], fx.Node) else None
    if dtype is None or not dtype.is_floating_point:
        return "input is not a floating-point tensor"
    return None


SIMPLIFY_RULES = RuleSet([
    Rule("cancel_transpose_pair", lambda x, a, b, c, d: x.transpose(a, b).transpose(c, d),
         lambda x, a, b, c, d: x, _transpose_pair_check),
    Rule("merge_permute_pair", lambda x, p, q: x.permute(p).permute(q),
         check=_permute_pair_check, rewrite=_permute_pair_rewrite),
    Rule("collapse_reshape_chain", lambda x, s1, s2: x.reshape(s1).reshape(s2),
         lambda x, s1, s2: x.reshape(s2), _reshape_chain_check),
    Rule("drop_noop_reshape", lambda x, s: x.reshape(s), lambda x, s: x, _reshape_noop_check),
    Rule("drop_zero_pad", lambda x, p: F.pad(x, p), lambda x, p: x, _zero_pad_check),
    Rule("drop_zero_pad_full", lambda x, p, m, v: F.pad(x, p, m, v), lambda x, p, m, v: x,
         _zero_pad_check),
    Rule("drop_single_input_cat", lambda x, d: torch.cat([x], d), lambda x, d: x,
         _single_cat_check),
    *_split_cat_rules(),
    Rule("split_node_then_cat", lambda x, s, d: torch.cat(torch.split(x, s, d), d),
         lambda x, s, d: x, passthrough),
    Rule("chunk_node_then_cat", lambda x, s, d: torch.cat(torch.chunk(x, s, d), d),
         lambda x, s, d: x, passthrough),
    Rule("merge_linear_chain",
         lambda x, w1, b1, w2, b2: F.linear(F.linear(x, w1, b1), w2, b2),
         check=_merge_linear_check, rewrite=_merge_linear_rewrite),
    Rule("hardswish_relu6", lambda x: x * F.relu6(x + 3) / 6, lambda x: F.hardswish(x),
         _float_input),
    Rule("hardswish_hardtanh", lambda x: x * F.hardtanh(x + 3, 0.0, 6.0) / 6,
         lambda x: F.hardswish(x), _float_input),
    Rule("hardswish_clamp", lambda x: x * torch.clamp(x + 3, 0, 6) / 6,
         lambda x: F.hardswish(x), _float_input),
    Rule("hardswish_of_hardsigmoid", lambda x: x * F.hardsigmoid(x),
         lambda x: F.hardswish(x), _float_input),
    Rule("hardsigmoid_relu6", lambda x: F.relu6(x + 3) / 6, lambda x: F.hardsigmoid(x),
         _float_input),
    Rule("hardsigmoid_hardtanh", lambda x: F.hardtanh(x + 3, 0.0, 6.0) / 6,
         lambda x: F.hardsigmoid(x), _float_input),
    Rule("hardsigmoid_clamp", lambda x: torch.clamp(x + 3, 0, 6) / 6,
         lambda x: F.hardsigmoid(x), _float_input),
    Rule("gelu_tanh_approximation", _gelu_tanh, lambda x: F.gelu(x, approximate="tanh"),
         _float_input),
    Rule("gelu_tanh_approximation_cubed", _gelu_tanh_cubed,
         lambda x: F.gelu(x, approximate="tanh"), _float_input),
    Rule("gelu_erf", _gelu_erf, lambda x: F.gelu(x), _float_input),
    Rule("gelu_erf_mul", _gelu_erf_mul, lambda x: F.gelu(x), _float_input),
    Rule("double_negation", lambda x: torch.neg(torch.neg(x)), lambda x: x, passthrough),
])

register_rules("eliminate_noops", NOOP_RULES,
               doc="Remove x*1, x/1, x+0, x-0, no-op .contiguous() and same-type .to().")
register_rules("simplify", SIMPLIFY_RULES,
               doc="Cancel layout pairs, collapse reshapes/cats/linears, fuse activations.")
