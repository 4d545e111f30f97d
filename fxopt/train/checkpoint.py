"""Training checkpoints: atomic, pickle-free, resumable, tied to the graph they train.

A checkpoint is a folder ``step-00000120/`` under ``checkpoint_dir``:

* ``model.safetensors``: the trained module's state dict (``loss.safetensors``: the loss
  module's, i.e. feature projections, when it has any);
* ``state.safetensors``: every tensor of the optimizer / scheduler / grad-scaler state and
  the torch RNG states;
* ``state.json``: the rest of those states (nested dicts, lists, numbers; tensors are
  named references into ``state.safetensors``), numpy's and Python's RNG states, the
  position in the data (epoch, batches done, global step), the history so far, the
  format version and the graph's fingerprint.

The folder is written under a temporary name and renamed, so a crash leaves either the
whole checkpoint or none (a stale temporary folder is ignored and cleaned up). Nothing is
unpickled when loading. ``best/`` holds the best-metric checkpoint.

Example::

    path = save(ckpt_dir, "step-00000120", module=gm, optimizer=opt, position=pos,
                fingerprint=graph_fingerprint(gm))
    state = load(latest(ckpt_dir), module=gm, optimizer=opt,
                 fingerprint=graph_fingerprint(gm))
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fxopt.errors import CheckpointError

FORMAT = "fxopt-train-checkpoint"
VERSION = 1
PREFIX = "step-"


# --------------------------------------------------------------------------- encoding
def encode(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """``obj`` as JSON, its tensors moved into ``tensors`` under names from ``key``.

    >>> t = {}; encode({"step": torch.tensor(3.0), 1: (0.9, 0.99)}, t, "opt")
    {'__dict__': [['step', {'__tensor__': 'opt.step'}], [1, {'__tuple__': [0.9, 0.99]}]]}
    """
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") for k in obj):
            return {k: encode(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        return {"__dict__": [[k, encode(v, tensors, f"{key}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot write a {type(obj).__name__} at {key!r} into a checkpoint "
                          "without pickle; keep training state to tensors, numbers and strings")


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of ``encode``."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: decode(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: decode(v, tensors) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states, encodable."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned (after a round trip through a checkpoint)."""
    torch.set_rng_state(state["torch"].to(torch.uint8))
    np.random.set_state(tuple(state["numpy"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in state["cuda"]])


# --------------------------------------------------------------------------- identity
def graph_fingerprint(module: torch.nn.Module) -> str:
    """A hash of what a checkpoint must fit: the graph's code (for a GraphModule) and
    every state-dict entry's name, shape and dtype.

    >>> len(graph_fingerprint(torch.nn.Linear(2, 3)))
    16
    """
    h = hashlib.sha256()
    code = getattr(module, "code", None)
    h.update((code if isinstance(code, str) else type(module).__qualname__).encode())
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:16]


def _state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # clones: safetensors refuses tensors that share storage (tied weights, views)
    return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- save / load
def save(directory: str | os.PathLike, name: str, *, module: torch.nn.Module,
         fingerprint: str, optimizer=None, scheduler=None, scaler=None,
         loss_module: torch.nn.Module | None = None, position: dict | None = None,
         history: list | None = None, extra: dict | None = None,
         keep: int | None = 2) -> Path:
    """Write checkpoint ``directory/name`` atomically and return its path; with ``keep``,
    older ``step-*`` checkpoints beyond the newest ``keep`` are removed afterwards."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(_state_dict(module), str(tmp / "model.safetensors"))
        if loss_module is not None and len(loss_module.state_dict()):
            save_file(_state_dict(loss_module), str(tmp / "loss.safetensors"))
        tensors: dict[str, torch.Tensor] = {}
        states = {
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled()
            else None,
            "rng": rng_state(),
        }
        body = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint,
                "position": encode(position or {}, tensors, "position"),
                "history": encode(history or [], tensors, "history"),
                "extra": encode(extra or {}, tensors, "extra"),
                "states": encode(states, tensors, "s")}
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(body, indent=1))
        if final.exists():  # re-writing a name (best/): move the old one aside first
            old = root / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for old in checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete ``step-*`` checkpoints in ``directory``, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and (p / "state.json").is_file() and (p / "model.safetensors").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``directory``, or None."""
    found = checkpoints(directory)
    return found[-1] if found else None


def read(path: str | os.PathLike, fingerprint: str | None = None) -> dict:
    """The decoded body of checkpoint ``path`` (tensors loaded, nothing unpickled);
    ``CheckpointError`` for another format or, with ``fingerprint``, another graph."""
    path = Path(path)
    try:
        body = json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} is no training checkpoint (no state.json); "
                              "give the folder finetune(checkpoint_dir=...) wrote") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: state.json is not JSON ({e}); "
                              "delete the folder to resume from the one before") from None
    if body.get("format") != FORMAT or body.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format {body.get('format')!r} "
                              f"version {body.get('version')!r}; this fxopt reads {FORMAT!r} "
                              f"version {VERSION}")
    if fingerprint is not None and body["fingerprint"] != fingerprint:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written for another graph (fingerprint "
            f"{body['fingerprint']}, this graph's is {fingerprint}): its weights do not fit. "
            "Resume with the graph that wrote it, or use a fresh checkpoint_dir")
    tensors = load_file(str(path / "state.safetensors"))
    for key in ("states", "position", "history", "extra"):
        body[key] = decode(body[key], tensors)
    return body


def load(path: str | os.PathLike, *, module: torch.nn.Module, fingerprint: str,
         optimizer=None, scheduler=None, scaler=None,
         loss_module: torch.nn.Module | None = None, restore_rng: bool = True) -> dict:
    """Restore checkpoint ``path`` into the given objects; returns its body (position,
    history, extra). The RNG states are restored last (``restore_rng``)."""
    body = read(path, fingerprint)
    path = Path(path)
    weights = load_file(str(path / "model.safetensors"))
    _load_weights(module, weights, path)
    if loss_module is not None and (path / "loss.safetensors").is_file():
        _load_weights(loss_module, load_file(str(path / "loss.safetensors")), path)
    states = body["states"]
    if optimizer is not None and states.get("optimizer") is not None:
        optimizer.load_state_dict(states["optimizer"])
    if scheduler is not None and states.get("scheduler") is not None:
        scheduler.load_state_dict(states["scheduler"])
    if scaler is not None and states.get("scaler") is not None:
        scaler.load_state_dict(states["scaler"])
    if restore_rng:
        set_rng_state(states["rng"])
    return body


def _load_weights(module: torch.nn.Module, weights: dict, path: Path) -> None:
    own = module.state_dict()
    if set(own) != set(weights):
        missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this module (missing "
                              f"{missing[:4]}, unexpected {unexpected[:4]})")
    with torch.no_grad():
        for k, t in own.items():
            if t.shape != weights[k].shape:
                raise CheckpointError(f"checkpoint {str(path)!r}: {k} has shape "
                                      f"{tuple(weights[k].shape)}, the module {tuple(t.shape)}")
            t.copy_(weights[k])


def step_name(step: int) -> str:
    """The folder name of the checkpoint after global step ``step``.

    >>> step_name(120)
    'step-00000120'
    """
    return f"{PREFIX}{step:08d}"


__all__ = ["checkpoints", "graph_fingerprint", "latest", "load", "read", "save", "step_name"]
