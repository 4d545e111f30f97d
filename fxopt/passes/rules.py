"""Declarative rewrite rules: a pattern and a replacement written as plain torch code.

Patterns are matched through ``fxopt.ops``, so one rule written with ``F.relu`` /
``x.transpose`` matches ``nn.ReLU`` modules, torch functions, Tensor methods and ATen ops
alike. A rule may add a ``check`` that returns a reason when it refuses; a failed match is
a ``NoMatch`` value with the reason and the node where the pattern stopped matching::

    def pattern(x):
        return -(-x)

    def replacement(x):
        return x

    double_neg = Rule("double_negation", pattern, replacement)
    register_rules("my_rules", RuleSet([double_neg]))   # now usable as "default,my_rules"

Rule sets concatenate (``RuleSet(a) + RuleSet(b)``); a rule-set pass applies its rules
until none fires (a fixed point).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from fxopt.graph_utils import fresh_attr, refresh_metadata
from fxopt.op_props import Prop
from fxopt.ops import OpView, _aten_name, fetch_attr, has_prop, kind_of, op_of
from fxopt.passes.base import PassContext, PassResult, Semantics, register_pass

MISSING = object()


@dataclass
class ParamRef:
    """A weight an op owns (a module parameter, or a tensor fed by get_attr)."""

    node: fx.Node
    name: str

    @property
    def value(self) -> torch.Tensor | None:
        return op_of(self.node).params.get(self.name)


@dataclass(frozen=True)
class NoMatch:
    """Why a rule did not apply at ``node`` (falsy, so ``if rule.match(n):`` reads well)."""

    rule: str
    node: str
    reason: str
    pattern_node: str = ""

    def __bool__(self) -> bool:
        return False

    def __str__(self) -> str:
        at = f" (pattern node {self.pattern_node})" if self.pattern_node else ""
        return f"{self.rule} at {self.node}{at}: {self.reason}"


@dataclass
class Match:
    """A successful match: graph nodes per pattern node and values per pattern argument."""

    rule: Rule
    root: fx.Node
    nodes: dict[fx.Node, fx.Node] = field(default_factory=dict)
    bindings: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.bindings[name]

    def shape(self, name: str) -> tuple | None:
        value = self.bindings.get(name)
        return value.meta.get("shape") if isinstance(value, fx.Node) else None

    def tensor(self, name: str) -> torch.Tensor | None:
        """The constant tensor bound to ``name`` (get_attr or owned weight), else None."""
        value = self.bindings.get(name)
        if isinstance(value, ParamRef):
            return value.value
        if isinstance(value, fx.Node) and value.op == "get_attr":
            obj = fetch_attr(value.graph.owning_module, value.target)
            return obj if isinstance(obj, torch.Tensor) else None
        return value if isinstance(value, torch.Tensor) else None

    @property
    def matched(self) -> list[fx.Node]:
        return list(self.nodes.values())


Check = Callable[[Match], "str | None"]
Rewrite = Callable[[Match, fx.Graph], Any]


class Rule:
    """``Rule(name, pattern, replacement, check=None)``; ``rewrite=`` for computed outputs.

    ``pattern`` and ``replacement`` are plain functions of the same parameters. Parameters
    bind to graph values (tensors, weights, or literal arguments such as dims); a parameter
    used twice must bind to the same value. ``check(match)`` returns a reason to refuse or
    None. ``rewrite(match, graph)`` replaces ``replacement`` when the new graph needs
    computed values (merged weights); it inserts nodes and returns the new output value.
    """

    def __init__(self, name: str, pattern: Callable, replacement: Callable | None = None,
                 check: Check | None = None, *, rewrite: Rewrite | None = None):
        if (replacement is None) == (rewrite is None):
            raise ValueError(f"rule {name}: give exactly one of replacement= or rewrite=")
        self.name, self.pattern, self.replacement = name, pattern, replacement
        self.check, self.rewrite = check, rewrite
        self._pattern_gm: fx.GraphModule | None = None
        self._replacement_gm: fx.GraphModule | None = None

    def __repr__(self) -> str:
        return f"Rule({self.name})"

    # ------------------------------------------------------------------ compiled forms
    @property
    def pattern_graph(self) -> fx.GraphModule:
        if self._pattern_gm is None:
            self._pattern_gm = fx.symbolic_trace(self.pattern)
        return self._pattern_gm

    @property
    def root_pattern(self) -> fx.Node:
        out = self.pattern_graph.graph.output_node().args[0]
        if not isinstance(out, fx.Node) or not out.op.startswith("call"):
            raise ValueError(f"rule {self.name}: a pattern must return one op's result")
        return out

    @functools.cached_property
    def root_kind(self) -> str:
        return op_of(self.root_pattern).kind

    # ------------------------------------------------------------------ matching
    def match(self, node: fx.Node) -> Match | NoMatch:
        """Match the pattern with ``node`` as its output (a ``NoMatch`` says why not)."""
        state = _State(self, node)
        failure = state.match_node(self.root_pattern, node)
        if failure is not None:
            return failure
        match = Match(self, node, dict(state.nodes), dict(state.bindings))
        inner = set(match.matched)
        for g in match.matched:
            if g is node:
                continue
            outside = [u.name for u in g.users if u not in inner]
            if outside:
                return NoMatch(self.name, node.name,
                               f"{g.name} is also used outside the pattern by "
                               f"{', '.join(sorted(outside))}")
            if len(g.users) == 0:
                return NoMatch(self.name, node.name, f"{g.name} has no users")
        if self.check is not None:
            reason = self.check(match)
            if reason:
                return NoMatch(self.name, node.name, f"check refused: {reason}")
        return match

    # ------------------------------------------------------------------ rewriting
    def apply(self, match: Match) -> None:
        graph = match.root.graph
        with graph.inserting_before(match.root):
            if self.rewrite is not None:
                result = self.rewrite(match, graph)
            else:
                result = self._insert_replacement(match, graph)
        if not isinstance(result, fx.Node):
            raise TypeError(f"rule {self.name}: the replacement must produce a graph value")
        match.root.replace_all_uses_with(result)
        for g in reversed(_topological(match.matched)):
            if not g.users and g is not result:
                graph.erase_node(g)

    def _insert_replacement(self, match: Match, graph: fx.Graph) -> Any:
        if self._replacement_gm is None:
            self._replacement_gm = fx.symbolic_trace(self.replacement)
        env: dict[fx.Node, Any] = {}
        for n in self._replacement_gm.graph.nodes:
            if n.op == "placeholder":
                env[n] = _as_graph_value(match.bindings[n.target], graph)
            elif n.op == "output":
                return fx.node.map_arg(n.args[0], lambda a: env[a])
            elif n.op in ("call_function", "call_method"):
                args = fx.node.map_arg(n.args, lambda a: env[a])
                kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
                env[n] = graph.create_node(n.op, n.target, args, kwargs)
                env[n].meta["fxopt_module_path"] = match.root.meta.get("fxopt_module_path", "")
            else:
                raise ValueError(f"rule {self.name}: replacements may only call functions/methods")
        raise ValueError(f"rule {self.name}: replacement has no output")


def _as_graph_value(value: Any, graph: fx.Graph) -> Any:
    if isinstance(value, ParamRef):
        gm = graph.owning_module
        tensor = value.value
        name = fresh_attr(gm, f"{value.node.name}_{value.name}_rule")
        gm.register_buffer(name, tensor)
        return graph.get_attr(name)
    return value


def _topological(nodes: Iterable[fx.Node]) -> list[fx.Node]:
    wanted = set(nodes)
    if not wanted:
        return []
    graph = next(iter(wanted)).graph
    return [n for n in graph.nodes if n in wanted]


class _State:
    def __init__(self, rule: Rule, root: fx.Node):
        self.rule, self.root = rule, root
        self.nodes: dict[fx.Node, fx.Node] = {}
        self.bindings: dict[str, Any] = {}
        self.reached = 0  # most pattern nodes matched by the current attempt

    def fail(self, pnode: fx.Node, gvalue: Any, reason: str) -> NoMatch:
        where = gvalue.name if isinstance(gvalue, fx.Node) else repr(gvalue)
        return NoMatch(self.rule.name, self.root.name, f"at {where}: {reason}", pnode.name)

    def snapshot(self) -> tuple[dict, dict]:
        return dict(self.nodes), dict(self.bindings)

    def restore(self, snap: tuple[dict, dict]) -> None:
        self.nodes, self.bindings = dict(snap[0]), dict(snap[1])

    def match_node(self, pnode: fx.Node, gvalue: Any) -> NoMatch | None:
        if pnode.op == "placeholder":
            name = pnode.target
            if name in self.bindings:
                if not _same_value(self.bindings[name], gvalue):
                    return self.fail(pnode, gvalue, f"{name} is already bound to "
                                     f"{_describe(self.bindings[name])}, here it is "
                                     f"{_describe(gvalue)}")
                return None
            self.bindings[name] = gvalue
            return None
        if pnode in self.nodes:
            return None if self.nodes[pnode] is gvalue else self.fail(
                pnode, gvalue, "one pattern value matched two different graph values")
        pview = op_of(pnode)
        if not isinstance(gvalue, fx.Node) or not gvalue.op.startswith("call"):
            return self.fail(pnode, gvalue, f"expected {pview.kind}, found {_describe(gvalue)}")
        gview = op_of(gvalue)
        if gview.kind != pview.kind:
            return self.fail(pnode, gvalue, f"expected {pview.kind}, found {gview.kind}")
        attempts = [False, True] if has_prop(pview, Prop.COMMUTATIVE) else [False]
        best: tuple[int, NoMatch] | None = None
        for swap in attempts:
            snap = self.snapshot()
            self.nodes[pnode] = gvalue
            self.reached = len(self.nodes)
            failure = self._match_args(pview, gview, swap)
            if failure is None:
                self.reached = len(self.nodes)
                return None
            # report the attempt that matched the most; a nested failure has restored its
            # nodes already and leaves how far it got in self.reached
            depth = max(self.reached, len(self.nodes))
            if best is None or depth > best[0]:
                best = (depth, failure)
            self.restore(snap)
        self.reached = best[0]
        return best[1]

    def _match_args(self, pview: OpView, gview: OpView, swap: bool) -> NoMatch | None:
        # in signature order, not set order: which operand binds a parameter first must not
        # depend on the interpreter's string hashing (PYTHONHASHSEED)
        order = list(pview.entry.signature) if pview.entry else []
        names = _arg_names(pview) | _arg_names(gview)
        for name in sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n)):
            pv = _arg(pview, name)
            gname = {"input": "other", "other": "input"}.get(name, name) if swap else name
            gv = _arg(gview, gname)
            if pv is MISSING:
                pv = _default(pview, name, gv)
            if gv is MISSING:
                gv = _default(gview, name, pv)
            if pv is MISSING and gv is MISSING:
                continue
            if pv is MISSING or gv is MISSING:
                missing = "pattern" if pv is MISSING else "graph"
                return self.fail(pview.node, gview.node,
                                 f"argument {name!r} is given only in the "
                                 f"{'graph' if missing == 'pattern' else 'pattern'}")
            failure = self.match_value(pview.node, pv, gv, name)
            if failure is not None:
                return failure
        return None

    def match_value(self, pnode: fx.Node, pv: Any, gv: Any, name: str) -> NoMatch | None:
        if isinstance(pv, fx.Node):
            return self.match_node(pv, gv)
        if isinstance(pv, (list, tuple)):
            if not isinstance(gv, (list, tuple)) or len(gv) != len(pv):
                return self.fail(pnode, gv, f"argument {name!r}: expected {len(pv)} items, "
                                 f"found {_describe(gv)}")
            for p_item, g_item in zip(pv, gv):
                failure = self.match_value(pnode, p_item, g_item, name)
                if failure is not None:
                    return failure
            return None
        if not _same_literal(pv, gv):
            return self.fail(pnode, gv, f"argument {name!r}: expected {pv!r}, found "
                             f"{_describe(gv)}")
        return None


def _schema_aliases(view: OpView) -> dict[str, str]:
    """Our name -> ATen schema name where the schema spells an argument differently from
    the op table at the same position (``aten.view(self, size)`` is reshape's ``shape``)."""
    if view.form != "aten" or view.entry is None:
        return {}
    names, sig = view._names(), view.entry.signature
    return {sig[i]: n for i, n in enumerate(names[: len(sig)])
            if n not in sig and sig[i] not in names}


def _arg_names(view: OpView) -> set[str]:
    """Arguments the node states explicitly (defaults it does not state are left out)."""
    if view.module is not None:
        return {"input"} | set(view.entry.params if view.entry else ())
    names = view._names()
    n_args = len(view.node.args)
    explicit = set(names[:n_args]) if n_args <= len(names) else set(names)
    kwargs = set(view.node.kwargs)
    if view.form == "aten":
        kwargs = {_aten_name(k, view.node.target) for k in kwargs}
    ours = {schema: name for name, schema in _schema_aliases(view).items()}
    return {ours.get(n, n) for n in explicit | kwargs}


def _arg(view: OpView, name: str) -> Any:
    if view.module is not None:
        if name == "input":
            return view.input if view.input is not None else MISSING
        if view.entry and name in view.entry.params:
            return ParamRef(view.node, name)
        return MISSING
    return view.arg(_schema_aliases(view).get(name, name), MISSING)


# Arguments whose usual value changes nothing about the result.
_NEUTRAL_DEFAULTS = {"inplace": False}


def _default(view: OpView, name: str, other: Any) -> Any:
    """The value an unstated argument takes, when it is known (else MISSING)."""
    if view.entry is not None and name in view.entry.defaults:
        return view.entry.defaults[name]
    if name in _NEUTRAL_DEFAULTS and _same_literal(other, _NEUTRAL_DEFAULTS[name]):
        return other
    return MISSING


def _same_literal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - tensors and odd values compare as different
        return False


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    if isinstance(a, ParamRef) and isinstance(b, ParamRef):
        return a.node is b.node and a.name == b.name
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return _same_literal(a, b)


def _describe(value: Any) -> str:
    if isinstance(value, fx.Node):
        kind = op_of(value).kind if value.op.startswith("call") else value.op
        return f"{value.name} ({kind})"
    if isinstance(value, ParamRef):
        return f"weight {value.name} of {value.node.name}"
    return repr(value)


# --------------------------------------------------------------------------- rule sets
class RuleSet:
    """An ordered collection of rules; ``a + b`` concatenates."""

    def __init__(self, rules: Iterable[Rule] = ()):
        self.rules = list(rules)
        names = [r.name for r in self.rules]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"duplicate rule names in a rule set: {', '.join(sorted(dupes))}")

    def __add__(self, other: RuleSet) -> RuleSet:
        return RuleSet(self.rules + list(other.rules))

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        return f"RuleSet({', '.join(r.name for r in self.rules)})"

    def apply(self, gm: fx.GraphModule, example_inputs: tuple | None = None, *,
              max_rounds: int = 20) -> dict[str, int]:
        """Apply every rule until none fires; returns how often each fired."""
        fired: dict[str, int] = {}
        for _ in range(max_rounds):
            changed = False
            kinds: dict[tuple, str] = {}  # one op-table lookup per node and target a round
            for rule in self.rules:
                kind = rule.root_kind
                for node in list(gm.graph.nodes):
                    if getattr(node, "_erased", False) or not node.op.startswith("call"):
                        continue
                    key = (node, node.target)
                    if key not in kinds:
                        kinds[key] = kind_of(node)
                    if kinds[key] != kind:
                        continue
                    match = rule.match(node)
                    if match:
                        rule.apply(match)
                        fired[rule.name] = fired.get(rule.name, 0) + 1
                        changed = True
            if not changed:
                break
            gm.graph.lint()
            gm.recompile()
            if example_inputs is not None:  # only the rewritten nodes, on fake tensors
                refresh_metadata(gm, example_inputs)
        return fired

    def by_kind(self, fired: dict[str, int]) -> dict[str, int]:
        """Fired counts regrouped by the op kind each rule rewrites (``{"mul": 2}``)."""
        kinds: dict[str, int] = {}
        for rule in self.rules:
            if rule.name in fired:
                kinds[rule.root_kind] = kinds.get(rule.root_kind, 0) + fired[rule.name]
        return kinds

    def explain(self, gm: fx.GraphModule, rule: str | None = None,
                node: str | None = None) -> list[Match | NoMatch]:
        """Debug mode: try each rule at every node of its root kind and say what happened.

        Example::

            for result in rules.explain(gm, rule="cancel_transpose_pair"):
                print(result)   # "... at transpose_1: expected transpose, found relu"
        """
        results: list[Match | NoMatch] = []
        for r in self.rules:
            if rule is not None and r.name != rule:
                continue
            for n in gm.graph.nodes:
                if not n.op.startswith("call") or (node is not None and n.name != node):
                    continue
                if node is None and kind_of(n) != r.root_kind:
                    continue
                results.append(r.match(n))
        return results


RULE_SETS: dict[str, RuleSet] = {}


def register_rules(name: str, rules: RuleSet | Iterable[Rule],
                   semantics: Semantics = Semantics.EXACT, doc: str | None = None) -> RuleSet:
    """Register ``rules`` as a pass called ``name`` that runs them to a fixed point.

    Example::

        register_rules("my_rules", RuleSet([my_rule]))
        fxopt.optimize(model, inputs, pipeline="default,my_rules")
    """
    rule_set = rules if isinstance(rules, RuleSet) else RuleSet(rules)
    RULE_SETS[name] = rule_set

    def run(gm: fx.GraphModule, ctx: PassContext, *, debug: bool = False) -> PassResult:
        rule_set = RULE_SETS[name]
        fired = rule_set.apply(gm, ctx.example_inputs)
        stats: dict[str, Any] = {"fired": fired, "by_kind": rule_set.by_kind(fired)}
        if debug:
            stats["refused"] = [str(r) for r in RULE_SETS[name].explain(gm) if not r]
        return PassResult(gm, modified=bool(fired), stats=stats)

    run.__doc__ = doc or f"Apply the {name} rule set ({len(rule_set)} rules) to a fixed point."
    run.__name__ = name
    register_pass(name, semantics)(run)
    return rule_set


__all__ = ["MISSING", "RULE_SETS", "Match", "NoMatch", "ParamRef", "Rule", "RuleSet",
           "register_rules"]
