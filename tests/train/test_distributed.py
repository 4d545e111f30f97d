"""fxopt.train.distributed: the one-process path in-process, and real 2-process torchrun runs
on gloo (127.0.0.1, a free port, a hard timeout): same weights as one process, a crash on one
rank stops both and names the rank, a missing backend is a typed error."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from fxopt.errors import DistributedError
from fxopt.train import distributed as D

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")
TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


def run_bounded(cmd: list[str], cwd: Path,
                timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; on timeout kill the whole group and fail."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} ran past {timeout}s\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun(nproc: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_bounded([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                        "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
                        "--master-port", str(free_port()), "--max-restarts", "0", *args],
                       cwd=cwd)


# --------------------------------------------------------------------------- one process
def test_single_process_context_initialises_nothing(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = D.setup()
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main) == (0, 1, None, True)
    assert not torch.distributed.is_initialized()
    model = nn.Linear(3, 2)
    assert D.wrap(model, ctx) is model and D.unwrap(model) is model
    assert D.reduce_mean(torch.tensor(3.5), ctx) == 3.5
    assert D.broadcast_object({"a": 1}, ctx) == {"a": 1}
    with pytest.raises(ValueError, match="plain"), D.guarded(ctx):
        raise ValueError("plain")  # one process: the error passes unchanged
    D.teardown(ctx)


def test_loader_global_batch_and_order():
    ds = TensorDataset(torch.arange(24.0).reshape(24, 1))
    one = D.DistContext()
    data, sampler = D.loader(ds, batch_size=8, shuffle=True, seed=5, ctx=one)
    sampler.set_epoch(1)
    global_batches = [b[0].flatten().tolist() for b in data]
    assert len(global_batches) == 3 and sorted(sum(global_batches, [])) == list(range(24))
    ranks = []
    for r in range(2):  # what two ranks load, without a process group
        ctx = D.DistContext(rank=r, world_size=2)
        d, s = D.loader(ds, batch_size=8, shuffle=True, seed=5, ctx=ctx)
        s.set_epoch(1)
        ranks.append([b[0].flatten().tolist() for b in d])
    assert all(len(b) == 4 for b in ranks[0])  # per-rank batch is global // world
    for k in range(3):  # the ranks' step-k batches together are the one-process batch k
        assert sorted(ranks[0][k] + ranks[1][k]) == sorted(global_batches[k])
    with pytest.raises(DistributedError, match="does not divide among 2"):
        D.loader(ds, batch_size=7, shuffle=False, seed=0, ctx=D.DistContext(rank=0, world_size=2))
    with pytest.raises(DistributedError, match="sampler"):
        D.loader(ds, batch_size=8, shuffle=False, seed=0, ctx=one, sampler=None)
    d, _ = D.loader(ds, batch_size=8, shuffle=False, seed=0, ctx=one, num_workers=0,
                    persistent_workers=False)
    assert d.num_workers == 0


def test_bad_backend_and_env_are_typed(monkeypatch):
    with pytest.raises(DistributedError, match="unknown process-group backend"):
        D.setup("tcp")
    if not torch.cuda.is_available():
        with pytest.raises(DistributedError, match="nccl"):
            D.setup("nccl")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(DistributedError, match="MASTER_ADDR and MASTER_PORT unset"):
        D.setup("gloo")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(DistributedError, match="inconsistent"):
        D.setup("gloo")


# --------------------------------------------------------------------------- torchrun
def _one_and_two_processes(tmp_path, mode: str):
    """Run the worker's ``mode`` in one process and under a 2-process torchrun; return both
    completed processes and the weights each wrote (same keys, not empty)."""
    one = run_bounded([sys.executable, str(WORKER), mode, str(tmp_path / "one.safetensors")],
                      cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = torchrun(2, str(WORKER), mode, str(tmp_path / "two.safetensors"), cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert a.keys() == b.keys() and a
    return one, two, a, b


def test_two_processes_reach_the_one_process_weights(tmp_path):
    one, two, a, b = _one_and_two_processes(tmp_path, "train")
    untrained = {k: v for k, v in _initial().items()}
    for k in a:
        assert not torch.equal(a[k], untrained[k])  # it trained
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    info_one, info_two = json.loads(one.stdout), json.loads(two.stdout.strip().splitlines()[-1])
    assert info_two["world"] == 2 and info_two["plan"] == {"steps": 12}
    torch.testing.assert_close(torch.tensor(info_two["losses"]), torch.tensor(info_one["losses"]),
                               rtol=1e-5, atol=1e-6)  # mean of rank losses = global loss


def test_finetune_two_processes_match_one(tmp_path):
    """The real loop (fxopt.finetune with a teacher, masks, validation) under torchrun."""
    one, two, a, b = _one_and_two_processes(tmp_path, "finetune")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
        if k.endswith("weight"):
            assert torch.equal(a[k] == 0, b[k] == 0)  # the same sparsity mask, exactly
    h1, h2 = json.loads(one.stdout), json.loads(two.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(h2["history"]), torch.tensor(h1["history"]),
                               rtol=1e-5, atol=1e-6)
    assert h1["metric"] == h2["metric"]


def _initial() -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(WORKER.parent))
    try:
        import dist_worker
    finally:
        sys.path.pop(0)
    return dist_worker._model().state_dict()


def test_crash_on_one_rank_stops_all_and_names_it(tmp_path):
    res = torchrun(2, str(WORKER), "crash", str(tmp_path / "w.safetensors"), cwd=tmp_path)
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert "rank 1 of 2 failed during training: ValueError: synthetic failure at step 2" in text
    assert "DistributedError" in text
    assert not (tmp_path / "w.safetensors").exists()  # rank 0 never wrote a result


def test_crash_stops_the_other_rank_without_an_agent(tmp_path):
    """No torchrun agent to kill anyone: rank 0, blocked in DDP's all-reduce, sees gloo's
    closed connection and raises rank 1's own error, read from the group's store."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), "crash", str(tmp_path / "w.st")], cwd=tmp_path,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True))
    errs = []
    for proc in procs:
        try:
            errs.append(proc.communicate(timeout=TIMEOUT_S)[1])
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            pytest.fail("a rank did not stop after the other crashed")
    assert [p.returncode for p in procs] == [1, 1]
    assert ("DistributedError: rank 1 of 2 failed during training: ValueError: synthetic "
            "failure at step 2 (rank 0 stopped: RuntimeError)") in errs[0]
    assert "fxopt: rank 1 of 2 failed during training" in errs[1]
    assert not (tmp_path / "w.st").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal of nccl")
def test_missing_backend_under_torchrun_is_typed(tmp_path):
    res = torchrun(2, str(WORKER), "backend", str(tmp_path / "w"), "nccl", cwd=tmp_path)
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert "DistributedError" in text and "'nccl'" in text and "backend='gloo'" in text


def test_sync_batch_norms_share_state_and_restore():
    """What wrap() does on CUDA, checked on CPU (eval forward needs no process group)."""
    import fxopt
    from fxopt import zoo
    from fxopt.train.structure import StructureKeeper

    model, x = zoo.load("resnet")
    gm = fxopt.capture(model, x, mode="symbolic")
    want = gm(*x)
    params = {id(p) for p in gm.parameters()}
    count = D.sync_batch_norms(gm)
    assert count == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in gm.modules()) == count
    assert {id(p) for p in gm.parameters()} == params  # an optimizer built before still works
    torch.testing.assert_close(gm(*x), want)
    assert D.restore_batch_norms(gm) == count and D.restore_batch_norms(gm) == 0
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in gm.modules())
    assert {id(p) for p in gm.parameters()} == params
    torch.testing.assert_close(gm(*x), want)
    frozen = fxopt.capture(model, x, mode="symbolic")
    keeper = StructureKeeper.from_graph(frozen, bn="frozen")
    trained = keeper.prepare(frozen)
    assert D.sync_batch_norms(trained) == 0  # frozen statistics need no synchronisation
    trained.eval()
    plain = fxopt.capture(model, x, mode="symbolic")
    keeper = StructureKeeper.from_graph(plain)
    trained = keeper.prepare(plain)
    assert D.sync_batch_norms(trained) == count
    out = keeper.finish(trained)  # finish turns them back
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in out.modules())
    torch.testing.assert_close(out(*x), want)
