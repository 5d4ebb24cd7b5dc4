"""Training protocols: how a suite's training digits are placed (the paper's 2-pixel shifts, a
random position on the 40x40 affNIST canvas) and how its clean validation digits are shown."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from capsbench.data import transforms as T
from capsbench.registry import Registry

# --------------------------------------------------------------------------- protocols


@dataclass(frozen=True)
class Protocol:
    """What a model is trained on: input size and the batch augmentation.

    ``augment(x, generator)`` maps a (B, 1, 28, 28) float batch to the training input;
    ``clean(x)`` maps it to the un-augmented input of the same size (the clean test cell).
    """

    name: str
    input_size: int
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    clean: Callable[[torch.Tensor], torch.Tensor]
    description: str


PROTOCOLS: Registry = Registry("training protocol")
PROTOCOLS.add(
    "mnist28_shift2",
    Protocol(
        "mnist28_shift2",
        28,
        lambda x, g: T.random_shift(x, 2, g),
        lambda x: x,
        "28x28 digits shifted by up to 2 px in each axis, zero padding (the paper's)",
    ),
)
PROTOCOLS.add(
    "canvas40_jitter2",
    Protocol(
        "canvas40_jitter2",
        40,
        lambda x, g: T.jitter_on_canvas(x, 40, 2, g),
        lambda x: T.place_on_canvas(x, 40),
        "digits centred on a 40x40 canvas, shifted by up to 2 px",
    ),
)
PROTOCOLS.add(
    "canvas40_random",
    Protocol(
        "canvas40_random",
        40,
        lambda x, g: T.random_place(x, 40, g),
        lambda x: T.place_on_canvas(x, 40),
        "digits at a uniformly random position on a 40x40 canvas (the paper's affNIST training)",
    ),
)
