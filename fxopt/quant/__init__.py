"""Quantization: Q/DQ (fake-quant) insertion with calibration, dynamic int8, weight-only
int8/int4, sensitivity analysis and quantization-aware training.

Example::

    res = fxopt.optimize(model, inputs, "default,quantize(scheme=int8,target=ort)",
                         calibration=batches)
"""

import importlib

_SUBMODULES = ("dynamic", "fake_quant", "observers", "qat", "qdq", "select", "sensitivity",
               "static", "weight_only")


def __getattr__(name: str):  # fxopt.quant.qat etc. without importing ONNX at `import fxopt`
    if name in _SUBMODULES:
        return importlib.import_module(f"fxopt.quant.{name}")
    raise AttributeError(f"module 'fxopt.quant' has no attribute {name!r}")
