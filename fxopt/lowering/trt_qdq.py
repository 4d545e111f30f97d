"""Q/DQ moves for TensorRT's explicit quantization (the ``qdq`` stage of
``fxopt.lowering.trt_prepare``), on an onnx-graphsurgeon graph. Each is exact for a zero
point of 0 and a positive scale:

* ``Q -> DQ -> Relu`` becomes ``Relu -> Q -> DQ``: TensorRT fuses the producer (conv,
  gemm) with Relu and the Q after it; a Q/DQ pair between them separates the fusion.
* ``Q -> Clip -> DQ`` (a range narrower than int8's, e.g. -127..127) becomes
  ``Q -> DQ -> Clip`` with float bounds ``bound * scale``: a Clip on the int8 tensor sits
  between the pair TensorRT's explicit quantization matches.

fxopt's own ``quantize(target=tensorrt)`` graphs quantize inputs only, full int8 range,
and need neither; graphs from other tools may.

Example::

    done = move_qdq(graph)   # ["Relu relu moved before QuantizeLinear q ...", ...]
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Every consumer of ``old`` reads ``new`` instead."""
    for user in list(old.outputs):
        for k, t in enumerate(user.inputs):
            if t is old:
                user.inputs[k] = new


def move_qdq(graph: gs.Graph) -> list[str]:
    """Apply both moves wherever they match; returns what was moved, per node.

    >>> move_qdq(gs.import_onnx(onnx.load("m.onnx")))  # doctest: +SKIP
    ['Relu relu moved before QuantizeLinear q (TensorRT fuses ...)']
    """
    done = []
    for node in list(graph.nodes):
        if node.op == "Relu":
            done += _relu_before_qdq(graph, node)
        elif node.op == "Clip":
            done += _clip_after_dq(graph, node)
    return done


def _symmetric(node: gs.Node) -> bool:
    """A Q or DQ node with a positive constant scale and a zero point of 0."""
    scale = node.inputs[1]
    if not isinstance(scale, gs.Constant) or np.any(np.asarray(scale.values) <= 0):
        return False
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    return zp is None or not zp.name or (
        isinstance(zp, gs.Constant) and not np.any(np.asarray(zp.values) != 0))


def _pair(dq: gs.Node | None) -> gs.Node | None:
    """The QuantizeLinear feeding DequantizeLinear ``dq`` alone, both symmetric."""
    if dq is None or dq.op != "DequantizeLinear" or not dq.inputs[0].inputs:
        return None
    q = dq.inputs[0].inputs[0]
    if q.op != "QuantizeLinear" or len(q.outputs[0].outputs) != 1:
        return None
    return q if _symmetric(q) and _symmetric(dq) else None


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


def _relu_before_qdq(graph: gs.Graph, relu: gs.Node) -> list[str]:
    x = relu.inputs[0]
    dq = _producer(x)
    q = _pair(dq)
    if q is None or len(x.outputs) != 1 or x in graph.outputs:
        return []
    y = relu.outputs[0]
    pre = gs.Variable(f"{y.name}__pre_q", dtype=y.dtype, shape=y.shape)
    relu.inputs[0] = q.inputs[0]
    relu.outputs[0] = pre
    q.inputs[0] = pre
    dq.outputs[0] = y
    return [f"Relu {relu.name} moved before QuantizeLinear {q.name} (TensorRT fuses the "
            "producer with Relu and the Q after it)"]


def _clip_after_dq(graph: gs.Graph, clip: gs.Node) -> list[str]:
    q_out = clip.inputs[0]
    q, out = _producer(q_out), clip.outputs[0]
    dq = out.outputs[0] if len(out.outputs) == 1 else None
    if (q is None or q.op != "QuantizeLinear" or dq is None or dq.op != "DequantizeLinear"
            or len(q_out.outputs) != 1 or not (_symmetric(q) and _symmetric(dq))):
        return []
    scale = np.asarray(dq.inputs[1].values)
    bounds = clip.inputs[1:3]
    if scale.size != 1 or not all(isinstance(b, gs.Constant) for b in bounds if b.name):
        return []
    ftype = scale.dtype.type
    limits = [gs.Constant(f"{clip.name}/{k}", np.asarray(ftype(np.asarray(b.values).item())
                                                         * scale.reshape(())))
              if b.name else b for k, b in zip(("min", "max"), bounds)]
    y = dq.outputs[0]
    mid = gs.Variable(f"{y.name}__unclipped", dtype=y.dtype, shape=y.shape)
    dq.inputs[0] = q_out
    dq.outputs[0] = mid
    for k, t in enumerate([mid, *limits]):
        clip.inputs[k] = t
    clip.outputs[0] = y
    return [f"Clip {clip.name} moved from between QuantizeLinear {q.name} and "
            f"DequantizeLinear {dq.name} to after it, with float bounds"]


__all__ = ["move_qdq", "replace_uses"]
