"""fxopt.bench.compare: one interleaved run gives one row per candidate (failures
included), a JSON file of a fixed schema, a valid PNG with the Pareto front, and a table.
Timings are never asserted, only that they exist and are consistent."""

from __future__ import annotations

import json
import math

import pytest
import torch
from png_check import assert_png  # tests/png_check.py
from torch import nn

import fxopt.bench
from fxopt.bench import BenchResult, Candidate, Row, build, measure
from fxopt.bench.report import SCHEMA_VERSION
from fxopt.errors import SpecError

FOUR = ["torch", "fxopt-eager", "ort-plain", "ort-fxopt-fp32"]
ROW_KEYS = {"name", "runtime", "pipeline", "baseline", "status", "build_s", "size_bytes",
            "peak_mem_bytes", "error", "key", "median_ms", "p10_ms", "p90_ms", "n", "speedup",
            "speedup_min", "speedup_max", "cosine", "max_rel", "metric", "metric_drop"}


def _mlp() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    return model, (torch.randn(2, 16),)


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> tuple[BenchResult, object]:
    model, inputs = _mlp()
    out = tmp_path_factory.mktemp("bench")
    cands = [*FOUR, Candidate("broken", "onnx", "no_such_pass")]
    return fxopt.bench.compare(model, inputs, cands, rounds=2, warmup=1, threads=1,
                               batch=3, out_dir=out, name="tiny-mlp"), out


def test_rows_one_per_candidate_with_figures(result):
    res, _ = result
    assert [r.name for r in res.rows] == [*FOUR, "broken"]
    for r in res.rows[:4]:
        assert r.status == "ok" and r.timed, r.error
        assert 0 < r.p10_ms <= r.median_ms <= r.p90_ms and r.n >= 2 * 5
        assert r.speedup_min <= r.speedup_max and r.speedup > 0
        assert r.cosine > 0.99999 and r.max_rel < 1e-4
        assert r.size_bytes > 0 and r.build_s >= 0 and r.key
    torch_row = res.row("torch")
    assert torch_row.speedup == 1.0
    # the speed-up is the ratio of medians over all samples, not typed in
    plain = res.row("ort-plain")
    assert plain.speedup == pytest.approx(torch_row.median_ms / plain.median_ms)
    assert res.settings["batch"] == 3 and res.settings["threads"] == 1
    assert res.settings["inputs"] == ["(3, 16) float32"]


def test_a_failed_candidate_is_a_row_with_its_error(result):
    res, _ = result
    broken = res.row("broken")
    assert broken.status == "failed" and not broken.timed and broken.median_ms is None
    assert "no_such_pass" in broken.error
    assert "broken" in res.table() and "no_such_pass" in res.table()
    assert "broken" not in res.pareto()


def test_json_file_follows_the_schema(result):
    res, out = result
    data = json.loads((out / "bench.json").read_text())
    assert data["schema"] == SCHEMA_VERSION
    assert {"model", "inputs", "batch", "threads", "build_threads", "rounds", "warmup",
            "machine", "torch"} <= set(data["settings"])
    assert set(data["pareto"]) <= set(FOUR) and data["pareto"]
    assert {"worst_round_spread", "per_candidate", "load_before"} <= set(data["noise"])
    assert set(data["noise"]["per_candidate"]) == set(FOUR)
    assert [r["name"] for r in data["rows"]] == [*FOUR, "broken"]
    for r in data["rows"]:
        assert set(r) == ROW_KEYS
    assert data["rows"][-1]["median_ms"] is None and data["rows"][-1]["error"]
    assert data == json.loads(json.dumps(res.to_dict(), default=str))
    assert (out / "table.txt").read_text().strip() == res.table()
    assert list((out / "artifacts").iterdir())  # the artifacts are kept beside the figures


def test_plot_is_a_png_and_refuses_other_suffixes(result, tmp_path):
    res, out = result
    assert_png(out / "bench.png")
    assert_png(res.plot(tmp_path / "again.png"))
    with pytest.raises(SpecError, match=".png"):
        res.plot(tmp_path / "plot.svg")
    assert not (tmp_path / "plot.svg").exists()


def test_pareto_front_from_figures():
    def row(name, ms, cos):
        return Row(name, "onnx", None, None, "ok", median_ms=ms, cosine=cos)

    res = BenchResult([row("slow-exact", 10.0, 1.0), row("fast-lossy", 2.0, 0.98),
                       row("dominated", 12.0, 0.97), row("mid", 5.0, 0.999),
                       row("tie-with-slow", 10.5, 0.9999999),
                       Row("failed", "onnx", None, None, "failed", error="x")])
    assert res.pareto() == ["fast-lossy", "mid", "slow-exact"]
    res.rows.append(Row("nan", "onnx", None, None, "ok", median_ms=1.0, cosine=math.nan))
    assert res.pareto() == ["fast-lossy", "mid", "slow-exact"]


def test_user_metric_on_validation_data(tmp_path):
    model, inputs = _mlp()
    x = torch.randn(8, 16)
    val = [(x, model(x).argmax(-1))]

    def top1(out, target):
        return (out.argmax(-1) == target).float().mean().item()

    res = fxopt.bench.compare(model, inputs, ["torch", "ort-quantize_dynamic"], rounds=1,
                              warmup=0, threads=1, val_data=val, metric=top1)
    assert res.settings["reference_metric"] == 1.0
    assert res.row("torch").metric == 1.0 and res.row("torch").metric_drop == 0.0
    q = res.row("ort-quantize_dynamic")
    assert q.metric_drop == pytest.approx(1.0 - q.metric)
    assert res.accuracy_key() == "metric" and "drop" in res.table()
    assert_png(res.plot(tmp_path / "metric.png"))


@pytest.mark.parametrize("kwargs, words", [
    ({"candidates": ["torch", "nope"]}, "unknown candidate 'nope'"),
    ({"candidates": ["torch", "torch"]}, "listed twice"),
    ({"candidates": []}, "no candidates"),
    ({"rounds": 0}, "rounds"),
    ({"threads": 0}, "threads"),
    ({"build_threads": 0}, "build_threads"),
    ({"metric": lambda o, t: 1.0}, "go together"),
])
def test_bad_arguments_are_spec_errors(kwargs, words, tmp_path):
    model, inputs = _mlp()
    with pytest.raises(SpecError, match=words):
        fxopt.bench.compare(model, inputs, **{"candidates": ["torch"], **kwargs},
                            out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_measure_times_only_what_built(tmp_path):
    model, inputs = _mlp()
    builts = [build(Candidate("torch", "torch"), model, inputs, workdir=tmp_path),
              build(Candidate("bad", "onnx", "no_such_pass"), model, inputs, workdir=tmp_path)]
    stats = measure(builts, inputs, rounds=2, warmup=0, threads=1)
    assert list(stats) == ["torch"] and stats["torch"].n >= 10
    assert measure(builts[1:], inputs, rounds=1) == {}
