"""The affNIST suite (paper Section 5.2) and the generated affNIST-style test set.

The paper trains on MNIST digits placed at random on a 40x40 canvas and tests on affNIST
(Tieleman 2013): each MNIST test digit under 32 random affine transforms, 40x40. With the
real ``.mat`` files under ``<data root>/affNIST/`` they are used. Without them we generate a
documented stand-in, labelled ``eval_data=affnist_synth`` everywhere: for each of 32 draws t
and each MNIST test digit, a random affine (rotation within +-20 deg, x-shear within +-0.2,
scale 0.8-1.2 on each axis independently) followed by a translation that keeps the digit's
ink inside the canvas (``transforms.affnist_like``). Draw t uses a generator seeded by
(seed, t), and image k of the set is draw ``k // 10000`` of test digit ``k % 10000``. Each draw
is cached as a uint8 tensor under ``<out>/cache/affnist_synth/<hash of the parameters>/``.

A profile that scores fewer images than the whole set scores a seeded, class-stratified random
sample (``capsbench.data.splits``): of the real set's 320,000 images; of the generated set, draw 0 of
the run's sampled test digits (each digit under its own random transform, so a random sample of
the generated distribution, at the cost of one draw instead of 32).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from capsbench.data import transforms as T
from capsbench.data.affnist import load_affnist_test
from capsbench.data.fetch import ensure_dataset
from capsbench.data.splits import EVAL_SUBSET_SEED, eval_subset
from capsbench.data.splits import describe as describe_split
from capsbench.store import atomic_torch_save, stable_hash
from capsbench.suites.base import PAPER_CLAIM_MODELS, SUITES, Cell, Suite, _identity

log = logging.getLogger(__name__)

SYNTH_PARAMS = {
    "version": 1,
    "draws": 32,
    "canvas": 40,
    "max_rotation": 20.0,
    "max_shear": 0.2,
    "scale_range": (0.8, 1.2),
    "seed": 0,
}


def _synth_draw(test_u8: torch.Tensor, t: int, params: dict[str, Any]) -> torch.Tensor:
    g = torch.Generator()
    g.manual_seed(int(stable_hash(["affnist_synth", params["seed"], t], 15), 16))
    x = T.affnist_like(
        T.as_float_batch(test_u8),
        g,
        canvas=params["canvas"],
        max_rotation=params["max_rotation"],
        max_shear=params["max_shear"],
        scale_range=tuple(params["scale_range"]),
    )
    return (x.squeeze(1) * 255.0).round_().clamp_(0, 255).to(torch.uint8)  # (N, 40, 40)


def synthetic_affnist(
    n: int | None, cache_dir: str | os.PathLike | None, root: str | os.PathLike | None = None,
    params: dict[str, Any] | None = None, indices: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The generated set: all 320,000 images when ``n`` and ``indices`` are None; else draw 0 of
    the test digits at ``indices`` (default: the evaluation sample of ``n``, :func:`eval_subset`).

    Returns uint8 images (n, 40, 40), labels (n,) and a provenance dict.
    """
    params = dict(params or SYNTH_PARAMS)
    test = ensure_dataset("mnist", root=root, split="test")
    per_draw = test.images.shape[0]
    key = stable_hash(params, 16)
    folder = Path(cache_dir) / "affnist_synth" / key if cache_dir is not None else None
    if indices is None and n is not None:
        sample = eval_subset(test.labels, n)
        indices = None if sample is None else sample.tolist()
    if indices is not None:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        images = _cached_draw(test.images, 0, params, folder)[idx]
        return images, test.labels[idx], {"eval_data": "affnist_synth", "params": params, "key": key,
                                          "n": int(idx.numel()), "draw": 0, "digits": "the run's evaluation sample"}
    chunks = [_cached_draw(test.images, t, params, folder) for t in range(params["draws"])]
    images = torch.cat(chunks)
    labels = test.labels.repeat(len(chunks))
    return images, labels, {"eval_data": "affnist_synth", "params": params, "key": key, "n": per_draw * len(chunks)}


def _cached_draw(test_u8: torch.Tensor, t: int, params: dict[str, Any], folder: Path | None) -> torch.Tensor:
    path = folder / f"draw_{t:02d}.pt" if folder is not None else None
    if path is not None and path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception:
            pass  # a damaged cache file is regenerated
    imgs = _synth_draw(test_u8, t, params)
    if path is not None:
        atomic_torch_save(imgs, path)
    return imgs


def affnist_test(
    n: int | None, cache_dir: str | os.PathLike | None, root: str | os.PathLike | None = None,
    indices: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The real affNIST test set when present under the data root, else the generated one; ``n``
    images as described in the module docstring (``indices``: the run's sampled test digits)."""
    real = load_affnist_test(root)
    if real is not None:
        images, labels, files = real
        prov: dict[str, Any] = {"eval_data": "affnist", "files": files}
        sample = eval_subset(labels, n)
        if sample is not None:
            images, labels = images[sample], labels[sample]
            prov["sample"] = describe_split(sample, int(real[1].numel()), EVAL_SUBSET_SEED, "evaluation")
        return images, labels, {**prov, "n": int(images.shape[0])}
    return synthetic_affnist(n, cache_dir, root, indices=indices)


def _affnist_source(ctx: dict[str, Any]):
    images, labels, prov = affnist_test(ctx["n"], ctx["cache_dir"], ctx["root"], ctx.get("indices"))
    return T.as_float_batch(images), labels, prov["eval_data"]


SUITES.add(
    "affnist",
    Suite(
        "affnist",
        "train on MNIST placed at random on a 40x40 canvas; test on affNIST (real .mat files "
        "under <root>/affNIST/, else a generated affNIST-style set, eval_data=affnist_synth) "
        "and on the expanded (randomly placed) MNIST test set",
        "mnist",
        "canvas40_random",
        (
            Cell("expanded_mnist", "random_place", {}, lambda x, y, g: T.random_place(x, 40, g),
                 eval_data="expanded_mnist_test"),
            Cell("affnist", "affine", {}, _identity, eval_data="affnist", source=_affnist_source),
        ),
        claim="affNIST: CapsNet generalises better than the CNN at matched clean accuracy "
        "(paper: 79% vs 66% at 99.22-99.23% expanded-MNIST accuracy)",
        claim_models=PAPER_CLAIM_MODELS,
    ),
)
