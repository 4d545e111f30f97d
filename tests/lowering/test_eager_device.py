"""``fxopt.load(eager_folder, device=...)``: weights and the devices the graph names move
to the device, inputs are copied there per call, and CUDA asked for where there is none is
a typed error before any work (device="meta" stands in for an accelerator on CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt
from fxopt.errors import LoweringError


class _Positions(nn.Module):
    """A linear layer plus positions made inside the graph: torch.export writes
    ``arange(..., device=cpu)``, a device literal the artifact must move too."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        pos = torch.arange(x.shape[1], dtype=x.dtype, device=x.device)
        return self.fc(x) + pos


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    model = _Positions().eval()
    x = torch.randn(2, 6)
    gm = fxopt.capture(model, (x,), mode="export")
    path = tmp_path_factory.mktemp("eager") / "m"
    fxopt.lower(gm, "eager", (x,), path=path)
    return path, model, x


def _devices(art) -> set[str]:
    return {t.device.type for t in [*art.module.parameters(), *art.module.buffers()]}


def test_load_on_cpu_puts_weights_there_and_matches(folder):
    path, model, x = folder
    art = fxopt.load(path, device="cpu")
    assert art.device == torch.device("cpu") and _devices(art) == {"cpu"}
    with torch.no_grad():
        torch.testing.assert_close(art(x), model(x))


def test_graph_devices_move_with_the_weights(folder):
    path, model, x = folder
    saved = fxopt.load(path)
    literals = [n for n in saved.module.graph.nodes
                if torch.device("cpu") in [*n.args, *n.kwargs.values()]]
    assert literals, "the export graph names its device"  # what the test is about
    art = fxopt.load(path, device="meta")
    assert _devices(art) == {"meta"}
    out = art(x)  # a CPU input is copied to the artifact's device
    assert out.device.type == "meta" and out.shape == (2, 6)
    assert not [n for n in art.module.graph.nodes
                if torch.device("cpu") in [*n.args, *n.kwargs.values()]]


def test_cuda_without_cuda_is_a_typed_error(folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LoweringError, match="CUDA is not available here.*device='cpu'"):
        fxopt.load(folder[0], device="cuda")


def test_cuda_index_beyond_the_machine_is_a_typed_error(folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(LoweringError, match=r"has 1 CUDA device\(s\) \(cuda:0..cuda:0\)"):
        fxopt.load(folder[0], device="cuda:3")


@pytest.mark.parametrize("bad", ["gpu", 3.5])
def test_a_device_that_is_not_one_is_a_typed_error(folder, bad):
    with pytest.raises(LoweringError, match="is not a torch device"):
        fxopt.load(folder[0], device=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_on_cuda_runs_there(folder):
    path, model, x = folder
    art = fxopt.load(path, device="cuda")
    assert _devices(art) == {"cuda"}
    out = art(x)
    assert out.is_cuda
    with torch.no_grad():
        torch.testing.assert_close(out.cpu(), model(x), rtol=1e-4, atol=1e-5)
