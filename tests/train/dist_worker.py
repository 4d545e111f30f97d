"""A worker that tests/train/test_distributed.py starts under torchrun (or plainly, for the
one-process reference). Usage: ``python dist_worker.py MODE OUT [BACKEND]``.

MODE ``train``: a seeded MLP trained 2 epochs with SGD + momentum on a fixed dataset
through fxopt.train.distributed (DDP, DistributedSampler, global batch 16); rank 0 writes
the weights to OUT as safetensors and a JSON line of losses. MODE ``finetune``: the same
through ``fxopt.finetune`` (distillation, sparsity masks, validation). MODE ``crash``: rank 1 raises
at its third step inside ``guarded``. MODE ``backend``: ``setup(BACKEND)`` only.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import TensorDataset

from fxopt.train import distributed as D

GLOBAL_BATCH = 16
SAMPLES = 96


def _data() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 12, generator=gen)
    y = (x[:, :3].sum(dim=1) > 0).long() + (x[:, 3] > 1).long()
    return TensorDataset(x, y)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 3))


def finetune_run(out: str) -> int:
    """The real loop: fxopt.finetune on a sparsified digits MLP with its teacher."""
    import os

    from train_helpers import digits, mlp, trained  # next to this script

    import fxopt
    from fxopt.train.loop import finetune

    data = digits(0, 192)
    teacher = trained(mlp(), data, steps=30)
    gm = fxopt.optimize(teacher, (data[0][:2],), "default,sparsify(ratio=0.5)").module
    res = finetune(gm, data, teacher=teacher, epochs=2, batch_size=32, lr=0.05,
                   optimizer="sgd", seed=0, val_data=digits(1500, 1628))
    if os.environ.get("RANK", "0") == "0":
        save_file({k: v.contiguous() for k, v in res.module.state_dict().items()}, out)
        print(json.dumps({"history": [r["loss"] for r in res.history],
                          "metric": res.best_metric}))
    return 0


@record
def main() -> int:
    mode, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    if mode == "finetune":
        return finetune_run(out)
    ctx = D.setup(sys.argv[3] if len(sys.argv) > 3 else None, timeout_s=60)
    try:
        if mode == "backend":
            return 0
        model = D.wrap(_model().to(ctx.device), ctx)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        data, sampler = D.loader(_data(), batch_size=GLOBAL_BATCH, shuffle=True, seed=3,
                                 ctx=ctx)
        losses = []
        with D.guarded(ctx):
            step = 0
            for epoch in range(2):
                sampler.set_epoch(epoch)
                for x, y in data:
                    if mode == "crash" and ctx.rank == 1 and step == 2:
                        raise ValueError("synthetic failure at step 2")
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    opt.step()
                    losses.append(D.reduce_mean(loss, ctx))
                    step += 1
        plan = D.broadcast_object({"steps": step} if ctx.is_main else None, ctx)
        if ctx.is_main:
            weights = {k: v.detach().contiguous() for k, v in D.unwrap(model).state_dict().items()}
            save_file(weights, out)
            print(json.dumps({"losses": losses, "plan": plan, "world": ctx.world_size}))
    finally:
        D.teardown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
