"""ONNX Runtime sessions for the ONNX backend: session options, execution providers, and
which providers a verification runs on.

``providers`` is a list of ONNX Runtime provider names (or ``(name, options)`` pairs) in
priority order, e.g. ``["TensorrtExecutionProvider", "CUDAExecutionProvider",
"CPUExecutionProvider"]``. A provider this ONNX Runtime lacks is an error naming every
missing one, unless ``provider_fallback=True`` drops them (with a warning). A session that
silently falls back (ONNX Runtime does that when, say, the TensorRT libraries do not load)
is caught too: the providers the session really uses are checked and recorded.

Example::

    config = session_config(None, "all", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    session = open_session(Path("m.onnx"), config)
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from fxopt.errors import FxoptWarning, LoweringError
from fxopt.verify import Tolerance

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider",
)
CPU = "CPUExecutionProvider"
# accelerator providers may run float32 matmuls in TF32 (10-bit mantissa) and fuse kernels
# in another order: their outputs are compared within ~1e-3 of the scale, not 1e-4
ACCELERATOR_TOLERANCE = Tolerance(rtol=5e-3, atol=1e-4)
_INSTALL = {
    "TensorrtExecutionProvider": "pip install onnxruntime-gpu, with TensorRT's libraries "
                                 "(pip install tensorrt) and a CUDA GPU",
    "CUDAExecutionProvider": "pip install onnxruntime-gpu (instead of onnxruntime) on a "
                             "machine with a CUDA GPU",
}


def provider_name(p: Any) -> str:
    return p[0] if isinstance(p, (tuple, list)) else p


def resolve_providers(requested: Sequence[Any], available: Sequence[str],
                      fallback: bool = False) -> tuple[list[Any], list[str]]:
    """``(providers to use, missing names)``. Missing providers raise LoweringError naming
    each and how to get it, unless ``fallback`` (then they are dropped, keeping the order).

    >>> resolve_providers(["CUDAExecutionProvider", "CPUExecutionProvider"],
    ...                   ["CPUExecutionProvider"], fallback=True)
    (['CPUExecutionProvider'], ['CUDAExecutionProvider'])
    """
    if isinstance(requested, (str, bytes)) or not all(
            isinstance(provider_name(p), str) for p in requested):
        raise LoweringError(f"providers must be a list of ONNX Runtime provider names, got "
                            f"{requested!r}, e.g. ['CUDAExecutionProvider', "
                            "'CPUExecutionProvider']")
    missing = [provider_name(p) for p in requested if provider_name(p) not in available]
    use = [p for p in requested if provider_name(p) in available]
    if missing and (not fallback or not use):
        how = "; ".join(f"{m}: {_INSTALL[m]}" for m in missing if m in _INSTALL)
        raise LoweringError(
            f"ONNX Runtime provider(s) {', '.join(missing)} not available here (available: "
            f"{', '.join(available)})" + (f"; to get them: {how}" if how else "")
            + ("" if not use else "; or pass provider_fallback=True to verify and run on "
               f"{', '.join(provider_name(p) for p in use)} only"))
    if missing:
        warnings.warn(f"fxopt: ONNX Runtime lacks {', '.join(missing)}; using "
                      f"{', '.join(provider_name(p) for p in use)}", FxoptWarning, stacklevel=3)
    return use, missing


def session_config(threads: int | None, level: str, providers: Sequence[Any] | None,
                   fallback: bool = False) -> dict:
    """Checked session options: ``threads``, ``graph_optimization_level``, ``providers``
    (default: the preferred providers this ONNX Runtime has) and the ``missing`` ones."""
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise LoweringError(f"threads must be a positive integer, got {threads!r}")
    if level not in LEVELS:
        raise LoweringError(f"graph_optimization_level {level!r}: use one of {', '.join(LEVELS)}")
    available = ort.get_available_providers()
    missing: list[str] = []
    if providers is None:
        providers = [p for p in PREFERRED_PROVIDERS if p in available]
    else:
        providers, missing = resolve_providers(list(providers), available, fallback)
    return {"threads": threads, "graph_optimization_level": level,
            "providers": list(providers), "missing": missing}


def open_session(f: Path, config: dict, log_level: int = 3,
                 strict: bool = False) -> ort.InferenceSession:
    """An InferenceSession with ``config``; ``strict``: raise if ONNX Runtime did not take
    every requested provider (it falls back silently when one fails to initialize)."""
    options = ort.SessionOptions()
    options.log_severity_level = log_level
    options.graph_optimization_level = LEVELS[config["graph_optimization_level"]]
    if config.get("threads"):
        options.intra_op_num_threads = config["threads"]
        options.inter_op_num_threads = 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fallback is checked below
            session = ort.InferenceSession(str(f), options, providers=config["providers"])
    except Exception as e:
        raise LoweringError(f"ONNX Runtime cannot open {f.name}{_kernel_hint(f, str(e), config)}: "
                            f"{str(e).strip()[:400]}") from e
    wanted = [provider_name(p) for p in config["providers"]]
    dropped = [p for p in wanted if p not in session.get_providers()]
    if strict and dropped:
        raise LoweringError(
            f"ONNX Runtime did not use {', '.join(dropped)} for {f.name} (it fell back to "
            f"{', '.join(session.get_providers())}): the provider failed to initialize; check "
            "its libraries (CUDA, cuDNN, TensorRT) or pass provider_fallback=True")
    return session


def verification_configs(config: dict, verify_providers: bool) -> list[dict]:
    """The CPU configuration every verification runs on, plus the requested providers when
    they are not CPU alone."""
    cpu = session_config(None, "all", [CPU])
    names = [provider_name(p) for p in config["providers"]]
    if verify_providers and names and names != [CPU]:
        return [cpu, {**config, "threads": None}]
    return [cpu]


def _kernel_hint(f: Path, msg: str, config: dict) -> str:
    """Name the missing kernel of a bfloat16 model (ONNX Runtime's CPU provider lacks many:
    Conv, MatMul, Add...) and what to do; empty for any other failure."""
    op = (re.search(r"Could not find an implementation for (\w+\(\d+\))", msg)
          or re.search(r"tensor\(bfloat16\)' of input parameter \(\S*\) of operator \((\w+)\)",
                       msg))
    if op is None:
        return ""
    try:
        proto = onnx.load_model(str(f), load_external_data=False)
    except Exception:  # noqa: BLE001 - the hint is a courtesy; the raw error follows
        return ""
    bf16 = onnx.TensorProto.BFLOAT16
    if not any(t.data_type == bf16 for t in proto.graph.initializer) and not any(
            v.type.tensor_type.elem_type == bf16
            for v in [*proto.graph.input, *proto.graph.value_info]):
        return ""
    providers = [provider_name(p) for p in config["providers"]]
    return (f" (no bfloat16 kernel for {op[1]} on {', '.join(providers)}: export with "
            "half(dtype=fp16), or run on a provider with bfloat16 kernels such as CUDA)")


__all__ = ["ACCELERATOR_TOLERANCE", "LEVELS", "PREFERRED_PROVIDERS", "open_session",
           "resolve_providers", "session_config", "verification_configs"]
