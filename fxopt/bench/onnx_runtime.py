"""ONNX Runtime pieces of a side-by-side benchmark: one set of session options for every
file, numpy feeds, the plain ``torch.onnx.export`` peer and ONNX Runtime's own quantizers
(``quantize_static`` after ``quant_pre_process``, ``quantize_dynamic``) applied to it.

Every ``.onnx`` candidate is timed through ``OrtRunner``: a CPU session with
``session_options(threads)`` and feeds converted without copying, so the files differ only
in what they contain.

Example::

    from fxopt.bench.onnx_runtime import OrtRunner, plain_export, ort_quantize_static

    plain_export(model, (x,), "out/plain.onnx")
    ort_quantize_static("out/plain.onnx", "out/q.onnx", [(x,)], workdir="out")
    run = OrtRunner("out/q.onnx", threads=2)
    y = run(x)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["OrtRunner", "ort_feeds", "ort_quantize_dynamic", "ort_quantize_static",
           "plain_export", "session", "session_options"]


def session_options(threads: int, optimized_path: str | os.PathLike | None = None, *,
                    spinning: bool = False) -> ort.SessionOptions:
    """The options every file in a comparison gets: ORT_ENABLE_ALL, ``threads`` intra-op
    threads, one inter-op thread, errors-only logging, intra-op threads that sleep when
    idle instead of spinning (``spinning=False``); optionally saving the optimized graph to
    ``optimized_path``.

    A comparison keeps a dozen sessions and PyTorch in one process and calls them in turn:
    with ONNX Runtime's default spin-wait, the threads of the file just timed keep spinning
    on the cores the next file needs. On the 2-core machine this made the per-round medians
    of the zoo GQA model's int8 files bimodal (0.13 or 0.21 ms), and an interleaved run
    with PyTorch calls between the files measured fxopt's dynamic int8 file 1.02x as fast
    as ORT's ``quantize_dynamic`` one, where the same run without spinning measures 1.23x
    (and the two files alone, spinning, 1.17x). A deployment runs one session per process,
    where spinning only trims the wake-up latency of every file alike.

    Example::

        opts = session_options(2)
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return opts


def session(path: str | os.PathLike, opts: ort.SessionOptions) -> ort.InferenceSession:
    """A CPU-provider session on ``path``.

    Example::

        sess = session("model.onnx", session_options(1))
    """
    import onnxruntime as ort

    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_feeds(sess: ort.InferenceSession, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
    """``inputs`` (torch tensors) as the session's named numpy feeds (no copy for
    contiguous CPU tensors).

    Example::

        sess.run(None, ort_feeds(sess, (x,)))
    """
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(inputs):
        raise RuntimeError(f"the file takes {len(names)} inputs, the model {len(inputs)}")
    return {n: x.detach().contiguous().numpy() for n, x in zip(names, inputs)}


class OrtRunner:
    """A callable over one ``.onnx`` file: ``runner(*tensors)`` returns torch tensors (one
    tensor for a single output, else a tuple), through ``session_options(threads)``.

    Example::

        run = OrtRunner("model.onnx", threads=1)
        y = run(torch.randn(1, 3, 32, 32))
    """

    def __init__(self, path: str | os.PathLike, threads: int) -> None:
        self.path = Path(path)
        self.session = session(self.path, session_options(threads))

    def __call__(self, *inputs: Any) -> Any:
        outs = self.session.run(None, ort_feeds(self.session, inputs))
        tensors = tuple(torch.from_numpy(np.asarray(o)) for o in outs)
        return tensors[0] if len(tensors) == 1 else tensors

    def __repr__(self) -> str:
        return f"OrtRunner({str(self.path)!r})"


def plain_export(model: torch.nn.Module, inputs: Sequence[Any], path: str | os.PathLike, *,
                 dynamic_batch: bool = False) -> Path:
    """``torch.onnx.export(model, inputs, path)`` with torch's defaults (the
    torch.export-based exporter, static shapes), its console output silenced: the peer
    every fxopt file is compared with. ``dynamic_batch`` makes dimension 0 of every input
    symbolic (``dynamic_axes``), for validation batches of another size.

    Example::

        plain_export(model, (x,), "out/plain.onnx")
    """
    from fxopt.lowering.onnx_export import quiet

    path = Path(path)
    kw: dict[str, Any] = {}
    if dynamic_batch:
        names = [f"input_{i}" for i in range(len(inputs))]
        kw = {"input_names": names, "dynamic_axes": {n: {0: "batch"} for n in names}}
    with quiet(), torch.no_grad():
        torch.onnx.export(model, tuple(inputs), str(path), **kw)
    return path


def _input_names(path: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits]


def ort_quantize_static(fp32: str | os.PathLike, out: str | os.PathLike,
                        batches: Sequence[Sequence[torch.Tensor]], *,
                        workdir: str | os.PathLike) -> bool:
    """ONNX Runtime's own static int8 of ``fp32``: ``quant_pre_process`` (skipped where it
    fails), then ``quantize_static(QDQ, per_channel=True, activations QUInt8, weights
    QInt8)`` with MinMax calibration over ``batches``. Returns whether pre-processing ran.

    Example::

        ort_quantize_static("plain.onnx", "ortq.onnx", [(x,)], workdir="tmp")
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = Path(fp32)
    names = _input_names(fp32)
    feeds = [{n: x.detach().contiguous().numpy() for n, x in zip(names, b)} for b in batches]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self._it, None)

    pre = Path(workdir) / f"{fp32.stem}.pre.onnx"
    try:
        quant_pre_process(str(fp32), str(pre))
        source, pre_ok = pre, True
    except Exception:  # noqa: BLE001 - ORT's pre-processing is optional: quantize as is
        source, pre_ok = fp32, False
    with _quiet_root_logger():
        quantize_static(str(source), str(out), _Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    return pre_ok


def ort_quantize_dynamic(fp32: str | os.PathLike, out: str | os.PathLike) -> None:
    """ONNX Runtime's own dynamic int8 of ``fp32``: ``quantize_dynamic(weight_type=QInt8,
    per_channel=True)`` (every op type it knows, embeddings included).

    Example::

        ort_quantize_dynamic("plain.onnx", "ortdq.onnx")
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_root_logger():
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True)


class _quiet_root_logger:
    """ORT's quantizers log advice ("consider pre-processing") on the root logger."""

    def __enter__(self) -> None:
        self._level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().setLevel(self._level)
