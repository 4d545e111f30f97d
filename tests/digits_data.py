"""Real calibration data for the CLI tests: scikit-learn's bundled 8x8 digits (no download).

``fxopt optimize tests/digits_data.py:model --calibration-data tests/digits_data.py:batches``
"""

from __future__ import annotations

import torch
from torch import nn

BATCH = 32
BATCHES = 5


def _digits() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().data, dtype=torch.float32) / 16.0  # [1797, 64] in [0, 1]


def model() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A small classifier over the 64 digit pixels, with the first digit as example input."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    return net, (_digits()[:1],)


def batches() -> list[torch.Tensor]:
    """``BATCHES`` batches of ``BATCH`` real digits (one tensor per batch)."""
    data = _digits()
    return [data[i * BATCH : (i + 1) * BATCH] for i in range(BATCHES)]


def tuple_batches():
    """The same batches as 1-tuples, from a generator (a DataLoader-like one-shot iterable)."""
    return ((b,) for b in batches())


def wrong_width() -> list[torch.Tensor]:
    return [torch.rand(4, 64), torch.rand(4, 65)]


def wrong_count() -> list[tuple]:
    return [(torch.rand(4, 64), torch.rand(4, 64))]


def not_iterable() -> int:
    return 3


def fails() -> list:
    raise RuntimeError("dataset not mounted")


def empty() -> list:
    return []


def _labels() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().target)


def train_set():
    """Fine-tuning data for ``fxopt finetune --train-data``: 256 real digits and labels."""
    from torch.utils.data import TensorDataset

    return TensorDataset(_digits()[:256], _labels()[:256])


def val_set():
    """Held-out digits (``--val-data``): an ``(X, Y)`` pair of tensors."""
    return _digits()[1500:1628], _labels()[1500:1628]


def bad_train_set():
    """Items whose width does not fit the model (65 features, not 64)."""
    return torch.rand(16, 65), torch.zeros(16, dtype=torch.long)


def rank1_fails():
    """``train_set`` on rank 0; on torchrun's rank 1 the 'dataset' is not mounted."""
    import os

    if os.environ.get("RANK") == "1":
        raise RuntimeError("dataset not mounted on this node")
    return train_set()
