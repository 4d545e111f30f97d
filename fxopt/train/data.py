"""Training data for ``fxopt.finetune``: what a dataset item is, and how a batch splits.

An item is a tuple: its first ``n_inputs`` elements are the graph's inputs (``n_inputs``
= the number of placeholders) and an optional next element is the label. A bare tensor
is a one-input item. ``as_dataset`` accepts a ``Dataset``, an ``(X, Y)`` / ``(X,)`` pair
of tensors, or a list of item tuples::

    ds = as_dataset((images, labels), n_inputs=1)     # ds[0] == (images[0], labels[0])
    inputs, label = split_batch(next(iter(loader)), n_inputs=1)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from fxopt.errors import TrainingError


class _ListDataset(Dataset):
    def __init__(self, items: Sequence[Any]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def as_dataset(obj: Any, n_inputs: int) -> Dataset:
    """``obj`` as a map-style ``Dataset`` of item tuples (see the module docstring).

    >>> ds = as_dataset((torch.zeros(4, 2), torch.arange(4)), n_inputs=1)
    >>> len(ds), ds[1][1].item()
    (4, 1)
    """
    if isinstance(obj, Dataset) and hasattr(obj, "__len__"):
        return obj
    if isinstance(obj, torch.Tensor):
        obj = (obj,)
    if isinstance(obj, tuple) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        sizes = {int(t.shape[0]) if t.dim() else -1 for t in obj}
        if len(sizes) != 1 or -1 in sizes:
            shapes = ", ".join(str(tuple(t.shape)) for t in obj)
            pair = "X, Y" if len(obj) > 1 else "X"
            raise TrainingError(f"training data: the tensors of an ({pair}) pair must share "
                                f"their first (sample) dim; got shapes {shapes}")
        if len(obj) not in (n_inputs, n_inputs + 1):
            raise TrainingError(f"training data: the graph takes {n_inputs} input(s), so give "
                             f"{n_inputs} tensor(s) plus an optional label tensor, not "
                             f"{len(obj)}")
        return TensorDataset(*obj)
    if isinstance(obj, (list, tuple)):
        if not obj:
            raise TrainingError("training data is empty: give at least one item")
        return _ListDataset(obj)
    raise TrainingError(f"training data must be a torch Dataset, an (X, Y) pair of tensors or "
                     f"a list of item tuples, not {type(obj).__name__}; an iterable-style "
                     "stream can be materialised with list(...)")


def split_batch(batch: Any, n_inputs: int) -> tuple[tuple, Any]:
    """``(inputs, label or None)`` of a collated batch; ``TrainingError`` when the batch does
    not have ``n_inputs`` or ``n_inputs + 1`` elements.

    >>> split_batch((torch.zeros(2, 3), torch.tensor([0, 1])), 1)[1].tolist()
    [0, 1]
    """
    if isinstance(batch, torch.Tensor):
        batch = (batch,)
    if isinstance(batch, dict) or not isinstance(batch, (list, tuple)):
        raise TrainingError(f"a training batch must be a tuple of tensors (graph inputs, then "
                         f"an optional label), not {type(batch).__name__}")
    if len(batch) == n_inputs:
        return tuple(batch), None
    if len(batch) == n_inputs + 1:
        return tuple(batch[:n_inputs]), batch[n_inputs]
    raise TrainingError(f"a training batch has {len(batch)} element(s) but the graph takes "
                     f"{n_inputs} input(s): items must be (input_1, ..., input_{n_inputs}"
                     f"[, label]); reorder or wrap the dataset")


def input_specs(gm: Any, example_inputs: tuple) -> list[dict]:
    """Per graph input ``{"shape": [None | int, ...], "dtype": str}``: from the capture's
    record (``gm.meta["fxopt"]["inputs"]``, dynamic dims are None) or else the example
    inputs with a dynamic batch dim."""
    specs = getattr(gm, "meta", {}).get("fxopt", {}).get("inputs")
    if specs and len(specs) == len(example_inputs):
        return [dict(s) for s in specs]
    return [{"shape": [None, *t.shape[1:]], "dtype": str(t.dtype).removeprefix("torch.")}
            if isinstance(t, torch.Tensor) and t.dim() else {} for t in example_inputs]


def check_inputs(inputs: tuple, specs: list[dict]) -> None:
    """``TrainingError`` when batch ``inputs`` do not fit the graph's input ``specs`` (count,
    rank, static dims, float vs integer), before any training step runs."""
    if len(inputs) != len(specs):
        raise TrainingError(f"a batch holds {len(inputs)} input(s), the graph takes {len(specs)}")
    for i, (got, spec) in enumerate(zip(inputs, specs, strict=True)):
        shape = spec.get("shape")
        if shape is None:
            continue
        wanted = "(" + ", ".join("batch" if d is None and j == 0 else "*" if d is None
                                 else str(d) for j, d in enumerate(shape)) + ")"
        if not isinstance(got, torch.Tensor):
            raise TrainingError(f"batch input {i} is a {type(got).__name__}, the graph takes a "
                             f"tensor of shape {wanted}")
        if got.dim() != len(shape) or any(d is not None and d != g
                                          for d, g in zip(shape, got.shape)):
            raise TrainingError(f"batch input {i} has shape {tuple(got.shape)}, the graph takes "
                             f"{wanted}: each item must hold one sample per graph input, "
                             "in the graph's input order")
        floating = str(spec.get("dtype", "float")).startswith(("float", "bfloat"))
        if got.is_floating_point() != floating:
            raise TrainingError(f"batch input {i} is {got.dtype}, the graph takes "
                             f"{spec.get('dtype')}")


def fingerprint(ds: Dataset, n_inputs: int) -> dict[str, Any]:
    """Which training data this is: ``{"sha256": hex, "samples": n, "labels": bool}``, the
    hash over every item's tensors (dtype, shape, bytes) in order, so the same data gives
    the same value whether it came as an ``(X, Y)`` pair, a list of tuples or a Dataset.

    >>> fingerprint(as_dataset((torch.zeros(4, 2),), 1), 1)["samples"]
    4
    """
    import hashlib

    h = hashlib.sha256()
    labels = False
    for i in range(len(ds)):
        item = ds[i]
        item = item if isinstance(item, (tuple, list)) else (item,)
        labels = labels or len(item) > n_inputs
        for x in item:
            if isinstance(x, torch.Tensor):
                x = x.detach().cpu().contiguous()
                h.update(f"{x.dtype}{tuple(x.shape)}".encode())
                h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes()
                         if x.numel() else b"")
            else:
                h.update(repr(x).encode())
    return {"sha256": h.hexdigest(), "samples": len(ds), "labels": labels}


__all__ = ["as_dataset", "check_inputs", "fingerprint", "input_specs", "split_batch"]
