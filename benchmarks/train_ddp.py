"""Recovery training on 1 vs 2 CPU processes (torchrun, gloo): same weights, honest speed.

Run:  .venv/bin/python benchmarks/train_ddp.py   (rewrites its section "train_ddp" of
benchmarks/RESULTS.md)

A seeded digits CNN (scikit-learn's bundled 8x8 digits, no download) is trained here as
the teacher, ``sparsify(ratio=0.8)`` zeroes 80% of its conv/linear weights, and
``fxopt.finetune`` distills it back (SGD, global batch ``--batch``, ``--epochs``): once in
one plain process, once under ``torchrun --nproc-per-node 2`` (gloo, 127.0.0.1). Reported
per run: validation accuracy before and after, the largest weight difference from the
1-process run, the training throughput the loop measured (samples per second of step
time, all ranks together) and the wall time of the whole run (start-up, pipeline and
validation included). Two processes on a 2-CPU machine share the cores and add an
all-reduce per step: the table says what that costs or gains here, nothing more.
Flags: ``--epochs`` (default 3), ``--batch`` (default 64), ``--threads`` per process
(default 1), ``--no-write``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_support import load_average, machine  # noqa: E402
from results_file import publish  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN, VAL = slice(0, 1280), slice(1400, 1784)  # 1280 = a multiple of every global batch used


def digits(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return x[part], torch.tensor(d.target)[part]


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))


def accuracy(module: nn.Module, data) -> float:
    with torch.no_grad():
        return float((module(data[0]).argmax(-1) == data[1]).float().mean())


def train_teacher(path: Path) -> float:
    model, data = cnn(), digits(TRAIN)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        for idx in torch.randperm(len(data[0]), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(data[0][idx]), data[1][idx]).backward()
            opt.step()
    save_file(model.state_dict(), str(path))
    return accuracy(model.eval(), digits(VAL))


def worker(args: argparse.Namespace) -> None:
    """One process of a run (rank 0 writes weights and a JSON summary)."""
    import fxopt
    from fxopt.train.loop import finetune

    torch.set_num_threads(args.threads)
    teacher = cnn()
    teacher.load_state_dict(load_file(args.teacher))
    teacher.eval()
    train, val = digits(TRAIN), digits(VAL)
    start = time.perf_counter()
    gm = fxopt.optimize(teacher, (train[0][:2],), "default,sparsify(ratio=0.8)").module
    before = accuracy(gm, val)
    res = finetune(gm, train, teacher=teacher, epochs=args.epochs, batch_size=args.batch,
                   lr=0.05, optimizer="sgd", seed=0, val_data=val)
    if os.environ.get("RANK", "0") == "0":
        save_file({k: v.contiguous() for k, v in res.module.state_dict().items()}, args.out)
        steps_s = sum(r["seconds"] for r in res.history)
        samples = sum(r["samples_per_s"] * r["seconds"] for r in res.history)
        Path(args.out + ".json").write_text(json.dumps({
            "before": before, "after": accuracy(res.module, val),
            "samples_per_s": samples / steps_s, "seconds": time.perf_counter() - start,
            "world": int(os.environ.get("WORLD_SIZE", "1"))}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nproc: int, tmp: Path, args: argparse.Namespace) -> tuple[dict, dict, float]:
    out = str(tmp / f"w{nproc}.safetensors")
    flags = ["--worker", "--out", out, "--teacher", str(tmp / "teacher.safetensors"),
             "--epochs", str(args.epochs), "--batch", str(args.batch),
             "--threads", str(args.threads)]
    cmd = [sys.executable, __file__, *flags] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
        str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "--max-restarts", "0", __file__, *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, timeout=1800)
    wall = time.perf_counter() - start
    return load_file(out), json.loads(Path(out + ".json").read_text()), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--teacher", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        teacher_acc = train_teacher(tmp / "teacher.safetensors")
        runs = {n: _run(n, tmp, args) for n in (1, 2)}
    ref = runs[1][0]
    rows = []
    for n, (weights, info, wall) in runs.items():
        diff = max(float((weights[k] - ref[k]).abs().max()) for k in ref)
        zeros = sum(int((v == 0).sum()) for k, v in weights.items() if k.endswith("weight"))
        total = sum(v.numel() for k, v in weights.items() if k.endswith("weight"))
        rows.append(f"| {n} | {info['before']:.4f} | {info['after']:.4f} | {diff:.2e} | "
                    f"{zeros / total:.3f} | {info['samples_per_s']:.0f} | {wall:.1f} |")
    speed = runs[2][1]["samples_per_s"] / runs[1][1]["samples_per_s"]
    wall = runs[2][2] / runs[1][2]
    cmd = "python benchmarks/train_ddp.py" + "".join(
        f" --{k} {getattr(args, k)}" for k in ("epochs", "batch", "threads"))
    text = "\n".join([
        "## Recovery training: 1 vs 2 CPU processes (torchrun, gloo)", "",
        f"`{cmd}` — {machine()}, load average {load_average():.1f} at the end, torch "
        f"{torch.__version__}, {args.threads} thread(s) per process.", "",
        f"Digits CNN teacher (val accuracy {teacher_acc:.4f}) → `sparsify(ratio=0.8)` → "
        f"`fxopt.finetune` with distillation, SGD lr 0.05, global batch {args.batch}, "
        f"{args.epochs} epochs, seed 0; the same global batches in both runs.", "",
        "| processes | val acc before | val acc after | max abs weight diff vs 1 process | "
        "weight sparsity | train samples/s | wall s |",
        "|---|---|---|---|---|---|---|", *rows, "",
        "Two processes reach the one-process weights to float round-off of the gradient "
        f"all-reduce, with the same zeros. Step throughput 2/1: {speed:.2f}x (one thread "
        f"per process, so two processes use both of the {os.cpu_count()} CPUs, minus an "
        f"all-reduce per step); wall time 2/1: {wall:.2f}x, because every process starts "
        "torch, runs the pipeline and validates on its own. On a shared 2-CPU machine DDP "
        "is here for correctness, and for machines with cores or nodes to spare, not for "
        "speed; with more threads per process the one-process run gets the cores instead."])
    publish("train_ddp", text, write=not args.no_write)


if __name__ == "__main__":
    main()
