"""Suites end to end on real MNIST (smoke profile): rows, provenance, reuse."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from capsbench.cli.main import main
from capsbench.suites.base import ROTATION_ANGLES, get_suite, list_suites
from capsbench.train.config import TrainConfig
from capsbench.train.jobs import evaluate_clean
from capsbench.train.trainer import train

MODELS = list(get_suite("rotation").default_models)  # the README first command's models


def test_registered_suites():
    assert {"rotation", "translation", "affnist", "part_shuffle", "mnistc_affine", "fashion_rotation"} <= set(
        list_suites()
    )
    rot = get_suite("rotation")
    names = [c.name for c in rot.cells]
    assert len(names) == len(set(names)) == 1 + 2 * (len(ROTATION_ANGLES) - 1)


def test_claim_models_train_three_seeds_by_default_and_seeds_overrides():
    for name in ("rotation", "part_shuffle", "affnist"):
        suite = get_suite(name)
        assert set(suite.claim_models) == {"capsnet", "cnn_maxpool"} <= set(suite.default_models)
        assert [suite.seeds_for(m, None) for m in ("capsnet", "cnn_maxpool", "lenet5")] == [3, 3, 1]
        assert suite.seeds_for("capsnet", 2) == suite.seeds_for("lenet5", 2) == 2


@pytest.fixture(scope="module")
def rotation_smoke(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("runs")
    rc = main(["run", "--suite", "rotation", "--profile", "smoke", "--seeds", "1", "--out", str(out),
               "--data-root", str(data_root), "--device", "cpu", "--no-progress", "--no-report"])
    assert rc == 0
    return out


def test_rotation_smoke_rows(rotation_smoke, data_root):
    run_dir = rotation_smoke / "rotation-smoke"
    df = pd.read_csv(run_dir / "results.csv")
    assert not df["error"].dropna().astype(str).str.len().gt(0).any()
    cells = df[df["transform"] == "rotation"]
    for model in MODELS:
        for metric in ("accuracy", "confidence"):
            sub = cells[(cells.model == model) & (cells.metric == metric)]
            for direction in ("ccw", "cw", "mean"):
                angles = set(sub[sub.direction == direction]["angle"].astype(int))
                assert angles == set(ROTATION_ANGLES[1:]), (model, metric, direction)
            assert (sub[sub.direction == "none"]["angle"] == 0).sum() == 1
    assert cells["value"].between(0, 1).all()
    assert (cells[cells.direction != "mean"]["n"] == 256).all()
    # the mean of both directions counts both image sets, except at 180 degrees where they are one
    means = cells[cells.direction == "mean"]
    assert (means[means.angle != 180]["n"] == 512).all() and (means[means.angle == 180]["n"] == 256).all()
    for model in MODELS:  # rotating by +180 and by -180 degrees gives the same images
        at = cells[(cells.model == model) & (cells.angle == 180) & (cells.metric == "accuracy")]
        assert at["value"].nunique() == 1, at
    for col in ("run_id", "suite", "model", "seed", "train_data", "eval_data", "profile", "device",
                "git_sha", "data_sha256", "job_key"):
        assert df[col].notna().all(), col
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "finished" and meta["suite"]["name"] == "rotation"
    assert len(meta["data_checksums"]) == 4

    # The clean cell equals a plain evaluation of the same checkpoint on the same images.
    cfg = TrainConfig(model="lenet5", profile="smoke", seed=0)
    res = train(cfg, out=rotation_smoke, data_root=data_root, device="cpu", progress=False)
    assert res.reused
    plain = evaluate_clean(res, data_root=data_root, limit=256)
    row = cells[(cells.model == "lenet5") & (cells.cell == "rot0") & (cells.metric == "accuracy")]
    assert row["value"].item() == pytest.approx(plain["accuracy"], abs=1e-9)


def test_second_run_recomputes_nothing(rotation_smoke, data_root, capsys):
    results = rotation_smoke / "rotation-smoke" / "results.csv"
    before = results.read_bytes()
    rc = main(["run", "--suite", "rotation", "--profile", "smoke", "--seeds", "1", "--out", str(rotation_smoke),
               "--data-root", str(data_root), "--device", "cpu", "--no-progress", "--no-report"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("already evaluated") == len(MODELS)
    assert "reusing" not in out  # not even a checkpoint load
    assert results.read_bytes() == before


def test_part_shuffle_unchanged_metric(tmp_path, data_root):
    rc = main(["run", "--suite", "part_shuffle", "--models", "lenet5", "--profile", "smoke",
               "--out", str(tmp_path), "--data-root", str(data_root), "--device", "cpu",
               "--no-progress", "--no-report"])
    assert rc == 0
    df = pd.read_csv(tmp_path / "part_shuffle-smoke" / "results.csv")
    unchanged = df[df.metric == "unchanged"]
    assert set(unchanged.cell) == {"shuffle_k2", "shuffle_k4", "shuffle_k7", "swap_k4"}
    assert unchanged.value.between(0, 1).all()
    # per-image predictions are plain NumPy arrays, readable without torch
    with np.load(next((tmp_path / "part_shuffle-smoke" / "predictions").iterdir()) / "shuffle_k4.npz",
                 allow_pickle=False) as preds:
        assert preds["pred"].shape == preds["label"].shape == preds["conf_true"].shape == preds["conf_pred"].shape == (256,)
        assert preds["pred"].dtype == np.int16 and preds["conf_true"].dtype == np.float16


def test_unknown_suite_and_model_are_clear_errors(tmp_path, data_root, capsys):
    assert main(["run", "--suite", "rotatoin", "--out", str(tmp_path), "--data-root", str(data_root)]) == 2
    err = capsys.readouterr().err
    assert "unknown suite 'rotatoin'" in err and "rotation" in err
    assert main(["run", "--suite", "rotation", "--models", "capsnet,resnet9", "--out", str(tmp_path),
                 "--data-root", str(data_root)]) == 2
    assert "resnet9" in capsys.readouterr().err


def test_a_failing_cell_becomes_an_error_row_and_the_run_goes_on(tmp_path, data_root):
    from capsbench.evaluation.cells import evaluate_cells
    from capsbench.suites.base import Cell, Suite

    def broken(x, y, g):
        raise RuntimeError("this transform is broken")

    suite = Suite("t", "test suite", "mnist", "mnist28_shift2",
                  (Cell("bad", "x", {}, broken), Cell("good", "none", {}, lambda x, y, g: x),
                   Cell("same", "none", {}, lambda x, y, g: x.clone()),  # the images of "good" again
                   Cell("flipped", "flip", {}, lambda x, y, g: x.flip(-1))))
    res = train(TrainConfig(model="lenet5", steps=5, batch_size=16, train_limit=64), out=tmp_path,
                data_root=data_root, device="cpu", progress=False)
    from capsbench.data.datasets import load_dataset
    from capsbench.train.device import to_float

    test = load_dataset("mnist", "test", data_root)
    calls, lines = [], []
    res.model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    rows = evaluate_cells(suite, res, suite.cells, to_float(test.images[:50]), test.labels[:50], tmp_path,
                          {"model": "lenet5", "seed": 0}, torch.device("cpu"), log=lines.append)
    bad = [r for r in rows if r["cell"] == "bad"]
    assert len(bad) == 1 and "this transform is broken" in bad[0]["error"]
    assert {r["metric"] for r in rows if r["cell"] == "good"} == {"accuracy", "confidence"}
    # identical inputs are scored once (rot+180 and rot-180 in the rotation suite); the rows stay per cell
    assert sum(calls) == 100 and any("same: " in ln and "the images of good" in ln for ln in lines)
    value = {(r["cell"], r["metric"]): r["value"] for r in rows}
    assert value["same", "accuracy"] == value["good", "accuracy"] and ("flipped", "accuracy") in value


def test_rows_read_back_from_an_earlier_run_keep_their_direction_means(tmp_path, data_root):
    args = ["run", "--suite", "rotation", "--models", "lenet5", "--profile", "smoke", "--out", str(tmp_path),
            "--data-root", str(data_root), "--device", "cpu", "--no-progress", "--no-report"]
    assert main([*args, "--seeds", "1"]) == 0
    assert main([*args, "--seeds", "2"]) == 0  # seed 0 comes back from results.csv
    df = pd.read_csv(tmp_path / "rotation-smoke" / "results.csv")
    means = df[(df.direction == "mean") & (df.metric == "accuracy")]
    assert sorted(means.groupby("seed").size().to_dict().items()) == [(0, 12), (1, 12)]
