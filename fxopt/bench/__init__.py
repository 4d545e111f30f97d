"""Measuring fxopt's artifacts: latency helpers (``timing``) and every candidate side by
side (``compare``): PyTorch eager, ``torch.compile``, fxopt's eager artifact, ONNX Runtime
on the plain export and on fxopt's fp32 / int8 / fp16 exports, ONNX Runtime's own
quantizers, TensorRT where installed.

Example::

    import fxopt.bench
    from fxopt.bench import compare_latency, threads

    with threads(2):
        cmp = compare_latency({"eager": model, "fxopt": res.module}, (x,))
    res = fxopt.bench.compare(model, (x,), rounds=5, out_dir="bench-out")
    print(res.table())

Nothing here asserts anything about the numbers; they are measurements, not checks.
"""

from fxopt.bench.accuracy import agreement, evaluate
from fxopt.bench.candidates import Built, Candidate, build, calibration_batches, default_candidates
from fxopt.bench.compare import compare, interleave, measure, select_candidates
from fxopt.bench.report import BenchResult, Row
from fxopt.bench.timing import Comparison, LatencyStats, compare_latency, measure_latency, threads

__all__ = [
    "BenchResult", "Built", "Candidate", "Comparison", "LatencyStats", "Row", "agreement",
    "build", "calibration_batches", "compare", "compare_latency", "default_candidates",
    "evaluate", "interleave", "measure", "measure_latency", "select_candidates", "threads",
]
