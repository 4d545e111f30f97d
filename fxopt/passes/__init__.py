"""Built-in passes; importing this package registers them."""

from fxopt.passes import builtin_rules, cleanup, constants, fusion, quantize, rules  # noqa: F401
from fxopt.passes.base import (
    REGISTRY,
    Pass,
    PassContext,
    PassResult,
    Semantics,
    known_passes,
    register_pass,
)

__all__ = [
    "REGISTRY",
    "Pass",
    "PassContext",
    "PassResult",
    "Semantics",
    "known_passes",
    "register_pass",
]
