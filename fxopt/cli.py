"""The ``fxopt`` command: inspect, optimize, fine-tune, check TensorRT readiness, list passes
and zoo models, run the demo.

    fxopt inspect resnet
    fxopt inspect my_models.py:build --input-shape 1,3,224,224
    fxopt optimize resnet --pipeline default --target eager -o out/resnet
    fxopt optimize resnet --target onnx -o out/resnet-onnx
    fxopt finetune resnet --pipeline "default,prune(macs=0.5)" --epochs 2 -o out/pruned
    torchrun --nproc-per-node 2 -m fxopt finetune ...   (see fxopt/cli_train.py)
    fxopt check-trt out/resnet-onnx/model.onnx
    fxopt demo
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxopt.cli_bench import add_parser as add_bench_parser
from fxopt.cli_tune import add_parser as add_tune_parser
from fxopt.errors import FxoptError, SpecError
from fxopt.passes.prune.report import plot_kept, prune_table
from fxopt.passes.sparsify import sparsity_table

# fxopt.lowering.onnx.DEFAULT_OPSET, restated so --help does not import ONNX Runtime
# (tests/test_cli.py checks that the two agree)
DEFAULT_OPSET = 20

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "float16": torch.float16,
    "half": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "bool": torch.bool,
}


def parse_input_shape(text: str) -> torch.Tensor:
    """``"1,3,224,224"`` or ``"2,16:int64"`` -> a seeded random tensor of that shape."""
    shape_text, _, dtype_text = text.partition(":")
    try:
        shape = tuple(int(s) for s in shape_text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise SpecError(
            f"--input-shape {text!r}: expected comma-separated integers like 1,3,224,224 "
            "(optionally :int64)"
        ) from None
    if not shape or any(s <= 0 for s in shape):
        raise SpecError(f"--input-shape {text!r}: every dimension must be a positive integer")
    dtype = _DTYPES.get(dtype_text or "float32")
    if dtype is None:
        raise SpecError(f"--input-shape {text!r}: unknown dtype; use one of {', '.join(_DTYPES)}")
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    return torch.randint(0, 100, shape, generator=gen, dtype=dtype)


def load_spec(spec: str, input_shapes: list[str] | None = None) -> tuple[nn.Module, tuple, str]:
    """Resolve ``SPEC`` (zoo name, ``file.py:factory`` or ``pkg.module:factory``).

    Returns ``(model, example_inputs, name)``. The factory may return a module, a
    ``(module, example_inputs)`` pair, or a zoo entry; ``--input-shape`` overrides inputs.
    """
    from fxopt import zoo

    inputs = tuple(parse_input_shape(s) for s in input_shapes or [])
    if ":" not in spec:
        if spec in zoo.names(include_heavy=True):
            entry = zoo.get(spec)
            return entry.build(), inputs or entry.example_inputs(), spec
        raise SpecError(
            f"{spec!r} is not a zoo model and not file.py:factory or package.module:factory; "
            f"zoo models: {', '.join(zoo.names(include_heavy=True))}"
        )
    where, _, attr = spec.rpartition(":")
    factory = getattr(_import_where(where, spec), attr, None)
    if factory is None:
        raise SpecError(f"{where!r} has no attribute {attr!r} (from SPEC {spec!r})")
    try:
        made = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    except Exception as e:  # noqa: BLE001 - the user's factory failed: say so in one line
        raise SpecError(f"{spec}() raised {type(e).__name__}: {e}") from e
    if hasattr(made, "build") and hasattr(made, "example_inputs"):
        return made.build(), inputs or made.example_inputs(), attr
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module):
        model, example = made
        example = (example,) if isinstance(example, torch.Tensor) else tuple(example)
        return model, inputs or example, attr
    if isinstance(made, nn.Module):
        if not inputs:
            raise SpecError(
                f"{spec} returns a model without example inputs; pass --input-shape "
                "(repeatable), e.g. --input-shape 1,3,224,224"
            )
        return made, inputs, attr
    raise SpecError(
        f"{spec} returned {type(made).__name__}; a factory must return an nn.Module or "
        "(module, example_inputs)"
    )


def load_calibration(spec: str, example_inputs: tuple, limit: int | None = None) -> list[tuple]:
    """Calibration batches from ``--calibration-data SPEC`` (``file.py:factory`` or
    ``pkg.module:factory``): the factory returns an iterable of batches, each a tensor or a
    tuple of tensors, one per model input, shaped like ``example_inputs`` but for the batch
    size. At most ``limit`` batches are taken. Raises ``SpecError`` naming what was expected.

    Example::

        batches = load_calibration("mydata.py:calibration_batches", (torch.randn(1, 64),))
    """
    flag = f"--calibration-data {spec}"
    factory = import_attr("--calibration-data", spec)
    try:
        made = factory() if callable(factory) else factory
        batches = []
        for batch in made:
            batches.append(_check_batch(batch, len(batches), example_inputs, flag))
            if limit is not None and len(batches) >= limit:
                break
    except SpecError:
        raise
    except TypeError as e:
        if "not iterable" not in str(e):
            raise SpecError(f"{flag}: the factory raised TypeError: {e}") from e
        raise SpecError(
            f"{flag}: the factory returned {type(made).__name__}, not an iterable of batches "
            "(a list, generator or DataLoader of tensors or tuples of tensors)"
        ) from e
    except Exception as e:  # noqa: BLE001 - the user's factory failed: say so in one line
        raise SpecError(f"{flag}: the factory raised {type(e).__name__}: {e}") from e
    if not batches:
        raise SpecError(f"{flag}: the factory yielded no batches")
    return batches


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def _check_batch(batch: Any, index: int, example: tuple, flag: str) -> tuple:
    """``batch`` as a tuple of tensors matching ``example`` in count, dtype and non-batch
    dims, else a ``SpecError`` that names the expected inputs."""
    expected = ", ".join(
        f"(N, {', '.join(map(str, t.shape[1:]))}) {str(t.dtype).removeprefix('torch.')}"
        if t.dim() else _describe(t) for t in example
    )
    hint = f"the model takes {len(example)} input(s): {expected}"
    items = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    if len(items) != len(example) or not all(isinstance(t, torch.Tensor) for t in items):
        got = ", ".join(_describe(t) if isinstance(t, torch.Tensor) else type(t).__name__
                        for t in items)
        raise SpecError(f"{flag}: batch {index} is ({got}); {hint}")
    for i, (t, ref) in enumerate(zip(items, example, strict=True)):
        if t.dtype != ref.dtype or t.dim() != ref.dim() or t.shape[1:] != ref.shape[1:]:
            raise SpecError(f"{flag}: batch {index}, input {i} is {_describe(t)}; {hint}")
    return items


def import_attr(flag: str, spec: str) -> Any:
    """The object ``file.py:name`` / ``pkg.module:name`` names, for the option ``flag``
    (``SpecError`` naming the flag if the spec is malformed, the file or module is missing
    or has no such attribute).

    Example::

        factory = import_attr("--train-data", "tests/digits_data.py:train_set")
    """
    if ":" not in spec:
        raise SpecError(f"{flag} {spec}: expected file.py:factory or package.module:factory")
    where, _, attr = spec.rpartition(":")
    try:
        module = _import_where(where, spec)
    except SpecError as e:
        raise SpecError(f"{flag} {spec}: {e}") from e
    obj = getattr(module, attr, None)
    if obj is None:
        raise SpecError(f"{flag} {spec}: {where!r} has no attribute {attr!r}")
    return obj


def _import_where(where: str, spec: str) -> Any:
    if where.endswith(".py") or os.sep in where:
        path = Path(where)
        if not path.is_file():
            raise SpecError(f"file {where!r} does not exist (from SPEC {spec!r})")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001
            raise SpecError(f"importing {where} failed: {type(e).__name__}: {e}") from e
        finally:
            sys.path.pop(0)
        return module
    try:
        return importlib.import_module(where)
    except ImportError as e:
        raise SpecError(f"cannot import {where!r} (from SPEC {spec!r}): {e}") from e


def _progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


def cmd_inspect(args: argparse.Namespace) -> int:
    import fxopt

    model, inputs, name = load_spec(args.spec, args.input_shape)
    _progress(f"capturing {name} ({args.mode})")
    gm = fxopt.capture(model, inputs, mode=args.mode)
    summary = fxopt.inspect(gm)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2, default=str))
    else:
        info = gm.meta["fxopt"]["capture"]
        print(f"{name}: captured with {info['frontend']} ({info['reason']})")
        print(summary)
    if args.dot:
        result = fxopt.inspect.render(gm, args.dot)
        print(result.message, file=sys.stderr)
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    import fxopt
    from fxopt.pipeline import parse_pipeline

    passes = parse_pipeline(args.pipeline)  # a bad spec fails before any capture work
    if args.prune_plot:
        if not any(p.name == "prune" for p in passes):
            raise SpecError(f"--prune-plot needs a prune pass in --pipeline (got "
                            f"{args.pipeline!r}), e.g. --pipeline 'default,prune(macs=0.5)'")
        plot = Path(args.prune_plot)
        if plot.suffix.lower() != ".png" or not plot.parent.is_dir():
            raise SpecError(f"--prune-plot {args.prune_plot!r}: give a .png path in an "
                            "existing folder")
    model, inputs, name = load_spec(args.spec, args.input_shape)
    _progress(f"capturing {name} ({args.mode})")
    if args.calibration_data:
        calibration = load_calibration(args.calibration_data, inputs, args.calibration_batches)
        _progress(f"calibration: {len(calibration)} batches from {args.calibration_data}")
    else:
        from fxopt.verify import random_like_inputs

        # no dataset named: random inputs shaped like the example are a smoke test, not a
        # calibration (--calibration-data pkg.module:factory gives real batches)
        calibration = [inputs] + [random_like_inputs(inputs, seed=i + 1)
                                  for i in range(max((args.calibration_batches or 8) - 1, 0))]
    from fxopt.cli_train import training_data

    training = training_data(args, passes, inputs)
    res = fxopt.optimize(model, inputs, args.pipeline, mode=args.mode, dump_dir=args.dump_dir,
                         progress=_progress, calibration=calibration, **training)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun (a finetune stage trained with DDP): rank 0 writes
    print(res.report)
    for record in res.report:
        if record.name == "sparsify" and record.modified:
            print(sparsity_table(record.stats))
        if record.name == "prune" and record.modified:
            print(prune_table(record.stats))
            if args.prune_plot:
                print(f"wrote kept-channels chart to {plot_kept(record.stats, args.prune_plot)}")
    _progress(f"lowering to {args.target}")
    options = {k: v for k, v in (("opset", args.opset), ("exporter", args.exporter))
               if v is not None}
    if options and args.target not in ("onnx", "tensorrt"):
        raise SpecError(f"--{'/--'.join(options)} only apply to --target onnx or tensorrt")
    trt_options = {k: v for k, v in (("workspace", args.workspace), ("precision", args.precision),
                                     ("timing_cache", args.timing_cache)) if v is not None}
    if trt_options and args.target != "tensorrt":
        raise SpecError(f"--{'/--'.join(trt_options).replace('_', '-')} only apply to "
                        "--target tensorrt")
    if args.bound:
        options["dim_bounds"] = dict(_parse_bound(b) for b in args.bound)
    options.update(trt_options)
    artifact = fxopt.lower(res.module, args.target, inputs, path=args.output, **options)
    print(f"wrote {args.target} artifact to {artifact.path} (verified against the graph)")
    if args.report_json:
        Path(args.report_json).write_text(json.dumps(res.report.to_dict(), indent=2, default=str))
    return 0


def _parse_bound(text: str) -> tuple[str, tuple[int, ...]]:
    name, _, values = text.partition("=")
    try:
        bounds = tuple(int(v) for v in values.split(","))
    except ValueError:
        bounds = ()
    if not name or len(bounds) != 3:
        raise SpecError(f"--bound {text!r}: expected NAME=MIN,OPT,MAX, e.g. batch=1,8,32")
    return name, bounds


def cmd_check_trt(args: argparse.Namespace) -> int:
    import fxopt

    bounds = dict(_parse_bound(b) for b in args.bound or [])
    report = fxopt.check_trt(args.model, trt_version=args.trt_version, dim_bounds=bounds or None)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if report.ok else 1


def cmd_passes(args: argparse.Namespace) -> int:
    from fxopt.passes.base import REGISTRY, known_passes
    from fxopt.pipeline import PIPELINES

    for name in known_passes():
        info = REGISTRY[name]
        params = ", ".join(f"{k}={p.default!r}" for k, p in info.parameters.items())
        extra = f"  [{params}]" if params else ""
        print(f"{name:<18} {info.semantics.value:<16} {info.doc}{extra}")
    for name, stages in PIPELINES.items():
        print(f"pipeline {name}: {','.join(stages)}")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from fxopt import zoo

    for name in zoo.names(include_heavy=True):
        entry = zoo.get(name)
        print(f"{name:<12} {entry.family:<16} {entry.description}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default: capture -> default pipeline -> eager -> reload."""
    import fxopt
    from fxopt import zoo
    from fxopt.verify import compare_outputs

    entry = zoo.get(args.model)
    model, inputs = entry.build(), entry.example_inputs()
    print(f"fxopt demo: {entry.name} ({entry.description})")
    start = time.perf_counter()
    res = fxopt.optimize(model, inputs, "default", progress=_progress)
    info = res.capture
    print(f"captured with {info['frontend']} ({info['reason']}); "
          f"dynamic batch: {info['dynamic_batch']}")
    print(res.report)
    out = Path(args.output) / entry.name
    _progress(f"writing eager artifact to {out}")
    fxopt.lower(res.module, "eager", inputs, path=out)
    loaded = fxopt.load(out)
    with torch.no_grad():
        reference = model(*inputs)
        cmp = compare_outputs(reference, loaded(*inputs))
    print(f"reloaded {out}: max abs error vs the original model {cmp.max_abs:.2e} "
          f"({'ok' if cmp.ok() else 'MISMATCH'})")
    onnx_path = Path(args.output) / f"{entry.name}.onnx"
    _progress(f"exporting to ONNX and verifying it in ONNX Runtime: {onnx_path}")
    threads = torch.get_num_threads()
    onnx_art = fxopt.lower(res.module, "onnx", inputs, path=onnx_path, threads=threads,
                           providers=["CPUExecutionProvider"])
    onnx_cmp = compare_outputs(reference, onnx_art(*inputs))
    checked = "; ".join(f"{what}: max rel {v['max_rel']:.1e}"
                        for what, v in onnx_art.manifest["verified"].items())
    print(f"wrote {onnx_path} ({onnx_art.manifest['exporter']} exporter, opset "
          f"{onnx_art.manifest['opset']}), verified in ONNX Runtime ({checked}); max abs error "
          f"vs the original model {onnx_cmp.max_abs:.2e} ({'ok' if onnx_cmp.ok() else 'MISMATCH'})")
    from fxopt.bench import compare_latency

    _progress("timing eager vs the fxopt artifacts (interleaved rounds)")
    timing = compare_latency(
        {"eager": model, "fxopt": loaded.module, "onnxruntime": onnx_art}, inputs, rounds=3)
    ms = {k: v.median_ms for k, v in timing.stats.items()}
    print(f"latency: eager {ms['eager']:.3f} ms, fxopt eager {ms['fxopt']:.3f} ms "
          f"({timing.speedups['fxopt']:.2f}x), ONNX Runtime {ms['onnxruntime']:.3f} ms "
          f"({timing.speedups['onnxruntime']:.2f}x); batch {entry.batch}, {threads} threads, "
          "noisy on shared machines")
    print(f"total {time.perf_counter() - start:.2f}s")
    return 0 if cmp.ok() and onnx_cmp.ok() else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxopt", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("spec", help="zoo name, file.py:factory or package.module:factory")
        p.add_argument("--input-shape", action="append", metavar="SHAPE[:DTYPE]",
                       help="example input shape, e.g. 1,3,224,224 (repeat per input)")
        p.add_argument("--mode", default="auto", choices=("auto", "symbolic", "export"),
                       help="capture front end (default auto: symbolic, else torch.export)")

    p = sub.add_parser("inspect", help="print the node table and totals of a model")
    model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--dot", metavar="FILE", help="also write a DOT picture (SVG if dot exists)")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("optimize", help="run a pipeline and write an artifact")
    model_args(p)
    p.add_argument("--pipeline", default="default",
                   help="spec string or recipe.toml (default: the default pipeline)")
    p.add_argument("--target", default="eager",
                   help="artifact kind: eager, onnx or tensorrt (default eager)")
    p.add_argument("-o", "--output", required=True,
                   help="artifact path (for onnx: a .onnx file, or a folder to hold model.onnx)")
    p.add_argument("--opset", type=int, help=f"ONNX opset (onnx target; default {DEFAULT_OPSET})")
    p.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"),
                   help="ONNX exporter (onnx target; default auto)")
    p.add_argument("--bound", action="append", metavar="NAME=MIN,OPT,MAX",
                   help="onnx/tensorrt: bounds (TensorRT's optimization profile) of a dynamic "
                        "dimension, e.g. batch=1,8,32 (repeatable; makes dim 0 'batch' dynamic "
                        "for tensorrt)")
    p.add_argument("--workspace", help="tensorrt: workspace memory limit, e.g. 4GiB")
    p.add_argument("--precision", choices=("fp32", "tf32", "fp16", "bf16", "int8"),
                   help="tensorrt: engine precision (default: what the graph's types carry)")
    p.add_argument("--timing-cache", help="tensorrt: timing cache file, reused and updated")
    p.add_argument("--dump-dir", help="write each pass's before/after code here")
    p.add_argument("--calibration-data", metavar="SPEC",
                   help="file.py:factory or package.module:factory returning an iterable of "
                        "calibration batches (tensors or tuples of tensors)")
    p.add_argument("--calibration-batches", type=int, default=None, metavar="N",
                   help="static int8: use at most N batches of --calibration-data (default "
                        "all); without it, the example and N-1 random batches like it "
                        "(default 8)")
    p.add_argument("--train-data", metavar="SPEC",
                   help="data for finetune(...) stages in --pipeline: file.py:fn or "
                        "pkg.module:fn returning a Dataset of (inputs..., [label]) items")
    p.add_argument("--val-data", metavar="SPEC", help="validation data for finetune stages")
    p.add_argument("--report-json", help="write the per-pass report as JSON")
    p.add_argument("--prune-plot", metavar="FILE.png",
                   help="write a bar chart of the channels each pruned layer keeps (needs a "
                        "prune pass in --pipeline and matplotlib)")
    p.set_defaults(fn=cmd_optimize)

    from fxopt.cli_train import add_parser as add_finetune

    add_finetune(sub, model_args)

    p = sub.add_parser("check-trt", help="report what TensorRT's ONNX parser will reject "
                       "(exit 1 on a blocker)")
    p.add_argument("model", help="an .onnx file")
    p.add_argument("--trt-version", type=int, default=10, choices=(10, 11),
                   help="TensorRT major version to check against (default 10)")
    p.add_argument("--bound", action="append", metavar="NAME=MIN,OPT,MAX",
                   help="bounds of a dynamic dimension, e.g. batch=1,8,32 (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(fn=cmd_check_trt)

    add_bench_parser(sub)
    sub.add_parser("passes", help="list registered passes and named pipelines").set_defaults(
        fn=cmd_passes)
    sub.add_parser("zoo", help="list built-in models").set_defaults(fn=cmd_zoo)
    p = sub.add_parser("demo", help="optimize a zoo model end to end")
    p.add_argument("--model", default="resnet", help="zoo model (default resnet)")
    p.add_argument("-o", "--output", default="demo-out",
                   help="folder for the artifacts (default demo-out)")
    p.set_defaults(fn=cmd_demo)
    add_tune_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fxopt`` console script."""
    args = build_parser().parse_args(argv)
    from fxopt.progress import show_progress

    previous = show_progress(True)  # bars on a terminal, quiet in logs and pipes
    try:
        return args.fn(args)
    except FxoptError as e:
        if args.debug:
            traceback.print_exc()
        lines = str(e).splitlines() or [type(e).__name__]
        print(f"fxopt: error: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:
            print(f"  {line}", file=sys.stderr)
        if not args.debug:
            print("  (run with --debug for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fxopt: interrupted", file=sys.stderr)
        return 130
    finally:
        show_progress(previous)


if __name__ == "__main__":
    sys.exit(main())
