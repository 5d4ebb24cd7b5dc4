"""Rotation-augmented training: ``+rotN`` protocols, ``MODEL@rotN`` suite entries, their job
keys, and one clear line for a typo."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from capsbench import ConfigError
from capsbench.cli.main import main
from capsbench.data import transforms as T
from capsbench.report.claims import Claim, equivalence_verdict, evaluate_claim, list_claims
from capsbench.report.load import load_runs
from capsbench.train.config import TrainConfig
from capsbench.train.profiles import get_profile
from capsbench.train.protocols import PROTOCOLS, entry_protocol, split_entry


def test_random_rotate_draws_angles_within_the_range():
    x = torch.zeros(200, 1, 28, 28)
    x[:, :, 2:6, 12:16] = 1.0  # a blob above the centre: where it lands gives the angle
    out = T.random_rotate(x, 30, torch.Generator().manual_seed(0))
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    w = out[:, 0].sum((1, 2))
    cy, cx = (out[:, 0] * ys).sum((1, 2)) / w - 13.5, (out[:, 0] * xs).sum((1, 2)) / w - 13.5
    angle = torch.rad2deg(torch.atan2(-cx, -cy))  # counter-clockwise on screen is positive
    assert angle.abs().max() <= 30.5 and angle.min() < -20 and angle.max() > 20
    again = T.random_rotate(x, 30, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, out)  # the seed decides the angles


def test_rot_protocols_rotate_then_place_and_keep_the_clean_view():
    base = PROTOCOLS.get("mnist28_shift2")
    rot = PROTOCOLS.get("mnist28_shift2+rot180")
    assert rot.input_size == 28 and "[-180, 180]" in rot.description
    x = torch.rand(16, 1, 28, 28)
    assert torch.equal(rot.clean(x), base.clean(x))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert not torch.allclose(rot.augment(x, g1), base.augment(x, g2))
    assert "mnist28_shift2+rot180" not in list(PROTOCOLS)  # listing shows the registered ones only
    assert PROTOCOLS.get("canvas40_random+rot45").input_size == 40


@pytest.mark.parametrize("name", ["mnist28_shift2+rot0", "mnist28_shift2+rot181", "mnist28_shift2+rot07",
                                  "mnist28_shift2+rotate", "mnist28_shift+rot90"])
def test_a_bad_protocol_name_is_one_line(name):
    with pytest.raises(ConfigError) as e:
        PROTOCOLS.get(name)
    assert "\n" not in str(e.value) and ("rotN" in str(e.value) or "known training protocols" in str(e.value))


def test_entries_and_job_keys():
    assert split_entry("capsnet@rot180") == ("capsnet", "rot180")
    assert split_entry("capsnet") == ("capsnet", None)
    assert entry_protocol("mnist28_shift2", "lenet5@rot90") == "mnist28_shift2+rot90"
    for bad in ("capsnet@rot", "@rot90", "capsnet@flip"):
        with pytest.raises(ConfigError):
            split_entry(bad)
    keys = {TrainConfig(model="lenet5", protocol=p).key
            for p in ("mnist28_shift2", "mnist28_shift2+rot90", "mnist28_shift2+rot180")}
    assert len(keys) == 3  # the range is part of the job's key
    quick = get_profile("quick")  # the same step budget as the base protocol
    assert quick.steps_for("capsnet", 55_000, "canvas40_random+rot30") == quick.steps_for("capsnet", 55_000, "canvas40_random")


@pytest.fixture(scope="module")
def upright_and_rotated(tmp_path_factory, data_root):
    """A smoke rotation run of LeNet-5 trained upright and on rotations, 2 seeds each."""
    out = tmp_path_factory.mktemp("aug")
    rc = main(["run", "--suite", "rotation", "--models", "lenet5,lenet5@rot180", "--profile", "smoke",
               "--seeds", "2", "--out", str(out), "--data-root", str(data_root), "--no-report"])
    assert rc == 0
    return out


def test_a_suite_scores_a_model_trained_upright_and_on_rotations(upright_and_rotated):
    out = upright_and_rotated
    rows = pd.read_csv(out / "rotation-smoke" / "results.csv")
    assert set(rows["model"]) == {"lenet5", "lenet5@rot180"}
    assert set(rows.loc[rows["model"] == "lenet5@rot180", "train_data"]) == {"mnist:mnist28_shift2+rot180"}
    jobs = sorted(p.name for p in (out / "jobs").iterdir())
    assert len(jobs) == 4 and sum("+rot180" in j for j in jobs) == 2
    job = json.loads(next((out / "jobs").glob("*+rot180*/job.json")).read_text())
    assert job["config"]["model"] == "lenet5" and job["config"]["protocol"] == "mnist28_shift2+rot180"


def test_claims_about_further_baselines(upright_and_rotated):
    run = load_runs([upright_and_rotated / "rotation-smoke"])
    aug = Claim("aug", "trained on rotations beats upright", ("rotation",), "lenet5@rot180", "lenet5",
                cells="rotations", optional=True)
    (v,) = evaluate_claim(aug, run)
    assert np.isfinite(v.difference) and v.n_seeds == 2 and v.verdict != "not evaluated"
    eq = Claim("eq", "as robust", ("rotation",), "lenet5@rot180", "lenet5", cells="rotations",
               clean_check=False, equivalence=True, optional=True)
    (w,) = evaluate_claim(eq, run)
    assert w.difference == v.difference and w.verdict == equivalence_verdict(w.ci_low, w.ci_high, 2)
    # an optional claim whose models the run lacks is left out, not 'not evaluated'
    assert evaluate_claim(Claim("x", "s", ("rotation",), "capsnet", "lenet5", optional=True), run) == []
    (n,) = evaluate_claim(Claim("y", "s", ("rotation",), "capsnet", "lenet5"), run)
    assert n.verdict == "not evaluated"
    names = {c.name for c in list_claims()}
    assert {"equivariant CNN", "augmentation", "Efficient-CapsNet", "EM capsules"} <= names


def test_the_equivalence_verdict():
    assert equivalence_verdict(-0.004, 0.009, 3) == "supported"
    assert equivalence_verdict(0.012, 0.03, 3) == "refuted"
    assert equivalence_verdict(-0.05, -0.011, 3) == "refuted"
    assert equivalence_verdict(-0.005, 0.02, 3) == "inconclusive"
    assert equivalence_verdict(-0.004, 0.009, 1) == "inconclusive"


def test_a_typo_in_an_entry_is_one_line(tmp_path, capsys, data_root):
    rc = main(["run", "--suite", "rotation", "--models", "lenet5@rott90", "--profile", "smoke",
               "--out", str(tmp_path), "--data-root", str(data_root)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "rotN" in err[0], err


def test_the_report_shows_both_trainings_of_one_model(upright_and_rotated, tmp_path):
    from capsbench.report.build import write_report

    write_report([upright_and_rotated / "rotation-smoke"], tmp_path / "report")
    board = pd.read_csv(tmp_path / "report" / "leaderboard.csv").set_index("model")
    assert set(board.index) == {"lenet5", "lenet5@rot180"}
    assert board.loc["lenet5@rot180", "family"] == "cnn"  # looked up by the model, not the entry
    assert board.loc["lenet5@rot180", "gflops_per_image"] == board.loc["lenet5", "gflops_per_image"] > 0
    assert board["train_time_s"].notna().all()  # each entry's own jobs (run.json names them by entry)
    jobs = json.loads((upright_and_rotated / "rotation-smoke" / "run.json").read_text())["jobs"]
    assert sorted(j["model"] for j in jobs) == ["lenet5", "lenet5", "lenet5@rot180", "lenet5@rot180"]
    assert any("rotation" in p.name for p in (tmp_path / "report" / "figures").glob("*.png"))


def test_list_protocols_names_the_augmentation(capsys):
    assert main(["list", "protocols"]) == 0
    out = capsys.readouterr().out
    assert "mnist28_shift2 " in out and "PROTOCOL+rotN" in out and "MODEL@rotN" in out
