"""A plug-in package for the tests: models from outside capsbench, registered through the
``capsbench.models`` entry-point group (see capsbench_toy-0.1.dist-info/entry_points.txt; the
tests put this folder on sys.path, as an installed package would be)."""

from __future__ import annotations

import torch
from torch import nn


class ToyCNN(nn.Module):
    """A plain module that returns logits: no capsbench base class, no loss, no ModelOutput."""

    def __init__(self, input_size: int = 28, width: int = 8) -> None:
        super().__init__()
        self.input_size = input_size
        self.conv = nn.Conv2d(1, width, 5, stride=2)
        self.head = nn.Linear(width * ((input_size - 5) // 2 + 1) ** 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


def toy_cnn(input_size: int = 28) -> nn.Module:
    return ToyCNN(input_size)


def toy_wide(input_size: int = 28) -> nn.Module:
    """Registered by ``--models capsbench_toy:toy_wide`` (no entry point)."""
    return ToyCNN(input_size, width=16)


def toy_raises(input_size: int = 28) -> nn.Module:
    raise RuntimeError("the toy factory failed on purpose")


def toy_not_a_module(input_size: int = 28):
    return "a string"


class _ThreeClasses(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :3]


def toy_wrong_output(input_size: int = 28) -> nn.Module:
    return _ThreeClasses()


def toy_fixed_size() -> nn.Module:
    """Takes no input_size: 28x28 only."""
    return ToyCNN(28)



class _FailsAfterFirstCell(ToyCNN):
    """Trains, scores its first cell, then raises on every later scoring batch: real failing cells."""

    def __init__(self, input_size: int = 28) -> None:
        super().__init__(input_size)
        self.scored_batches = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and x.shape[0] > 2:  # a scoring batch, not the load-time check's two images
            self.scored_batches += 1
            if self.scored_batches > 1:
                raise RuntimeError("the toy model fails on this cell on purpose")
        return super().forward(x)


def toy_fails_late(input_size: int = 28) -> nn.Module:
    return _FailsAfterFirstCell(input_size)
