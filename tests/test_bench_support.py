"""benchmarks/bench_support.py and results_file.py: the helpers every benchmark script
shares (command-line parsing, one fresh process per model, the RESULTS.md sections)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_support  # noqa: E402
import results_file  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench")
    bench_support.add_run_flags(parser)
    return parser


def test_run_flags_are_the_same_for_every_script():
    args = _parser().parse_args(["--no-write", "--in-process", "--row-json"])
    assert (args.no_write, args.in_process, args.row_json) == (True, True, True)
    args = _parser().parse_args([])
    assert (args.no_write, args.in_process, args.row_json) == (False, False, False)


def test_parse_models_defaults_and_refuses_unknown_names(capsys):
    known = ("resnet", "mlp", "gqa")
    parse = bench_support.parse_models
    assert parse(_parser(), None, ("mlp",), known) == ["mlp"]
    assert parse(_parser(), " resnet, gqa ,", ("mlp",), known) == ["resnet", "gqa"]
    with pytest.raises(SystemExit):
        parse(_parser(), "resnet,vgg", ("mlp",), known)
    assert "unknown model(s) vgg; choose from resnet, mlp, gqa" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["two", "0", "1,-2", ","])
def test_parse_threads_needs_positive_integers(text, capsys):
    with pytest.raises(SystemExit):
        bench_support.parse_threads(_parser(), text)
    assert "--threads" in capsys.readouterr().err


def test_parse_threads_and_spread():
    assert bench_support.parse_threads(_parser(), "1, 4") == [1, 4]
    assert bench_support.spread([0.5, 1.0, 2.0, 3.0]) == "0.50 / 1.50 / 3.00"


def test_run_isolated_returns_the_marked_row_and_relays_progress(tmp_path, capfd):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent("""
        import json, sys
        import fxopt  # the child finds the same fxopt as the parent
        print("noise")
        print("  progress line", file=sys.stderr)
        print("other stderr", file=sys.stderr)
        print("row: " + json.dumps({"model": sys.argv[2], "argv": " ".join(sys.argv[3:])}))
    """))
    row = bench_support.run_isolated(str(script), "mlp", "row: ", ["--quick"], relay="  ")
    assert row == {"model": "mlp", "argv": "--row-json --quick"}
    err = capfd.readouterr().err
    assert "  progress line" in err and "other stderr" not in err


def test_run_isolated_stops_on_a_failed_child(tmp_path):
    script = tmp_path / "child.py"
    script.write_text("raise RuntimeError('model exploded')\n")
    with pytest.raises(SystemExit, match="(?s)benchmark of mlp failed.*model exploded"):
        bench_support.run_isolated(str(script), "mlp", "row: ", [])


def test_publish_writes_only_its_section(tmp_path, capsys):
    path = tmp_path / "RESULTS.md"
    results_file.write_section("a", "first A", path)
    results_file.write_section("b", "first B", path)
    results_file.publish("a", "second A\n", path=path)
    assert capsys.readouterr().out == "second A\n\n"
    text = path.read_text()
    assert "second A" in text and "first A" not in text and "first B" in text
    results_file.publish("b", "second B", write=False, path=path)
    assert "first B" in path.read_text()
