"""benchmarks/run.py, what ``make bench`` runs: it finds every benchmark script, lists them,
and runs the chosen ones, each in a fresh process."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import run as bench_run  # noqa: E402


def _listed() -> list[str]:
    out = subprocess.run([sys.executable, str(BENCH / "run.py"), "--list"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def test_list_names_every_script_with_a_main():
    names = _listed()
    assert {"latency", "quant_dynamic", "half", "capture"} <= set(names)
    assert not {"bench_support", "results_file", "run"} & set(names)  # helpers, not benchmarks
    with_main = sorted(
        p.stem for p in BENCH.glob("*.py")
        if p.stem != "run" and "\ndef main(" in p.read_text()
    )
    assert sorted(names) == with_main


@pytest.mark.parametrize("name", [s.name for s in bench_run.discover()])
def test_every_listed_script_exists_imports_and_writes_a_section(name):
    script = next(s for s in bench_run.discover() if s.name == name)
    assert script.path.is_file() and script.sections, script
    spec = importlib.util.spec_from_file_location(f"bench_{name}", script.path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)  # not as __main__: nothing runs
    finally:
        del sys.modules[spec.name]
    assert callable(module.main)


def _suite(tmp_path: Path) -> Path:
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    (folder / "helper.py").write_text("X = 1\n")
    (folder / "ok.py").write_text(textwrap.dedent('''
        """Writes a marker."""
        from pathlib import Path

        def main():
            Path(__file__).with_name("ran-ok").write_text("yes")

        if __name__ == "__main__":
            main()
    '''))
    (folder / "bad.py").write_text(textwrap.dedent('''
        """Fails."""
        import sys

        def main():
            sys.exit(3)

        if __name__ == "__main__":
            main()
    '''))
    return folder


def test_only_runs_the_named_script_and_failures_set_the_exit_status(tmp_path, capsys):
    folder = _suite(tmp_path)
    assert [s.name for s in bench_run.discover(folder)] == ["bad", "ok"]
    assert bench_run.main(["--only", "ok"], folder=folder) == 0
    assert (folder / "ran-ok").read_text() == "yes"
    (folder / "ran-ok").unlink()
    assert bench_run.main([], folder=folder) == 1  # bad fails, ok still runs
    assert (folder / "ran-ok").exists()
    assert "failed: bad" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown benchmark 'nope'; known: bad, ok"):
        bench_run.main(["--only", "nope"], folder=folder)
