"""Which images train, which select and which score: the validation split and evaluation subsets.

Everything that *selects* (the ``--match-accuracy`` stop, a learning curve, tuning a profile)
reads the validation split: ``VALIDATION_SIZE`` digits held out of the training set, a fixed,
seeded, class-stratified sample, the same in every profile and run. (The affNIST page holds
out part of MNIST's training digits for validation in the same way.) Test images are read for
scoring cells and nothing else.

A profile that scores fewer than all test images scores a seeded, class-stratified random
sample of them, the same for every model and seed of a run; MNIST's test set is not in random
order (its two halves come from different groups of writers), so a prefix would describe a
biased subset. Each split is recorded in run.json / job.json by :func:`describe` (size, seed,
sha256 of the sorted indices, and for evaluation subsets the indices themselves), enough to
score any cell again from the record alone.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from capsbench.errors import DataError
from capsbench.store import stable_hash

VALIDATION_SIZE = 5_000  # 1/12 of MNIST's 60,000 training digits; accuracy steps of 0.02 points
VALIDATION_SEED = 0
EVAL_SUBSET_SEED = 0
SPLIT_VERSION = 1  # bump when the sampling rule changes: the job keys change with it


def stratified_sample(labels: torch.Tensor, n: int, seed: int, tag: str) -> torch.Tensor:
    """Sorted indices of ``n`` of ``labels``' items, each class in proportion to its share.

    Class quotas are the proportional shares rounded by largest remainder (ties to the smaller
    class label); within a class the items are a uniform random draw from a generator seeded
    by (tag, seed), so the same call gives the same indices on every machine.
    """
    labels = labels.long().cpu()
    total = labels.numel()
    if not 0 < n <= total:
        raise DataError(f"cannot draw {n} of {total} items for the {tag} split")
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * n / total
    quota = exact.floor().long()
    short = n - int(quota.sum())
    if short:
        order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - quota[i]).item(), i))
        for i in order[:short]:
            quota[i] += 1
    g = torch.Generator()
    g.manual_seed(int(stable_hash(["split", tag, seed, SPLIT_VERSION], 15), 16))
    picked = []
    for c, k in zip(classes.tolist(), quota.tolist(), strict=True):
        members = torch.nonzero(labels == c).squeeze(1)
        picked.append(members[torch.randperm(members.numel(), generator=g)[:k]])
    return torch.cat(picked).sort().values


def validation_split(labels: torch.Tensor, size: int = VALIDATION_SIZE,
                     seed: int = VALIDATION_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices) of a training set with these ``labels``.

    Raises a :class:`DataError` naming the fix when the set is too small to hold ``size``
    digits out and still train on at least as many.
    """
    total = labels.numel()
    if total < 2 * size:
        raise DataError(f"the training set has {total} images, too few to hold {size} out for validation and "
                        f"train on the rest; point the data root at the full training set (60,000 images)")
    val = stratified_sample(labels, size, seed, "validation")
    keep = torch.ones(total, dtype=torch.bool)
    keep[val] = False
    return torch.nonzero(keep).squeeze(1), val


def eval_subset(labels: torch.Tensor, n: int | None, seed: int = EVAL_SUBSET_SEED) -> torch.Tensor | None:
    """Indices of the test images a cell scores: all of them (None) when ``n`` is None or covers
    the set, else a seeded, class-stratified random sample of ``n``."""
    if n is None or n >= labels.numel():
        return None
    return stratified_sample(labels, n, seed, "evaluation")


def indices_sha256(idx: torch.Tensor) -> str:
    """sha256 of the sorted indices as little-endian int64: the split's fingerprint."""
    data = idx.long().sort().values.numpy().astype("<i8").tobytes()
    return hashlib.sha256(data).hexdigest()


def describe(idx: torch.Tensor | None, of: int, seed: int, kind: str,
             with_indices: bool = False) -> dict[str, Any]:
    """A JSON-able record of a split of ``of`` items (``idx`` None: all of them)."""
    if idx is None:
        return {"kind": kind, "n": of, "of": of, "seed": None, "rule": "all images"}
    out: dict[str, Any] = {
        "kind": kind, "n": int(idx.numel()), "of": of, "seed": seed, "version": SPLIT_VERSION,
        "rule": "class-stratified random sample (capsbench.data.splits.stratified_sample)",
        "sha256": indices_sha256(idx),
    }
    if with_indices:
        out["indices"] = [int(i) for i in idx.tolist()]
    return out


__all__ = [
    "VALIDATION_SIZE", "VALIDATION_SEED", "EVAL_SUBSET_SEED", "stratified_sample", "validation_split",
    "eval_subset", "indices_sha256", "describe",
]
