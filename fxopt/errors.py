"""Typed, actionable errors. Every user-facing failure is a subclass of FxoptError."""

from __future__ import annotations


class FxoptError(Exception):
    """Base class of every error fxopt raises on purpose."""


class CaptureError(FxoptError):
    """A model could not be turned into a GraphModule (or the inputs do not fit it)."""


class PassError(FxoptError):
    """A pass failed, or its output failed verification against the reference."""


class QuantizationError(PassError):
    """Quantization cannot proceed: no calibration data, an observer never fed, nothing to
    quantize, or a graph that is already quantized."""


class LoweringError(FxoptError):
    """An artifact could not be written, or it does not reproduce the GraphModule."""


class SpecError(FxoptError):
    """A pipeline spec, recipe file or model SPEC could not be understood."""


class FxoptWarning(UserWarning):
    """Something worked, but not the way the user asked (e.g. an exporter fallback)."""


class InputSpecError(LoweringError):
    """An artifact was called with inputs that do not fit its input spec (count, dtype,
    rank or a static dim); raised before anything runs."""


class ArtifactVersionError(LoweringError):
    """An artifact was written by an fxopt / torch / format version this one cannot load."""


class TrainingError(FxoptError):
    """Recovery training cannot proceed: data that does not fit the graph, a teacher whose
    outputs do not match, a structure (sparsity mask, 2:4 pattern, pruned shape,
    fake-quant node) that training would break, or a checkpoint from another graph."""


class DistributedError(TrainingError):
    """A multi-process (torchrun) run failed: a missing backend, a bad global batch, or a
    rank that crashed (the message names the rank)."""


class CheckpointError(TrainingError):
    """A training checkpoint cannot be used: written for another graph, incomplete, or of
    an unknown format version."""


class BudgetError(FxoptError):
    """``fxopt tune`` found no candidate within the accuracy budget. ``best`` names the
    closest candidate, ``misses`` says by how much it missed per measure, ``values`` what
    it reached."""

    def __init__(self, message: str, *, best: str | None = None,
                 misses: dict | None = None, values: dict | None = None):
        super().__init__(message)
        self.best, self.misses, self.values = best, dict(misses or {}), dict(values or {})
