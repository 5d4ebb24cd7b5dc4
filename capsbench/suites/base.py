"""Robustness suites: what each model is trained on and which test cells it is scored on.

A suite is data (a frozen dataclass): the training data set and protocol, and a list of
cells. A cell is a named, seeded transform of the test set with its grid parameters. Every
model and seed sees exactly the same transformed test images (the cell's generator is
seeded by the suite and cell, never by the model), so comparisons between models are paired.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from capsbench.data import mnistc
from capsbench.data import transforms as T
from capsbench.registry import Registry
from capsbench.store import stable_hash

SUITES: Registry = Registry("suite")
CLAIM_SEEDS = 3
PAPER_CLAIM_MODELS = ("capsnet", "cnn_maxpool")

# A cell maker gets the clean (N, 1, 28, 28) float test images, their labels and a seeded
# generator, and returns the inputs the model sees (and the labels, which may be replaced).
CellFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Cell:
    """One evaluation condition.

    Attributes:
        name: unique within the suite, e.g. ``rot+45``.
        transform: short transform family name (``rotation``, ``shift``, ...).
        params: grid parameters, written as columns of the result rows.
        make: builds the model inputs from the clean test batch.
        eval_data: what the inputs are (``test``: the suite's test set; ``expanded_mnist_test``,
            ``mnistc_reimpl_test``, ``affnist``: the real set, replaced by ``affnist_synth`` in
            rows and run.json when the generated stand-in is scored).
        reference: name of the cell whose predictions count as "unchanged" (part-shuffle).
        source: for cells with their own test data, see below.
    """

    name: str
    transform: str
    params: dict[str, Any]
    make: CellFn
    eval_data: str = "test"
    reference: str | None = None
    # A cell with its own test data (affNIST): source(ctx) -> (inputs, labels, eval_data),
    # ctx = {"n", "cache_dir", "root"}. ``make`` is then not used.
    source: Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor, str]] | None = None


@dataclass(frozen=True)
class Suite:
    """A robustness experiment.

    Attributes:
        name: registry name.
        description: one line for ``capsbench list suites``.
        dataset: training and test data set.
        protocol: training protocol (see ``capsbench list protocols``).
        cells: the evaluation grid.
        metrics: which metrics each cell reports.
        claim: the claim this suite tests, for reports.
    """

    name: str
    description: str
    dataset: str
    protocol: str
    cells: tuple[Cell, ...]
    metrics: tuple[str, ...] = ("accuracy", "confidence")
    claim: str = ""
    # The claim's two models and LeNet-5 (a small CNN, 10 s on two cores). EfficientNet-B0 is one
    # --models away (about 140 s more on two cores): left out so that the README's first command,
    # its 3-seed verdict included, stays near 20 minutes on an AVX2-only 2-core CPU (docs/performance.md).
    default_models: tuple[str, ...] = ("capsnet", "lenet5", "cnn_maxpool")
    extra: dict[str, Any] = field(default_factory=dict)
    # The two models the suite's claim compares: without --seeds they train CLAIM_SEEDS seeds
    # (a verdict needs seed-to-seed variance), the other models one.
    claim_models: tuple[str, ...] = ()

    def seeds_for(self, model: str, seeds: int | None) -> int:
        """Seeds of ``model`` in a run: ``seeds`` when given, else the default above."""
        if seeds is not None:
            return seeds
        return CLAIM_SEEDS if model in self.claim_models else 1

    def cell(self, name: str) -> Cell:
        for c in self.cells:
            if c.name == name:
                return c
        raise KeyError(name)

    def describe(self, eval_data: Callable[[Cell], str] | None = None) -> dict[str, Any]:
        """A JSON-able description for run.json (cell makers are code, not data); ``eval_data``
        names what a cell is scored on in this run (default: the cell's own label)."""
        name = eval_data or (lambda c: c.eval_data)
        return {
            "name": self.name,
            "description": self.description,
            "dataset": self.dataset,
            "protocol": self.protocol,
            "metrics": list(self.metrics),
            "claim": self.claim,
            "claim_models": list(self.claim_models),
            "cells": [{"name": c.name, "transform": c.transform, "params": c.params, "eval_data": name(c)}
                      for c in self.cells],
        }


def cell_generator(suite: str, cell: str, seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(stable_hash(["cell", suite, cell, seed], 15), 16))
    return g


def _identity(x, y, g):
    return x


# --------------------------------------------------------------------------- rotation

ROTATION_ANGLES = tuple(range(0, 181, 15))


def _rotation_cells() -> tuple[Cell, ...]:
    cells = [Cell("rot0", "rotation", {"angle": 0, "direction": "none"}, _identity)]
    for a in ROTATION_ANGLES[1:]:
        for sign, direction in ((1, "ccw"), (-1, "cw")):
            deg = sign * a
            cells.append(
                Cell(
                    f"rot{deg:+d}",
                    "rotation",
                    {"angle": a, "direction": direction},
                    lambda x, y, g, d=deg: T.rotate(x, float(d)),
                )
            )
    return tuple(cells)


SUITES.add(
    "rotation",
    Suite(
        "rotation",
        "train on upright 28x28 MNIST (shifts <= 2 px); test rotated 0..180 deg in 15 deg steps, "
        "both directions (bilinear, zero fill, about the centre)",
        "mnist",
        "mnist28_shift2",
        _rotation_cells(),
        claim="orientation: CapsNet is more accurate than the pooling CNN on rotated digits",
        claim_models=PAPER_CLAIM_MODELS,
    ),
)
SUITES.add(
    "fashion_rotation",
    Suite(
        "fashion_rotation",
        "the rotation suite on Fashion-MNIST",
        "fashion_mnist",
        "mnist28_shift2",
        _rotation_cells(),
        claim="orientation (Fashion-MNIST)",
    ),
)

# --------------------------------------------------------------------------- translation

TRANSLATION_SHIFTS = tuple(range(-6, 7, 2))


def _translation_cells() -> tuple[Cell, ...]:
    cells = []
    for dy in TRANSLATION_SHIFTS:
        for dx in TRANSLATION_SHIFTS:
            cells.append(
                Cell(
                    f"dx{dx:+d}_dy{dy:+d}",
                    "shift",
                    {"dx": dx, "dy": dy},
                    lambda x, y, g, dx=dx, dy=dy: T.place_on_canvas(x, 40, dx, dy),
                )
            )
    return tuple(cells)


SUITES.add(
    "translation",
    Suite(
        "translation",
        "train on digits centred on a 40x40 canvas (jitter <= 2 px); test shifted by (dx, dy) "
        "in -6..6 px (step 2) in both axes",
        "mnist",
        "canvas40_jitter2",
        _translation_cells(),
        claim="translation: CapsNet keeps its accuracy further from the training positions",
    ),
)

# --------------------------------------------------------------------------- part shuffle


def _part_shuffle_cells() -> tuple[Cell, ...]:
    cells = [Cell("clean", "none", {"k": 1}, _identity)]
    for k in (2, 4, 7):
        cells.append(
            Cell(f"shuffle_k{k}", "part_shuffle", {"k": k}, lambda x, y, g, k=k: T.part_shuffle(x, k, g),
                 reference="clean")
        )
    cells.append(Cell("swap_k4", "tile_swap", {"k": 4}, lambda x, y, g: T.tile_swap(x, 4, g), reference="clean"))
    return tuple(cells)


SUITES.add(
    "part_shuffle",
    Suite(
        "part_shuffle",
        "cut each test digit into k x k tiles (k = 2, 4, 7) and derange them; a swap cell "
        "exchanges two of 4x4 tiles; reports accuracy, true-class confidence and unchanged predictions",
        "mnist",
        "mnist28_shift2",
        _part_shuffle_cells(),
        metrics=("accuracy", "confidence", "unchanged"),
        claim="pooling: the pooling CNN keeps its prediction on shuffled parts more often than CapsNet",
        claim_models=PAPER_CLAIM_MODELS,
    ),
)

# --------------------------------------------------------------------------- MNIST-C affine


def _mnistc_cells() -> tuple[Cell, ...]:
    cells = [Cell("clean", "none", {"severity": 0}, _identity)]
    for name, fn in mnistc.MNISTC_AFFINE.items():
        sev = mnistc.MNISTC_DEFAULT_SEVERITY[name]
        short = name.replace("mnistc_", "")
        cells.append(
            Cell(short, short, {"severity": sev}, lambda x, y, g, fn=fn, sev=sev: fn(x, sev, g),
                 eval_data="mnistc_reimpl_test")
        )
    return tuple(cells)


SUITES.add(
    "mnistc_affine",
    Suite(
        "mnistc_affine",
        "our re-implementation of MNIST-C's affine corruptions (scale, shear, rotate, translate) at its "
        "published severities, applied to the MNIST test digits (eval_data mnistc_reimpl_test; not the "
        "MNIST-C files)",
        "mnist",
        "mnist28_shift2",
        _mnistc_cells(),
        claim="affine corruptions (MNIST-C, Mu & Gilmer 2019)",
    ),
)


def list_suites() -> list[str]:
    return SUITES.names()


def get_suite(name: str) -> Suite:
    return SUITES.get(name)
