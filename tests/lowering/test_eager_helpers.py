"""Eager artifacts of graphs that call ``torch.fx.wrap``-ped helpers (torchvision, timm and
model-file style): inlined by tracing through them, or called by name from ``trusted``
modules that the manifest declares. Reloaded in a fresh Python process, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.fx as fx
import wrapped_helpers as wh  # tests/lowering is on sys.path (rootdir-relative test import)

import fxopt
from fxopt import zoo
from fxopt.errors import LoweringError

REPO = Path(__file__).resolve().parents[2]
HELPERS_DIR = str(Path(wh.__file__).parent)

_RELOAD = """
import json, sys
import safetensors.torch as st
import fxopt
art = fxopt.load(sys.argv[1])
x = st.load_file(sys.argv[2])["x"]
st.save_file({"y": art(x).contiguous()}, sys.argv[3])
print(json.dumps({"helpers_imported": "wrapped_helpers" in sys.modules}))
"""


def _reload_in_fresh_process(art_path: Path, x: torch.Tensor, tmp: Path, helpers: bool):
    """Load ``art_path`` in a new interpreter and run it on ``x``: (output, report). The
    helpers' folder is on that interpreter's path only when ``helpers`` is True."""
    safetensors.torch.save_file({"x": x}, tmp / "x.safetensors")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([HELPERS_DIR] if helpers else [])])
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(art_path), str(tmp / "x.safetensors"),
         str(tmp / "y.safetensors")],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return safetensors.torch.load_file(tmp / "y.safetensors")["y"], report


def _helper_calls(gm: fx.GraphModule) -> list[str]:
    return [n.target.__qualname__ for n in gm.graph.nodes
            if n.op == "call_function" and getattr(n.target, "__module__", "") == wh.__name__]


def test_wrapped_helpers_are_inlined_and_reload_in_a_fresh_process(tmp_path) -> None:
    model = wh.HelperNet().eval()
    gm = fx.symbolic_trace(model)
    assert sorted(_helper_calls(gm)) == [
        "_get_relative_position_bias", "scaled_residual", "split_half", "stochastic_depth"
    ]
    code = gm.code
    x = torch.randn(3, 4, 8)
    art = fxopt.lower(gm, "eager", (x,), path=tmp_path / "art")
    assert gm.code == code  # the caller's graph is not changed
    assert art.manifest["inlined"] == [
        "wrapped_helpers.split_half", "wrapped_helpers._get_relative_position_bias",
        "wrapped_helpers.stochastic_depth", "wrapped_helpers.scaled_residual",
        "wrapped_helpers._scale",  # called by scaled_residual: inlined in the next round
    ]
    assert "trusted" not in art.manifest
    nodes = json.loads((tmp_path / "art" / "graph.json").read_text())["graph"]["nodes"]
    assert not [n["target"] for n in nodes if n["target"].startswith("wrapped_helpers")]
    # each inlined node says where it came from
    assert {n.get("meta", {}).get("fxopt_inlined_from") for n in nodes} >= {
        "wrapped_helpers._get_relative_position_bias", "wrapped_helpers._scale"
    }
    assert _helper_calls(art.module) == []
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(art(x), want, rtol=0, atol=0)
    fresh = torch.randn(5, 4, 8)
    got, report = _reload_in_fresh_process(tmp_path / "art", fresh, tmp_path, helpers=False)
    assert report == {"helpers_imported": False}
    with torch.no_grad():
        torch.testing.assert_close(got, model(fresh), rtol=1e-6, atol=1e-6)


def test_untraceable_helper_is_refused_naming_it_and_how_to_trust_it(tmp_path) -> None:
    gm = fx.symbolic_trace(wh.UntraceableNet().eval())
    with pytest.raises(LoweringError) as info:
        fxopt.lower(gm, "eager", (torch.randn(2, 4),), path=tmp_path / "art")
    message = str(info.value)
    assert "wrapped_helpers.data_dependent" in message
    assert "control flow" in message
    assert "trusted=['wrapped_helpers']" in message
    assert list(tmp_path.iterdir()) == []


def test_trusted_helper_is_recorded_and_reloads_in_a_fresh_process(tmp_path) -> None:
    model = wh.UntraceableNet().eval()
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 4)
    art = fxopt.lower(gm, "eager", (x,), path=tmp_path / "art", trusted=["wrapped_helpers"])
    assert art.manifest["trusted"] == ["wrapped_helpers"]
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["trusted"] == ["wrapped_helpers"]
    assert _helper_calls(art.module) == ["data_dependent"]  # kept as a call: it is trusted
    got, report = _reload_in_fresh_process(tmp_path / "art", -x, tmp_path, helpers=True)
    assert report == {"helpers_imported": True}
    with torch.no_grad():
        torch.testing.assert_close(got, model(-x))


def _edit(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


@pytest.fixture
def trusted_artifact(tmp_path) -> Path:
    gm = fx.symbolic_trace(wh.UntraceableNet().eval())
    fxopt.lower(gm, "eager", (torch.randn(2, 4),), path=tmp_path / "art",
                trusted=["wrapped_helpers"])
    return tmp_path / "art"


def _retarget(name: str):
    def edit(doc):
        node = next(n for n in doc["graph"]["nodes"] if n["name"] == "data_dependent")
        node["target"] = name

    return edit


def test_loader_refuses_a_target_the_manifest_does_not_declare(trusted_artifact) -> None:
    _edit(trusted_artifact / "manifest.json", lambda d: d.pop("trusted"))
    with pytest.raises(LoweringError, match="outside the allowed namespaces"):
        fxopt.load(trusted_artifact)


def test_loader_never_imports_an_undeclared_module(trusted_artifact, tmp_path, monkeypatch):
    # a module that would leave a mark if the loader imported it
    (tmp_path / "undeclared_mod.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').close()\ndef fn(x):\n    return x\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for target in ("undeclared_mod.fn", "wrapped_helpers_evil.fn", "os.system"):
        _edit(trusted_artifact / "graph.json", _retarget(target))
        with pytest.raises(LoweringError, match="outside the allowed namespaces"):
            fxopt.load(trusted_artifact)
    assert not (tmp_path / "imported").exists()
    assert "undeclared_mod" not in sys.modules


@pytest.mark.parametrize("prefix", ["os", "builtins", "torch", "subprocess.run", "a..b", 3])
def test_dangerous_or_malformed_trusted_prefixes_are_refused(prefix, trusted_artifact, tmp_path):
    gm = fx.symbolic_trace(wh.UntraceableNet().eval())
    with pytest.raises(LoweringError, match="trusted"):
        fxopt.lower(gm, "eager", (torch.randn(2, 4),), path=tmp_path / "new", trusted=[prefix])
    assert not (tmp_path / "new").exists()
    _edit(trusted_artifact / "manifest.json", lambda d: d.update(trusted=[prefix]))
    with pytest.raises(LoweringError, match="trusted"):
        fxopt.load(trusted_artifact)


def test_trusted_must_be_a_list_of_names(tmp_path) -> None:
    gm = fx.symbolic_trace(wh.UntraceableNet().eval())
    with pytest.raises(LoweringError, match="list of module names"):
        fxopt.lower(gm, "eager", (torch.randn(2, 4),), path=tmp_path / "a",
                    trusted="wrapped_helpers")


@pytest.mark.parametrize("name", ["efficientnet", "convnext", "swin"])
def test_zoo_models_with_wrapped_helpers_round_trip(name, tmp_path) -> None:
    model, inputs = zoo.load(name)
    gm = fxopt.capture(model, inputs, mode="symbolic")
    art = fxopt.lower(gm, "eager", inputs, path=tmp_path / "art")
    with torch.no_grad():
        torch.testing.assert_close(fxopt.load(tmp_path / "art")(*inputs), model(*inputs))
    assert "trusted" not in art.manifest
