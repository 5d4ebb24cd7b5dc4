"""Training protocols: how a suite's training digits are placed (the paper's 2-pixel shifts, a
random position on the 40x40 affNIST canvas) and how its clean validation digits are shown.

A protocol name may carry an augmentation: ``mnist28_shift2+rot180`` trains on digits first
turned by an angle uniform in [-180, 180] degrees, then placed as ``mnist28_shift2`` places them
(``+rotN``, N a whole number of degrees from 1 to 180). The name is part of every job's key, so
the range is recorded. In a suite run the same thing is asked for per model, ``capsnet@rot180``
(:func:`split_entry`): the model trained on rotated digits, scored on the suite's cells beside
the models trained upright.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from capsbench.data import transforms as T
from capsbench.errors import ConfigError
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


AUGMENTATIONS = "rotN: random rotations uniform in [-N, N] degrees, N from 1 to 180 (e.g. rot180, rot45)"
_ROT = re.compile(r"rot(\d+)")


def parse_augmentation(aug: str, where: str) -> int:
    """The range N of a ``rotN`` augmentation; a clear ConfigError naming ``where`` otherwise."""
    m = _ROT.fullmatch(aug)
    if m is None or not 1 <= int(m.group(1)) <= 180 or m.group(1) != str(int(m.group(1))):
        raise ConfigError(f"{where}: unknown training augmentation {aug!r}; known: {AUGMENTATIONS}")
    return int(m.group(1))


def _rotated(base: Protocol, name: str, degrees: int) -> Protocol:
    return Protocol(
        name,
        base.input_size,
        lambda x, g: base.augment(T.random_rotate(x, degrees, g), g),
        base.clean,
        f"{base.description}, after a random rotation uniform in [-{degrees}, {degrees}] degrees",
    )


class _Protocols(Registry):
    """The protocol registry; ``base+rotN`` names are built from ``base`` on first use."""

    def get(self, name: str) -> Protocol:
        if name not in self._items:
            base, _, aug = str(name).partition("+")  # base == name (no "+") is registered or fails here
            if base not in self._items:
                raise ConfigError(f"unknown training protocol {name!r}; known training protocols: {', '.join(self)} "
                                  "(each may take an augmentation, e.g. mnist28_shift2+rot180)")
            degrees = parse_augmentation(aug, f"protocol {name!r}")
            self.add(name, _rotated(super().get(base), name, degrees), augmented=True)
        return super().get(name)

    def __iter__(self):  # listing shows the registered protocols, not the augmented ones built so far
        return iter(sorted(n for n in self._items if not self._meta[n].get("augmented")))


def split_entry(entry: str) -> tuple[str, str | None]:
    """A suite run's model entry as (model, augmentation): ``"capsnet@rot180"`` -> ("capsnet",
    "rot180"); ``"capsnet"`` -> ("capsnet", None). A bad augmentation stops in one line."""
    model, sep, aug = entry.rpartition("@")
    if not sep:
        return entry, None
    if not model:
        raise ConfigError(f"model {entry!r}: write a model trained with an augmentation as MODEL@AUG, e.g. capsnet@rot180")
    parse_augmentation(aug, f"model {entry!r}")
    return model, aug


def entry_protocol(protocol: str, entry: str) -> str:
    """The protocol a suite entry trains on: the suite's, plus the entry's augmentation."""
    aug = split_entry(entry)[1]
    return protocol if aug is None else f"{protocol}+{aug}"


PROTOCOLS: Registry = _Protocols("training protocol")
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
