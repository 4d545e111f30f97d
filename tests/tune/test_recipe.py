"""The tuner's recipe: written in fxopt's recipe format, read back, and rebuilt into an
artifact with identical outputs (fxopt/tune/recipe.py); the Python API's result."""

from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt.errors import SpecError
from fxopt.pipeline import load_recipe
from fxopt.tune import Space
from fxopt.tune.recipe import read_recipe

ONNX_ONLY = dict(runtimes=("onnx",), precisions=(), prune=0.0, max_float_layers=0)


@pytest.mark.parametrize("space, winner", [
    (Space(**ONNX_ONLY, quant=("int8",), plain=False), "onnx-int8"),
    (Space(**ONNX_ONLY, quant=()), "onnx-plain"),
    (Space(runtimes=("eager",), quant=(), precisions=(), prune=0.0), "eager-fp32"),
], ids=["onnx-int8", "onnx-plain", "eager-fp32"])
def test_recipe_round_trip_gives_identical_outputs(mlp, space, winner, tmp_path, monkeypatch):
    model, inputs = mlp
    if winner != "eager-fp32":  # make the wanted candidate win: fake only the clock
        from fake_clock import fake_interleave  # tests/tune/fake_clock.py

        other = "onnx-fp32"
        fake_interleave(monkeypatch, {winner: 1.0, other: 2.0},
                        {winner: [1.0] * 5, other: [2.0] * 5})
    res = fxopt.tune(model, inputs, "cosine>=0.99", space=space, rounds=1, warmup=1)
    assert res.winner == winner
    assert callable(res.best) and res.best.kind in ("onnx", "eager")
    saved = res.save(tmp_path / "tuned")
    recipe = saved / "recipe.toml"
    assert recipe.read_text() == res.recipe
    assert (saved / "report.txt").read_text().startswith("candidate")
    if winner == "onnx-plain":
        assert 'baseline = "plain-export"' in res.recipe and "pipeline" not in res.recipe
    else:  # fxopt optimize --pipeline recipe.toml replays the same passes
        assert [p.spec for p in load_recipe(recipe)] == [
            p.spec for p in fxopt.parse_pipeline(res.table.row(res.winner)["pipeline"])]
    for source in (recipe, res.recipe):  # a path or the text itself
        rebuilt = fxopt.tune.rebuild(source, model, inputs, path=tmp_path / "rebuilt")
        x = torch.randn_like(inputs[0])  # the plain export has a static batch
        with torch.no_grad():
            assert torch.equal(rebuilt(x), res.best(x))
            assert torch.equal(rebuilt(*inputs), fxopt.load(saved / (
                "model.onnx" if res.best.kind == "onnx" else "model"))(*inputs))


def test_recipe_records_the_calibration(mlp):
    model, inputs = mlp
    space = Space(runtimes=("onnx",), quant=(), precisions=(), prune=0.0, plain=False)
    res = fxopt.tune(model, inputs, "cosine>=0.99", space=space, rounds=1, warmup=1)
    spec = read_recipe(res.recipe)
    assert spec["calibration"] == {"source": "random", "count": 8, "seed": 4242}
    assert spec["candidate"].pipeline == res.table.row(res.winner)["pipeline"]
    assert spec["tune"]["budget"] == "cosine>=0.99"


def test_given_calibration_must_be_passed_again(mlp, tmp_path):
    model, inputs = mlp
    calib = [(torch.randn(4, 64),) for _ in range(3)]
    space = Space(runtimes=("onnx",), quant=("int8",), precisions=(), prune=0.0,
                  max_float_layers=0, plain=False)
    res = fxopt.tune(model, inputs, "cosine>=0.99", space=space, rounds=1, warmup=1,
                     calibration=calib)
    assert read_recipe(res.recipe)["calibration"] == {"source": "given", "count": 3}
    with pytest.raises(SpecError, match="pass the same batches"):
        fxopt.tune.rebuild(res.recipe, model, inputs, path=tmp_path / "r")
    art = fxopt.tune.rebuild(res.recipe, model, inputs, path=tmp_path / "r",
                             calibration=calib)
    assert torch.equal(art(*inputs), res.best(*inputs))


@pytest.mark.parametrize("text, match", [
    ('pipeline = "default"\n', r"\[lower\]"),
    ('pipeline = "default"\n[lower]\nruntime = "tpu"\n', "'eager' or 'onnx'"),
    ('pipeline = "nosuchpass"\n[lower]\nruntime = "onnx"\n', "unknown pass"),
    ('pipeline = "default"\n[lower]\nruntime = "onnx"\n[calibration]\nsource = "x"\n',
     "source must be"),
    ('pipeline = [\n', "not valid TOML"),
])
def test_bad_recipes_raise_spec_error(text, match):
    with pytest.raises(SpecError, match=match):
        read_recipe(text)
