"""fxopt: capture a PyTorch model as a torch.fx graph, optimize it with verified passes,
and lower it to a deployable artifact.

Example::

    import fxopt
    res = fxopt.optimize(model, (x,), pipeline="default")
    print(res.report)
    art = fxopt.lower(res.module, "eager", (x,), path="out/model")
    fxopt.load("out/model")(x)
"""

from fxopt import ops, prune, quant, visualize
from fxopt.capture import capture
from fxopt.errors import (
    ArtifactVersionError,
    BudgetError,
    CaptureError,
    CheckpointError,
    DistributedError,
    FxoptError,
    InputSpecError,
    LoweringError,
    PassError,
    QuantizationError,
    SpecError,
    TrainingError,
)
from fxopt.inspect import ModelSummary
from fxopt.inspect import inspect as _summarize
from fxopt.lowering import load, lower
from fxopt.manager import OptimizeResult, PassManager, Report, optimize
from fxopt.passes.base import Pass, PassContext, PassResult, Semantics, register_pass
from fxopt.pipeline import PIPELINES, parse_pipeline
from fxopt.tune import TuneResult, tune  # fxopt.tune(...) is the function (module: fxopt/tune/)
from fxopt.verify import Tolerance


def inspect(gm, example_inputs=None) -> ModelSummary:
    """Summarize a graph (or capture a module first): one row per node, params, MACs.

    The picture helpers of fxopt/visualize.py hang off this function, so
    ``fxopt.inspect.render(gm, "model.svg")``, ``fxopt.inspect.to_dot(gm)``,
    ``fxopt.inspect.to_networkx(gm)`` and ``fxopt.inspect.diff(before, after)`` work.

    Example::

        print(fxopt.inspect(gm))
        fxopt.inspect(model, (x,)).macs
    """
    return _summarize(gm, example_inputs)


inspect.render = visualize.render
inspect.to_dot = visualize.to_dot
inspect.to_networkx = visualize.to_networkx
inspect.diff = visualize.diff


def calibrate(gm, batches, *, progress=None, max_batches=None) -> int:
    """Feed calibration ``batches`` (any iterable of input batches; a DataLoader works)
    through a graph with observing fake-quant nodes; returns how many batches it used.
    It only observes: ``freeze_calibration(gm)`` then fixes the scales, and lowering
    refuses a graph that is still observing. ``progress``: see ``fxopt.progress``.

    Example::

        fxopt.quant.static.prepare(gm, "ort")
        fxopt.calibrate(gm, loader, max_batches=32)
        fxopt.freeze_calibration(gm)
    """
    from fxopt.quant import static

    return static.calibrate(gm, batches, progress=progress, max_batches=max_batches)


def freeze_calibration(gm) -> int:
    """Fix the scales of every observing fake-quant node from what calibration showed it
    (``fxopt.quant.static.freeze``); returns how many were frozen.

    Example::

        fxopt.calibrate(gm, loader)
        fxopt.freeze_calibration(gm)
        fxopt.lower(gm, "onnx", (x,), path="out/model.onnx")
    """
    from fxopt.quant import static

    return static.freeze(gm)


def check_trt(model, trt_version: int = 10, dim_bounds=None):
    """Report what TensorRT's ONNX parser will reject or handle badly in an ONNX model.

    Example::

        report = fxopt.check_trt("out/model.onnx", trt_version=10)
        print(report.format()); report.ok
    """
    from fxopt.trt_check import check_trt as _check_trt  # imports onnx lazily

    return _check_trt(model, trt_version=trt_version, dim_bounds=dim_bounds)


def __getattr__(name: str):
    # fxopt.finetune / fxopt.FinetuneResult load the training stack (DDP, fake-quant,
    # TensorBoard on use) only when asked for
    if name in ("finetune", "FinetuneResult"):
        from fxopt.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'fxopt' has no attribute {name!r}")


__all__ = [
    "PIPELINES",
    "ArtifactVersionError",
    "BudgetError",
    "CaptureError",
    "CheckpointError",
    "DistributedError",
    "FinetuneResult",
    "FxoptError",
    "InputSpecError",
    "LoweringError",
    "OptimizeResult",
    "Pass",
    "PassContext",
    "PassError",
    "PassManager",
    "PassResult",
    "QuantizationError",
    "Report",
    "Semantics",
    "SpecError",
    "TrainingError",
    "Tolerance",
    "TuneResult",
    "calibrate",
    "capture",
    "check_trt",
    "finetune",
    "freeze_calibration",
    "inspect",
    "prune",
    "load",
    "lower",
    "ops",
    "quant",
    "optimize",
    "parse_pipeline",
    "register_pass",
    "tune",
]
