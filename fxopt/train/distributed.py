"""Data-parallel training under ``torchrun``: process group, DDP, samplers, rank-safe errors.

This module is a thin, checked layer over torch's own parts: ``torch.distributed`` (gloo on
CPU, NCCL on CUDA) initialised from the environment ``torchrun`` sets, ``DistributedDataParallel``
and ``DistributedSampler``. Multi-machine runs use torchrun's own rendezvous
(``torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:PORT``);
nothing here re-invents it. Without torchrun everything degrades to one process and
initialises nothing, so the same training code runs as ``python train.py``::

    ctx = setup()                                    # reads RANK / WORLD_SIZE / LOCAL_RANK
    try:
        model = wrap(module.to(ctx.device), ctx)     # DDP when world_size > 1
        data, sampler = loader(dataset, batch_size=64, shuffle=True, seed=0, ctx=ctx)
        with guarded(ctx):                           # a crash on any rank stops every rank
            for epoch in range(epochs):
                sampler.set_epoch(epoch)
                for x, y in data:
                    ...
        if ctx.is_main:
            save(unwrap(model))
    finally:
        teardown(ctx)

Same seed, same global batch, same weights: ``loader`` always draws the order from a
``DistributedSampler`` (``num_replicas=1`` in one process), so the union of the rank
batches at step k is exactly the one-process batch k, and DDP's gradient average over
equal per-rank batches is the gradient of the global-batch mean. A 2-process CPU run
therefore ends with the 1-process weights to float round-off of the all-reduce, as long as
every global batch is full (``len(dataset)`` a multiple of ``batch_size``, or
``drop_last=True``) and the loss is a per-sample mean. Train-mode batch norm breaks that
on CPU (each rank normalises its own half batch; ``SyncBatchNorm`` is CUDA-only, ``wrap``
uses it there), and so does dropout (each rank draws its own masks). Quantization-aware
training with observed activation scales is close but not equal: weights stay in sync,
while each rank's observers follow its own share of the batch (rank 0's scales are the
ones exported); learnable scales are parameters, all-reduced like the weights.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fxopt.errors import DistributedError

__all__ = ["DistContext", "setup", "teardown", "wrap", "unwrap", "loader", "reduce_mean",
           "broadcast_object", "guarded"]

BACKENDS = ("gloo", "nccl", "mpi", "ucc")
_FAILED_KEY = "fxopt/failed_rank"  # set in the group's store by the first rank that fails
_SYNC_BN = "_fxopt_sync_bn"  # on a DDP wrapper: {module path: original BN class}


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes, its device and
    the process-group backend (``None`` in a single, uninitialised process).

    >>> ctx = setup()  # no torchrun variables in the environment
    >>> ctx.rank, ctx.world_size, ctx.is_main, ctx.backend
    (0, 1, True, None)
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False  # setup() initialised the group, so teardown() destroys it

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes logs, checkpoints and the artifact."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size,
                "local_rank": self.local_rank, "device": str(self.device),
                "backend": self.backend}


# --------------------------------------------------------------------------- set up
def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"environment variable {name}={text!r} is not an integer; "
                               "launch with torchrun, which sets it") from None


def _check_backend(backend: str, local_rank: int) -> None:
    if backend not in BACKENDS:
        raise DistributedError(f"unknown process-group backend {backend!r}; use 'gloo' "
                               "(CPU), 'nccl' (CUDA GPUs) or None to choose by device")
    if not dist.is_available() or not dist.is_backend_available(backend):
        raise DistributedError(
            f"this torch build ({torch.__version__}) has no {backend!r} backend; "
            + ("use backend='gloo' (or None) to train on CPU, or install a CUDA build of torch "
               "for NCCL" if backend == "nccl" else "use backend='gloo' (or None)"))
    if backend == "nccl":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DistributedError(
                "backend 'nccl' needs CUDA GPUs and this machine has none; use "
                "backend='gloo' (or None, which picks gloo on CPU)")
        if local_rank >= count:
            raise DistributedError(
                f"local rank {local_rank} has no GPU (this machine has {count}); start at most "
                f"{count} processes per node: torchrun --nproc-per-node {count} ...")


def setup(backend: str | None = None, timeout_s: float = 300, *,
          cudnn_benchmark: bool | None = None) -> DistContext:
    """The process's :class:`DistContext`, initialising the default process group from the
    variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``). Without them: one process, nothing initialised, the first GPU if any.

    ``backend=None`` picks NCCL when CUDA is available, else gloo; a backend this machine
    or build cannot run is a ``DistributedError`` before anything starts. ``timeout_s``
    bounds every collective (a rank that stops answering fails the others after it). A
    process group the caller initialised already is used as is (and left to the caller).
    On CUDA ``torch.backends.cudnn.benchmark`` is switched on (``cudnn_benchmark=False``
    leaves it alone).

    >>> ctx = setup()  # doctest: +SKIP
    >>> ctx  # under torchrun --nproc-per-node 2, on rank 1  # doctest: +SKIP
    DistContext(rank=1, world_size=2, local_rank=1, device=device(type='cpu'), backend='gloo', ...)
    """
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise DistributedError(f"timeout_s must be a positive number of seconds, got "
                               f"{timeout_s!r}")
    cuda = torch.cuda.is_available()
    if dist.is_available() and dist.is_initialized():
        used = dist.get_backend()
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        device = torch.device("cuda", local) if used == "nccl" else torch.device("cpu")
        return DistContext(rank, world, local, device, used, owns_group=False)
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} / WORLD_SIZE={world} are inconsistent; launch "
                               "with torchrun, which sets both")
    chosen = backend or ("nccl" if cuda and dist.is_backend_available("nccl") else "gloo")
    if backend is not None or world > 1:
        _check_backend(chosen, local)
    on_gpu = chosen == "nccl" or (cuda and world == 1 and backend is None)
    device = torch.device("cuda", local) if on_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if cudnn_benchmark is not False:
            torch.backends.cudnn.benchmark = True
    if world == 1:
        return DistContext(0, 1, local, device, None)
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={world} but {' and '.join(missing)} unset; launch with torchrun "
            "(torchrun --nproc-per-node N -m fxopt finetune ...), which sets the rendezvous")
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group(chosen, timeout=timedelta(seconds=float(timeout_s)),
                                world_size=world, rank=rank,
                                device_id=device if device.type == "cuda" else None)
    except (RuntimeError, ValueError, OSError) as e:
        raise DistributedError(
            f"rank {rank} of {world}: could not join the {chosen} process group at {where}: "
            f"{type(e).__name__}: {e}") from e
    return DistContext(rank, world, local, device, chosen, owns_group=True)


def teardown(ctx: DistContext) -> None:
    """Destroy the process group ``setup`` created (a no-op otherwise).

    >>> teardown(setup())
    """
    if ctx.owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- model
def wrap(module: nn.Module, ctx: DistContext, *, sync_bn: bool = True,
         **ddp_options: Any) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` when ``ctx.world_size > 1`` (else itself).

    Move it to ``ctx.device`` first. On CUDA with ``sync_bn``, batch-norm modules become
    ``SyncBatchNorm`` (statistics over the global batch; ``unwrap`` turns them back); on CPU
    torch has no SyncBatchNorm, so train-mode BN normalises each rank's share. Extra
    keywords go to DDP (``find_unused_parameters=True`` for graphs with idle branches).

    >>> model = wrap(model.to(ctx.device), ctx)  # doctest: +SKIP
    """
    if not ctx.distributed:
        return module
    if not any(p.requires_grad for p in module.parameters()):
        raise DistributedError(
            f"rank {ctx.rank}: the module has no trainable parameter, so there is nothing for "
            "DistributedDataParallel to synchronise; make its weights trainable first "
            "(fxopt.train.structure.StructureKeeper.prepare does)")
    originals: dict[str, type] = {}
    if sync_bn and ctx.device.type == "cuda":
        for path, m in module.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(
                    m, nn.SyncBatchNorm):
                originals[path] = type(m)
        if originals:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    try:
        wrapped = nn.parallel.DistributedDataParallel(module, device_ids=ids, **ddp_options)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"rank {ctx.rank}: DistributedDataParallel refused the module: "
                               f"{e}") from e
    setattr(wrapped, _SYNC_BN, originals)
    return wrapped


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (``module`` itself when it is not wrapped), with any
    ``SyncBatchNorm`` that ``wrap`` made turned back into the original batch-norm class.

    >>> unwrap(wrap(model, ctx)) is model  # doctest: +SKIP
    True
    """
    if not isinstance(module, nn.parallel.DistributedDataParallel):
        return module
    inner = module.module
    for path, cls in getattr(module, _SYNC_BN, {}).items():
        sync = inner.get_submodule(path)
        bn = cls(sync.num_features, sync.eps, sync.momentum, sync.affine,
                 sync.track_running_stats)
        bn.load_state_dict(sync.state_dict())
        bn.train(sync.training)
        if sync.affine:
            bn.weight.requires_grad_(sync.weight.requires_grad)
            bn.bias.requires_grad_(sync.bias.requires_grad)
        *parent, leaf = path.split(".")
        owner = inner.get_submodule(".".join(parent)) if parent else inner
        setattr(owner, leaf, bn.to(sync.weight.device if sync.affine else "cpu"))
    return inner


# --------------------------------------------------------------------------- data
def loader(dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int, ctx: DistContext,
           drop_last: bool = False, **overrides: Any) -> tuple[DataLoader, DistributedSampler]:
    """A DataLoader over this rank's share of ``dataset`` and its sampler.

    ``batch_size`` is the GLOBAL batch: each rank loads ``batch_size // world_size``
    (a ``DistributedError`` if it does not divide). The order comes from a
    ``DistributedSampler`` seeded with ``seed`` in every world size (one process too), so
    call ``sampler.set_epoch(epoch)`` at each epoch. On CUDA: 4 workers per process (at
    most the CPUs per local process), ``pin_memory``, ``persistent_workers``; on CPU the
    main process loads (0 workers). ``overrides`` (``num_workers=2``, ``collate_fn=...``)
    go to the DataLoader last.

    >>> data, sampler = loader(ds, batch_size=64, shuffle=True, seed=0, ctx=ctx)  # doctest: +SKIP
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DistributedError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size % ctx.world_size:
        raise DistributedError(
            f"the global batch_size {batch_size} does not divide among {ctx.world_size} "
            f"processes; use a multiple of {ctx.world_size} (e.g. "
            f"{(batch_size // ctx.world_size + 1) * ctx.world_size}) or change "
            "--nproc-per-node")
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise DistributedError(
            f"the training data must be a map-style torch.utils.data.Dataset (with __len__ "
            f"and __getitem__), got {type(dataset).__name__}") from None
    if size == 0:
        raise DistributedError("the training data is empty")
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                                 shuffle=shuffle, seed=seed, drop_last=drop_last)
    options: dict[str, Any] = {"num_workers": 0}
    if ctx.device.type == "cuda":
        local_world = max(_env_int("LOCAL_WORLD_SIZE", 1), 1)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        options = {"num_workers": max(min(4, cpus // local_world), 0), "pin_memory": True,
                   "persistent_workers": True}
    options.update(overrides)
    if not options.get("num_workers"):
        for key in ("persistent_workers", "prefetch_factor"):
            if key not in overrides:
                options.pop(key, None)
    for key in ("sampler", "batch_sampler", "shuffle"):
        if key in options:
            raise DistributedError(f"loader() chooses {key!r} itself (a DistributedSampler "
                                   "seeded with seed=); drop it from the overrides")
    try:
        data = DataLoader(dataset, batch_size=batch_size // ctx.world_size, sampler=sampler,
                          drop_last=drop_last, **options)
    except (TypeError, ValueError) as e:
        raise DistributedError(f"DataLoader refused the options {sorted(options)}: {e}") from e
    return data, sampler


# --------------------------------------------------------------------------- collectives
def reduce_mean(value: float | torch.Tensor, ctx: DistContext) -> float:
    """The mean of ``value`` over all ranks, as a float (``float(value)`` in one process).

    >>> reduce_mean(torch.tensor(2.0), setup())
    2.0
    """
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.numel() != 1:
            raise DistributedError(f"reduce_mean takes a scalar, got shape {tuple(value.shape)}")
    if not ctx.distributed:
        return float(value)
    device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    t = torch.as_tensor(value, dtype=torch.float64 if ctx.backend != "nccl" else torch.float32,
                        device=device).reshape(1).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / ctx.world_size


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself in one process): a run directory, a
    resume step, a stop decision. The object travels pickled over the process group, so
    keep it small and plain (numbers, strings, dicts).

    >>> broadcast_object({"resume_step": 40}, setup())
    {'resume_step': 40}
    """
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    device = ctx.device if ctx.backend == "nccl" else None
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


# --------------------------------------------------------------------------- failures
def _store() -> Any:
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # noqa: BLE001 - no store: fall back to torchrun's own teardown
        return None


def _failed_rank(store: Any, wait_s: float) -> str | None:
    """What the first failed rank wrote into the store, waiting up to ``wait_s`` for it."""
    if store is None:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if store.check([_FAILED_KEY]):
                return store.get(_FAILED_KEY).decode("utf-8", "replace")
        except Exception:  # noqa: BLE001 - the store went away with its host rank
            return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


@contextmanager
def guarded(ctx: DistContext, what: str = "training") -> Iterator[None]:
    """Run a block so that an exception on any rank stops every rank with that rank's error.

    In one process the block runs as is. Under torchrun an exception on rank r is recorded
    in the group's store and re-raised as ``DistributedError("rank r of N failed during
    training: <error>")`` (the original chained as ``__cause__``), so the process exits
    non-zero and torchrun stops the other ranks; a rank whose collective fails because a
    peer died (gloo: connection closed, or the ``setup`` timeout) reads the store and
    raises the failed rank's error instead of an anonymous socket error.

    >>> with guarded(ctx):  # doctest: +SKIP
    ...     train_one_epoch()
    """
    if not ctx.distributed:
        yield
        return
    try:
        yield
    except DistributedError as e:
        if getattr(e, "rank", None) is not None:
            raise
        raise _rank_error(ctx, what, e) from e
    except Exception as e:  # noqa: BLE001 - any failure on this rank ends the run
        raise _rank_error(ctx, what, e) from e


def _rank_error(ctx: DistContext, what: str, e: BaseException) -> DistributedError:
    store = _store()
    # a collective that failed because a peer died: prefer that peer's own error
    other = _failed_rank(store, wait_s=2.0 if isinstance(e, RuntimeError) else 0.0)
    if other is not None and not other.startswith(f"rank {ctx.rank} "):
        err = DistributedError(f"{other} (rank {ctx.rank} stopped: {type(e).__name__})")
        err.rank = int(other.split()[1])  # type: ignore[attr-defined]
        return err
    text = f"rank {ctx.rank} of {ctx.world_size} failed during {what}: {type(e).__name__}: {e}"
    if store is not None:
        try:
            store.compare_set(_FAILED_KEY, "", text)  # the first failure wins
        except Exception:  # noqa: BLE001 - best effort: torchrun still stops the others
            pass
    print(f"fxopt: {text}", file=sys.stderr, flush=True)
    err = DistributedError(text)
    err.rank = ctx.rank  # type: ignore[attr-defined]
    return err
