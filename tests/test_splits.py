"""Validation split and evaluation subsets: stratified, seeded, disjoint, recorded; test data only scores."""

from __future__ import annotations

import inspect
import json
import sys

import pytest
import torch

from capsbench.data import datasets as data_mod
from capsbench.data.fetch import ensure_dataset
from capsbench.data.splits import (
    VALIDATION_SIZE,
    describe,
    eval_subset,
    indices_sha256,
    stratified_sample,
    validation_split,
)
from capsbench.errors import DataError


def test_validation_split_is_stratified_disjoint_and_fixed(data_root):
    labels = ensure_dataset("mnist", root=data_root, split="train").labels
    train_idx, val_idx = validation_split(labels)
    assert val_idx.numel() == VALIDATION_SIZE and train_idx.numel() == labels.numel() - VALIDATION_SIZE
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    share = torch.bincount(labels, minlength=10).double() / labels.numel()
    got = torch.bincount(labels[val_idx], minlength=10).double()
    assert (got - share * VALIDATION_SIZE).abs().max() <= 1.0  # proportional to within rounding
    again = validation_split(labels)[1]
    assert torch.equal(val_idx, again)
    # not a prefix or a stride: spread over the whole file
    assert val_idx.min() < 1000 and val_idx.max() > labels.numel() - 1000


def test_evaluation_subset_is_a_stratified_random_sample_not_a_prefix(data_root):
    labels = ensure_dataset("mnist", root=data_root, split="test").labels
    idx = eval_subset(labels, 1000)
    assert idx.numel() == 1000 and torch.equal(idx, eval_subset(labels, 1000))
    assert not torch.equal(idx, torch.arange(1000))
    assert (idx >= 5000).sum().item() == pytest.approx(500, abs=60)  # both halves of the file
    counts = torch.bincount(labels[idx], minlength=10)
    assert (counts.double() - torch.bincount(labels, minlength=10).double() / 10).abs().max() <= 1.0
    assert eval_subset(labels, None) is None and eval_subset(labels, 10_000) is None
    rec = describe(idx, 10_000, 0, "evaluation", with_indices=True)
    assert rec["sha256"] == indices_sha256(torch.tensor(rec["indices"])) and rec["n"] == 1000


def test_other_seed_other_sample_and_bad_sizes():
    labels = torch.arange(100) % 10
    a, b = stratified_sample(labels, 20, 0, "t"), stratified_sample(labels, 20, 1, "t")
    assert not torch.equal(a, b)
    assert torch.bincount(labels[a]).tolist() == [2] * 10
    with pytest.raises(DataError, match="cannot draw 101"):
        stratified_sample(labels, 101, 0, "t")
    with pytest.raises(DataError, match="too few to hold 5000 out for validation"):
        validation_split(torch.arange(6000) % 10)


def _record_test_reads(monkeypatch) -> list[list[str]]:
    """Patch the data loader, wherever a capsbench module holds it, to record the call stack
    (function names) of every test-split read."""
    reads: list[list[str]] = []
    real = data_mod.load_dataset

    def spy(name, split, root=None):
        if split == "test":
            reads.append([f.function for f in inspect.stack()[1:40]])
        return real(name, split, root)

    holders = [m for n, m in list(sys.modules.items())
               if n.startswith("capsbench") and getattr(m, "load_dataset", None) is real]
    assert data_mod in holders
    for m in holders:
        monkeypatch.setattr(m, "load_dataset", spy)
    return reads


TRAINING_FRAMES = {"train", "_train_locked", "train_with_retry", "train_job", "_ray_train"}


def test_training_and_matching_never_read_test_data(data_root, tmp_path, monkeypatch):
    from capsbench.train.config import TrainConfig
    from capsbench.train.device import SpeedOptions
    from capsbench.train.trainer import train

    reads = _record_test_reads(monkeypatch)
    cfg = TrainConfig(model="lenet5", profile="smoke", steps=40, batch_size=32, train_limit=640,
                      match_accuracy=0.3, match_eval_every=10)
    res = train(cfg, out=tmp_path, data_root=data_root, device="cpu", progress=False, log=lambda m: None,
                speed=SpeedOptions(curve=True))
    assert reads == []
    meta = json.loads((res.job_dir / "job.json").read_text())
    assert meta["split"]["validation"]["n"] == VALIDATION_SIZE and meta["split"]["train_images"] == 640
    assert meta["match_val_accuracy"] is not None and meta["match_tolerance"] == 0.001


def test_a_suite_run_reads_test_data_only_to_score_cells(data_root, tmp_path, monkeypatch):
    from capsbench.evaluation.run import run_suite

    reads = _record_test_reads(monkeypatch)
    run_dir = run_suite("affnist", models=["lenet5"], seeds=1, profile="smoke", device="cpu", out=tmp_path,
                        data_root=data_root, match_accuracy=0.5, progress=False, log=lambda m: None)
    assert reads, "the cells were scored without reading the test set?"
    for stack in reads:
        assert not TRAINING_FRAMES & set(stack), stack
    meta = json.loads((run_dir / "run.json").read_text())
    ev = meta["splits"]["evaluation"]
    assert ev["n"] == 256 and len(ev["indices"]) == 256 and ev["indices"] != list(range(256))
    assert meta["suite"]["cells"][1]["eval_data"] == "affnist_synth"  # the generated stand-in, named
    assert meta["seeds_per_model"] == {"lenet5": 1} and meta["match_tolerance"] == 0.001
    # scoring a cell again from the record alone: the rows' accuracy from the indices in run.json
    import pandas as pd

    from capsbench.data.transforms import random_place
    from capsbench.train.config import TrainConfig
    from capsbench.train.device import predict, to_float
    from capsbench.train.jobs import load_finished

    rows = pd.read_csv(run_dir / "results.csv")
    acc = rows[(rows["cell"] == "expanded_mnist") & (rows["metric"] == "accuracy")]["value"].item()
    job = meta["jobs"][0]
    model = load_finished(TrainConfig(**job["trained_config"]), tmp_path, "cpu").model
    test = ensure_dataset("mnist", root=data_root, split="test")
    idx = torch.tensor(ev["indices"])
    from capsbench.suites.base import cell_generator, get_suite

    x = random_place(to_float(test.images[idx]), 40, cell_generator(get_suite("affnist").name, "expanded_mnist"))
    again = (predict(model, x)[0].argmax(1) == test.labels[idx]).float().mean().item()
    assert again == pytest.approx(acc, abs=1e-9)
    train_rows = rows[rows["cell"] == "train"].set_index("metric")["value"]
    assert 0 < train_rows["match_val_accuracy"] <= 1
