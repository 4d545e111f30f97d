"""Tiny real data and models for the recovery-training tests: scikit-learn's bundled 8x8
digits (no download), a small MLP and CNN trained for a few steps."""

from __future__ import annotations

import functools

import torch
from torch import nn


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)


def digits(start: int = 0, stop: int = 256, image: bool = False):
    """``(X, Y)`` for digits ``start:stop``; ``image`` gives ``X`` as ``(n, 1, 8, 8)``."""
    x, y = _digits()
    x = x[start:stop]
    return (x.reshape(-1, 1, 8, 8) if image else x), y[start:stop]


def mlp(hidden: int = 32, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(64, hidden), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(hidden, 10)).eval()


def cnn(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()


def trained(model: nn.Module, data, steps: int = 60, lr: float = 0.05) -> nn.Module:
    """``model`` after ``steps`` full-batch Adam steps on ``data`` (a quick teacher)."""
    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def accuracy(module, data) -> float:
    x, y = data
    with torch.no_grad():
        return float((module(x).argmax(-1) == y).float().mean())
