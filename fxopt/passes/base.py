"""The pass contract: ``(gm, ctx) -> PassResult(gm, modified, stats)``, and the registry.

A pass is a function registered by name with a semantics class::

    @register_pass("remove_dropout", Semantics.EXACT)
    def remove_dropout(gm, ctx) -> PassResult:
        ...
        return PassResult(gm, modified=n > 0, stats={"removed": n})

``Pass("prune", ratio=0.5)`` configures a registered pass; the PassManager runs it and
verifies the result with a tolerance chosen by the semantics class.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch.fx as fx

from fxopt.errors import SpecError
from fxopt.verify import Tolerance


class Semantics(str, Enum):
    """What a pass promises about the function the graph computes."""

    EXACT = "exact"  # same function up to float round-off
    APPROXIMATE = "approximate"  # close (quantize, fp16): looser tolerance
    CHANGES = "changes-function"  # different on purpose (prune): checked for sanity only


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) graph, whether it changed, and statistics."""

    gm: fx.GraphModule
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may read besides the graph: example inputs, calibration data, notes,
    and for recovery training (``finetune``) the training / validation data and the
    teacher (the original model)."""

    example_inputs: tuple
    calibration: Iterable | None = None
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    train_data: Any = None
    val_data: Any = None
    teacher: Any = None


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: Callable[..., PassResult]
    semantics: Semantics
    doc: str
    tolerance: Any = None  # its own verification tolerance (or params -> one), if not its class's

    @property
    def parameters(self) -> dict[str, inspect.Parameter]:
        params = list(inspect.signature(self.fn).parameters.values())[2:]
        return {p.name: p for p in params if p.kind == p.KEYWORD_ONLY or p.default is not p.empty}


REGISTRY: dict[str, PassInfo] = {}


def register_pass(name: str, semantics: Semantics = Semantics.EXACT, tolerance: Any = None):
    """Register ``fn(gm, ctx, **params) -> PassResult`` under ``name``; ``tolerance``
    (a ``fxopt.verify.Tolerance``, or a function of the pass's arguments returning one)
    replaces the semantics class's default for this pass.

    Example::

        @register_pass("my_pass")
        def my_pass(gm, ctx, *, threshold: float = 0.5) -> PassResult: ...
    """

    def decorate(fn: Callable[..., PassResult]) -> Callable[..., PassResult]:
        doc = (inspect.getdoc(fn) or "").split("\n")[0]
        REGISTRY[name] = PassInfo(name, fn, Semantics(semantics), doc, tolerance)
        return fn

    return decorate


def known_passes() -> list[str]:
    """Names of all registered passes, sorted."""
    _load_builtin_passes()
    return sorted(REGISTRY)


def lookup_pass(name: str) -> PassInfo:
    _load_builtin_passes()
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, list(REGISTRY), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise SpecError(
            f"unknown pass {name!r}{hint}; known passes: {', '.join(known_passes())}"
        )
    return REGISTRY[name]


class Pass:
    """A registered pass with its arguments bound: ``Pass("prune", ratio=0.5)``.

    ``tolerance`` (a ``fxopt.verify.Tolerance``) overrides the semantics-class tolerance
    the manager verifies this pass with, and means nothing else; an accuracy target is a
    pass argument of its own (``Pass("quantize", budget=0.999)``).
    """

    def __init__(self, name: str, *, tolerance: Tolerance | None = None, **params: Any):
        self.info = lookup_pass(name)
        allowed = self.info.parameters
        if tolerance is not None and not isinstance(tolerance, Tolerance):
            hint = (f"; for an accuracy budget write {name}(budget={tolerance!r})"
                    if "budget" in allowed else "")
            raise SpecError(
                f"pass {name!r}: tolerance= is the verification tolerance, a "
                f"fxopt.verify.Tolerance(rtol=..., atol=...), not {tolerance!r}{hint}")
        unknown = [k for k in params if k not in allowed]
        if unknown:
            accepted = ", ".join(allowed) or "none"
            raise SpecError(
                f"pass {name!r} got unknown argument(s) {', '.join(unknown)}; "
                f"it accepts: {accepted}"
            )
        self.params = params
        self.tolerance = tolerance

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def semantics(self) -> Semantics:
        return self.info.semantics

    @property
    def spec(self) -> str:
        """The pipeline-spec text of this pass, e.g. ``prune(ratio=0.5)``."""
        if not self.params:
            return self.name
        args = ",".join(f"{k}={_format_value(v)}" for k, v in self.params.items())
        return f"{self.name}({args})"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return self.info.fn(gm, ctx, **self.params)

    def __repr__(self) -> str:
        return f"Pass({self.spec})"


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_format_value(x) for x in v) + "]"
    # quote strings the parser would read as something else ('12', 'a b', 'true', 'None')
    if isinstance(v, str) and (not v.isidentifier() or v.lower() in ("true", "false", "none")):
        return repr(v)
    return str(v)


def _load_builtin_passes() -> None:
    # importing the pass modules registers them
    import fxopt.passes  # noqa: F401
