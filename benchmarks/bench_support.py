"""Helpers the benchmark scripts share: machine facts, ONNX Runtime sessions with one set
of options, and table-cell text."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import onnxruntime as ort


def machine() -> str:
    """CPU model name and count, e.g. ``"AMD EPYC 7B13, 2 CPUs"``."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs"


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def cell(text: str) -> str:
    """``text`` made safe for one markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def short_error(e: BaseException, limit: int = 160) -> str:
    """``Type: message`` on one line, cut to ``limit`` characters."""
    text = f"{type(e).__name__}: {' '.join(str(e).split())}"
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def ort_options(threads: int, optimized_path: Path | None = None) -> ort.SessionOptions:
    """The session options every file in a comparison gets: ORT_ENABLE_ALL, ``threads``
    intra-op threads, one inter-op thread; optionally saving the optimized graph."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return opts


def ort_session(path: Path, opts: ort.SessionOptions) -> ort.InferenceSession:
    """A CPU session on ``path``."""
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_feeds(session: ort.InferenceSession, inputs: tuple) -> dict[str, np.ndarray]:
    """``inputs`` (torch tensors) as the session's named numpy feeds."""
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise RuntimeError(f"the file takes {len(names)} inputs, the model {len(inputs)}")
    return {n: x.detach().contiguous().numpy() for n, x in zip(names, inputs)}
