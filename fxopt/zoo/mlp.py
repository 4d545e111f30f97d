"""The zoo's plain multilayer perceptron.

Example:
    >>> from fxopt.zoo.mlp import MLP
    >>> MLP()(torch.randn(4, 64)).shape
    torch.Size([4, 10])
"""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """A plain multilayer perceptron: Linear/ReLU/Dropout/Linear/GELU/Dropout/Linear."""

    def __init__(self, features: int = 64, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
