"""Built-in passes; importing this package registers them."""

from fxopt.passes import (  # noqa: F401
    attention,
    builtin_rules,
    cleanup,
    constants,
    finetune,
    fusion,
    half,
    prune,
    quantize,
    rules,
    sparsify,
)
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
