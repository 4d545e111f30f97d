"""``fxopt bench``: the command writes the table, bench.json and bench.png; user mistakes
are typed errors (exit 2) that leave no file behind."""

from __future__ import annotations

import json
import textwrap

import pytest
from png_check import assert_png  # tests/png_check.py

from fxopt.cli import main

FAST = ["--rounds", "1", "--warmup", "0", "--threads", "1"]


def test_bench_a_zoo_model_writes_table_json_and_png(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["bench", "mlp", "--candidates", "torch,ort-plain,ort-fxopt-fp32,tensorrt-fp16",
               "--batch", "2", "-o", str(out), *FAST])
    assert rc == 0
    text = capsys.readouterr().out
    for name in ("torch", "ort-plain", "ort-fxopt-fp32", "tensorrt-fp16", "median ms"):
        assert name in text
    data = json.loads((out / "bench.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["torch", "ort-plain", "ort-fxopt-fp32",
                                                 "tensorrt-fp16"]
    assert data["settings"]["model"] == "mlp" and data["settings"]["batch"] == 2
    assert data["settings"]["rounds"] == 1 and data["settings"]["threads"] == 1
    assert all(r["median_ms"] > 0 for r in data["rows"][:3])
    assert data["rows"][3]["status"] in ("skipped", "ok", "failed")
    assert_png(out / "bench.png")
    assert (out / "table.txt").is_file()


def test_bench_user_model_with_val_data_and_metric(tmp_path, capsys):
    src = tmp_path / "mine.py"
    src.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(8, 3)).eval(), (torch.randn(2, 8),)

        def val():
            torch.manual_seed(1)
            x = torch.randn(6, 8)
            return [(x, build()[0](x).argmax(-1))]

        def top1(out, target):
            return (out.argmax(-1) == target).float().mean().item()
    """))
    out = tmp_path / "out"
    rc = main(["bench", f"{src}:build", "--candidates", "torch,ort-plain", "--val-data",
               f"{src}:val", "--metric", f"{src}:top1", "-o", str(out), *FAST])
    assert rc == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [r["metric"] for r in rows] == [1.0, 1.0]
    assert "drop" in capsys.readouterr().out


def test_list_candidates(capsys):
    assert main(["bench", "resnet", "--list-candidates"]) == 0
    names = [ln.split()[0] for ln in capsys.readouterr().out.splitlines()]
    assert names[:2] == ["torch", "torch.compile"] and "ort-quantize_static" in names


@pytest.mark.parametrize("argv, words", [
    (["bench"], "give a model SPEC"),
    (["bench", "mlp", "--zoo"], "either SPEC or --zoo"),
    (["bench", "mlp", "--candidates", "torch,nope"], "unknown candidate 'nope'"),
    (["bench", "mlp", "--candidates", ","], "--candidates is empty"),
    (["bench", "mlp", "--rounds", "0"], "--rounds must be >= 1"),
    (["bench", "mlp", "--batch", "0"], "--batch must be >= 1"),
    (["bench", "mlp", "--build-threads", "0"], "--build-threads must be >= 1"),
    (["bench", "mlp", "--metric", "x.py:f"], "go together"),
    (["bench", "--zoo", "--input-shape", "1,3"], "zoo model's own inputs"),
    (["bench", "mlp", "--val-data", "nofile.py:v", "--metric", "nofile.py:m"],
     "does not exist"),
    (["bench", "no_such_model"], "not a zoo model"),
])
def test_mistakes_are_typed_errors_without_files(argv, words, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*argv, "-o", str(out)]) == 2
    assert words in capsys.readouterr().err
    assert not out.exists()


def test_bench_zoo_writes_one_folder_per_model_and_a_summary(tmp_path, monkeypatch, capsys):
    from fxopt import zoo

    monkeypatch.setattr(zoo, "names", lambda include_heavy=False: ["mlp", "gqa"])
    out = tmp_path / "zoo"
    assert main(["bench", "--zoo", "--candidates", "torch,ort-fxopt-fp32", "-o", str(out),
                 *FAST]) == 0
    summary = json.loads((out / "zoo.json").read_text())
    assert [m["settings"]["model"] for m in summary["models"]] == ["mlp", "gqa"]
    assert summary["seconds"] > 0 and summary["cpu_seconds"] > 0
    for name in ("mlp", "gqa"):
        assert_png(out / name / "bench.png")
        rows = json.loads((out / name / "bench.json").read_text())["rows"]
        assert [r["name"] for r in rows] == ["torch", "ort-fxopt-fp32"]
    assert "benchmarked 2 zoo models" in capsys.readouterr().out
    # a bad candidate name fails before the first model is built
    assert main(["bench", "--zoo", "--candidates", "torch,nope", "-o", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
