"""The tuner's answer as a TOML recipe that rebuilds the artifact from the original model.

The format is fxopt's recipe format (``fxopt.pipeline.load_recipe``): ``pipeline`` holds
the pass spec, and three tables say the rest:

.. code-block:: toml

    pipeline = "default,quantize(scheme=int8,target=ort,per_channel=true,skip=['fc'])"

    [lower]
    runtime = "onnx"       # eager | onnx
    threads = 2            # ONNX Runtime intra-op threads (optional)

    [calibration]          # the batches static int8 calibrated on
    source = "random"      # fxopt.bench.candidates.calibration_batches(inputs, count, seed)
    count = 8
    seed = 4242            # or source = "given": pass the same batches to rebuild()

    [tune]                 # what the tuner measured (information only)
    budget = "cosine>=0.99"

``fxopt optimize SPEC --pipeline recipe.toml`` replays the passes; ``rebuild`` replays the
whole artifact, calibration included.

Example::

    text = recipe_text(candidate, calibration={"source": "random", "count": 8, "seed": 4242})
    art = rebuild(text, model, (x,), path="out/rebuilt")
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from fxopt.errors import LoweringError, SpecError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()
                                if x is not None) + " }"
    return json.dumps(str(v))  # JSON string escapes are valid TOML basic strings


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def recipe_text(candidate: Any, *, calibration: dict[str, Any],
                tune: dict[str, Any] | None = None) -> str:
    """The TOML recipe for a ``fxopt.bench.candidates.Candidate`` (see the module
    docstring); ``calibration``: ``{"source": "random", "count": n, "seed": s}`` or
    ``{"source": "given", "count": n}``; ``tune``: measured figures to keep beside it."""
    if candidate.runtime not in ("eager", "onnx") or candidate.baseline not in (
            None, "plain-export"):
        raise SpecError(f"candidate {candidate.name!r}: a recipe rebuilds eager or onnx "
                        "artifacts from an fxopt pipeline (or the plain ONNX export)")
    lines = ["# fxopt tune recipe: rebuild with fxopt.tune.rebuild(recipe, model, inputs)",
             f"# candidate {candidate.name}"]
    if candidate.pipeline is not None:
        lines.append(f"pipeline = {_value(candidate.pipeline)}")
    lines += ["", "[lower]", f"runtime = {_value(candidate.runtime)}"]
    if candidate.baseline is not None:
        lines += ["# no fxopt pass: torch.onnx.export of the model as given",
                  f"baseline = {_value(candidate.baseline)}"]
    lines += [f"{_key(k)} = {_value(v)}" for k, v in candidate.options if v is not None]
    lines += ["", "[calibration]"]
    lines += [f"{_key(k)} = {_value(v)}" for k, v in calibration.items() if v is not None]
    if tune:
        lines += ["", "[tune]"]
        lines += [f"{_key(k)} = {_value(v)}" for k, v in tune.items() if v is not None]
    return "\n".join(lines) + "\n"


def read_recipe(recipe: str | os.PathLike) -> dict[str, Any]:
    """A recipe (path or TOML text) as ``{"candidate": Candidate, "calibration": {...},
    "tune": {...}}``; its passes are checked by parsing them (``SpecError`` if wrong)."""
    from fxopt.bench.candidates import Candidate
    from fxopt.pipeline import load_recipe, parse_pipeline

    path = None
    if isinstance(recipe, os.PathLike) or (isinstance(recipe, str) and "\n" not in recipe):
        path = Path(recipe)
        if not path.is_file():
            raise SpecError(f"recipe file {os.fspath(path)!r} does not exist")
        text = path.read_text()
    else:
        text = recipe
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"the recipe is not valid TOML: {e}") from e
    lower = dict(data.get("lower", {}))
    baseline = lower.pop("baseline", None)
    if "lower" not in data or ("pipeline" not in data) == (baseline is None):
        raise SpecError("a tune recipe needs a [lower] table (runtime = ...) and either "
                        "'pipeline' or [lower] baseline = 'plain-export'")
    if baseline not in (None, "plain-export"):
        raise SpecError(f"recipe [lower] baseline must be 'plain-export', not {baseline!r}")
    if "pipeline" in data:
        parse_pipeline(data["pipeline"])
        if path is not None:
            load_recipe(path)  # the same checks as fxopt optimize --pipeline recipe.toml
    runtime = lower.pop("runtime", None)
    if runtime not in ("eager", "onnx") or (baseline and runtime != "onnx"):
        raise SpecError(f"recipe [lower] runtime must be 'eager' or 'onnx' ('onnx' for a "
                        f"baseline), not {runtime!r}")
    name = data.get("tune", {}).get("candidate", f"recipe-{runtime}")
    cand = Candidate(name, runtime, data.get("pipeline"), baseline,
                     tuple(sorted(lower.items())))
    calibration = dict(data.get("calibration", {"source": "random"}))
    if calibration.get("source") not in ("random", "given"):
        raise SpecError("recipe [calibration] source must be 'random' or 'given', not "
                        f"{calibration.get('source')!r}")
    return {"candidate": cand, "calibration": calibration, "tune": data.get("tune", {})}


def rebuild(recipe: str | os.PathLike, model: Any, inputs: Any, *,
            path: str | os.PathLike, calibration: Any = None) -> Any:
    """Rebuild the artifact a recipe describes from the original ``model`` into ``path``
    (a folder) and load it (``fxopt.load``). A recipe calibrated on ``source = "given"``
    batches needs those batches again as ``calibration``.

    Example::

        art = rebuild("tuned/recipe.toml", model, (x,), path="rebuilt")
        art(x)
    """
    import fxopt
    from fxopt.bench.candidates import build, calibration_batches

    spec = read_recipe(recipe)
    cand, calib = spec["candidate"], spec["calibration"]
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if calib.get("source") == "given":
        if calibration is None:
            raise SpecError("this recipe was calibrated on batches the user gave: pass the "
                            "same batches as calibration= (--calibration-data)")
        batches = list(calibration)
    else:
        if calibration is not None:
            raise SpecError("this recipe calibrates on its own random batches "
                            "([calibration] source = 'random'); drop calibration=")
        batches = calibration_batches(inputs, int(calib.get("count", 8)),
                                      int(calib.get("seed", 4242)))
    built = build(cand, model, inputs, workdir=path, calibration=batches)
    if not built.ok:
        raise LoweringError(f"rebuilding {cand.name} from its recipe failed: {built.error}")
    threads = cand.option("threads")
    return fxopt.load(built.path, threads=threads) if cand.runtime == "onnx" \
        else fxopt.load(built.path)


__all__ = ["read_recipe", "rebuild", "recipe_text"]
