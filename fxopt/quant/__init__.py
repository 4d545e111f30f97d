"""Quantization: Q/DQ (fake-quant) insertion with calibration, dynamic int8, weight-only
int8/int4, sensitivity analysis and quantization-aware training.

Example::

    res = fxopt.optimize(model, inputs, "default,quantize(scheme=int8,target=ort)",
                         calibration=batches)
"""
