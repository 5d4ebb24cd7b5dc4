"""Models and claims from outside capsbench: a real plug-in package (tests/plugins/capsbench_toy,
found through its entry points as an installed package is), ``--models pkg.module:factory``,
``--checkpoint``, the Python API, and claims as data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import capsbench
from capsbench.errors import ConfigError
from capsbench.models import registry
from capsbench.models.base import PlainClassifier

PLUGINS = Path(__file__).parent / "plugins"
REPO = Path(__file__).resolve().parents[1]
VERDICT_WORDS = {"supported", "refuted", "negligible", "inconclusive"}


@pytest.fixture
def plugins(monkeypatch):
    """The toy plug-in on sys.path (and on PYTHONPATH for the CLI), its models unregistered after."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(PLUGINS), str(REPO), os.environ.get("PYTHONPATH"))
                                                     if p))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    before = set(registry.MODELS._items)
    yield
    for name in set(registry.MODELS._items) - before:
        del registry.MODELS._items[name], registry.MODELS._meta[name]


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capsbench", *argv], capture_output=True, text=True, timeout=600)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line of a failed command (data warnings aside), with exit code 2."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("capsbench: warning")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_entry_point_models_are_listed_and_built(plugins, capsys):
    assert {"toy_cnn", "toy_raises", "toy_missing"} <= set(capsbench.list_models())
    info = capsbench.model_info("toy_cnn")
    assert info == {"source": "capsbench_toy:toy_cnn", "plugin": "capsbench-toy"}
    m = capsbench.create_model("toy_cnn", input_size=40, routing_iters=None)
    assert isinstance(m, PlainClassifier) and m.family == "cnn" and m.input_size == 40 and m.model_name == "toy_cnn"
    from capsbench.cli.main import main

    assert main(["list", "models"]) == 0
    out, err = capsys.readouterr()
    toy = next(line for line in out.splitlines() if line.startswith("toy_cnn "))
    assert "11,738" in toy and "26,138" in toy and "capsbench_toy:toy_cnn (capsbench-toy)" in toy
    assert "capsbench: warning: model 'toy_missing'" in out and "capsnet" in out  # the rest still listed


def test_module_factory_specs(plugins):
    assert registry.resolve_model("capsbench_toy:toy_wide") == "toy_wide"
    assert registry.resolve_model("capsbench_toy:toy_wide") == "toy_wide"  # registered once
    assert capsbench.create_model("toy_wide").net.conv.out_channels == 16
    for spec, needle in [("capsbench_toy:nope", "has no attribute 'nope'"),
                         ("no_such_package:f", "cannot import no_such_package: ModuleNotFoundError"),
                         ("capsbench_toy:", "write a plug-in model as pkg.module:factory"),
                         ("capsbench_toy:ToyCNN.forward.__name__", "not a factory")]:
        with pytest.raises(ConfigError, match=needle):
            registry.resolve_model(spec)


@pytest.mark.parametrize("name,needle", [
    ("toy_raises", "its factory capsbench_toy:toy_raises raised RuntimeError: the toy factory failed on purpose"),
    ("toy_missing", "entry point capsbench_toy.not_there:factory (group capsbench.models) failed to import: "
                    "ModuleNotFoundError"),
    ("toy_not_a_module", "the factory returned a str, not a torch.nn.Module"),
    ("toy_wrong_output", "forward must return (batch, 10) class scores or a ModelOutput; got (2, 3)"),
])
def test_a_model_that_breaks_the_protocol_fails_at_load_in_one_line(plugins, name, needle):
    with pytest.raises(ConfigError) as e:
        capsbench.create_model(name, input_size=28)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_model_of_one_input_size_is_refused_for_another(plugins):
    assert capsbench.create_model("toy_fixed_size", input_size=28).input_size == 28
    with pytest.raises(ConfigError, match="takes 28x28 inputs .* trains on 40x40"):
        capsbench.create_model("toy_fixed_size", input_size=40)


def test_a_broken_plugin_stops_a_run_before_any_work(plugins, data_root, tmp_path):
    proc = cli("run", "--suite", "rotation", "--profile", "smoke", "--models", "lenet5,toy_raises",
               "--out", str(tmp_path), "--data-root", str(data_root))
    assert "toy_raises" in error_line(proc) and "failed on purpose" in proc.stderr
    assert not (tmp_path / "rotation-smoke").exists() and not (tmp_path / "jobs").exists()


def test_a_plugin_model_runs_gets_a_verdict_and_a_checkpoint_is_rescored(plugins, data_root, tmp_path):
    out, root = tmp_path / "runs", str(data_root)
    proc = cli("run", "--suite", "rotation", "--profile", "smoke", "--models", "capsbench_toy:toy_wide,lenet5",
               "--seeds", "2", "--out", str(out), "--data-root", root, "--no-report", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    run_dir = out / "rotation-smoke"
    rows = capsbench.load_results(run_dir)
    cells = {c["name"] for c in json.loads((run_dir / "run.json").read_text())["suite"]["cells"]}
    for model in ("toy_wide", "lenet5"):
        got = rows[(rows["model"] == model) & (rows["metric"] == "accuracy")]
        assert set(got["cell"]) >= cells and set(got["seed"]) == {0, 1}
    jobs = json.loads((run_dir / "run.json").read_text())["jobs"]
    assert all(j.get("trained_config", {}).get("model") in ("toy_wide", "lenet5") for j in jobs)

    # the claim "toy_wide is more accurate than lenet5", posed from the command line
    proc = cli("report", str(run_dir), "-o", str(tmp_path / "rep"), "--compare", "toy_wide:lenet5")
    assert proc.returncode == 0, proc.stderr
    v = pd.read_csv(tmp_path / "rep" / "tables" / "verdicts.csv", keep_default_na=False).set_index("claim")
    mine = v.loc["toy_wide vs lenet5 (rotation)"]
    assert mine["verdict"] in VERDICT_WORDS and int(mine["seeds"]) == 2 and mine["comparison"] == "toy_wide - lenet5"
    assert "claim toy_wide vs lenet5 (rotation) (toy_wide - lenet5, accuracy): " in proc.stdout
    assert "toy_cnn" in error_line(cli("report", str(run_dir), "-o", str(tmp_path / "r2"), "--compare", "toy_cnn:lenet5"))

    # the same claim from Python, and one from a claim file: the same numbers
    claim = capsbench.Claim("mine", "toy_wide beats lenet5 on rotated digits", ("rotation",), "toy_wide", "lenet5")
    table = capsbench.verdicts([run_dir], claims=[claim]).set_index("claim")
    assert table.loc["mine", "difference"] == pytest.approx(float(mine["difference"]))
    assert table.loc["mine", "ci_low"] == pytest.approx(float(mine["ci_low"]))
    (tmp_path / "claims.json").write_text(json.dumps([{**claim.__dict__, "suites": ["rotation"]}]))
    assert capsbench.load_claims(tmp_path / "claims.json") == [claim]

    # a capsbench checkpoint scored again, without training, gives the same rows
    job = next(p for p in (out / "jobs").iterdir() if p.name.startswith("lenet5-") and "-s0-" in p.name)
    again = tmp_path / "again"
    proc = cli("run", "--suite", "rotation", "--profile", "smoke", "--models", "lenet5", "--checkpoint",
               str(job / "checkpoint.pt"), "--out", str(again), "--data-root", root, "--no-report", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    new = capsbench.load_results(again / "rotation-smoke")
    assert set(new["metric"][new["cell"] == "train"]) == {"params"}  # nothing trained
    key = ["cell", "metric"]
    old = rows[(rows["model"] == "lenet5") & (rows["seed"] == 0) & (rows["cell"] != "train")]
    both = old.merge(new[new["cell"] != "train"], on=key, suffixes=("_old", "_new"))
    assert len(both) == len(old) == len(new) - 1 > 0
    assert (both["value_old"] == both["value_new"]).all() and (both["n_old"] == both["n_new"]).all()

    # weights that do not fit: one line, and the folder's results untouched
    before = (again / "rotation-smoke" / "results.csv").read_bytes()
    toy_job = next(p for p in (out / "jobs").iterdir() if p.name.startswith("toy_wide-"))
    proc = cli("run", "--suite", "rotation", "--profile", "smoke", "--models", "lenet5", "--checkpoint",
               str(toy_job / "checkpoint.pt"), "--out", str(again), "--data-root", root)
    assert "its weights do not fit model 'lenet5'" in error_line(proc)
    assert (again / "rotation-smoke" / "results.csv").read_bytes() == before


def test_evaluate_a_model_object(plugins, data_root, tmp_path):
    from capsbench_toy import ToyCNN

    rows = capsbench.evaluate(ToyCNN(), suite="rotation", profile="smoke", out=tmp_path, data_root=data_root,
                              log=lambda _: None)
    run_dir = tmp_path / "rotation-smoke"
    on_disk = capsbench.load_results(run_dir)
    assert list(rows.columns) == list(on_disk.columns) and set(rows["model"]) == {"toycnn"}
    cells = {c["name"] for c in json.loads((run_dir / "run.json").read_text())["suite"]["cells"]}
    assert set(rows["cell"]) >= cells and rows["value"].notna().all()
    with pytest.raises(ConfigError, match="taken by a registered model"):
        capsbench.evaluate(ToyCNN(), name="lenet5", suite="rotation", profile="smoke", out=tmp_path,
                           data_root=data_root)


def test_claims_from_files_are_checked(tmp_path):
    good = tmp_path / "c.toml"
    good.write_text('[[claims]]\nname = "x"\nstatement = "a beats b"\nsuites = ["rotation"]\na = "a"\nb = "b"\n'
                    'cells = ["rot+45", "rot-45"]\n')
    (claim,) = capsbench.load_claims(good)
    assert claim.cells == ("rot+45", "rot-45") and claim.measure == "accuracy" and claim.direction == 1
    bad = tmp_path / "bad.json"
    for content, needle in [('[{"name": "x", "a": "a"}]', "lacks b, statement, suites"),
                            ('[{"name": "x", "statement": "s", "suites": ["rotation"], "a": "a", "b": "b", '
                             '"colour": 1}]', "unknown field(s) colour"),
                            ('[{"name": "x", "statement": "s", "suites": ["rotation"], "a": "a", "b": "b", '
                             '"measure": "speed"}]', "measure must be one of accuracy, unchanged"),
                            ("{", "not valid JSON"), ("[]", "holds no claims")]:
        bad.write_text(content)
        with pytest.raises(ConfigError, match=__import__("re").escape(needle)):
            capsbench.load_claims(bad)
    assert [c.name for c in capsbench.list_claims()][:3] == ["orientation", "pooling", "affNIST"]


def test_a_plain_modules_own_weights_fit_its_wrapper_even_when_it_has_a_net(tmp_path):
    """A plain module whose own attribute is called ``net`` (keys ``net.1.weight``): its state dict
    loads into the wrapper (keys ``net.net.1.weight``) as it is, and so does the wrapper's."""
    import torch
    from torch import nn

    from capsbench.models.base import as_classifier
    from capsbench.train.jobs import load_weights

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))

        def forward(self, x):
            return self.net(x)

    src, dst = Tiny(), as_classifier(Tiny(), "tiny", input_size=28)
    load_weights(dst, src.state_dict(), tmp_path / "w.pt", "tiny")
    assert torch.equal(dst.net.net[1].weight, src.net[1].weight)
    load_weights(dst, as_classifier(Tiny(), "tiny").state_dict(), tmp_path / "w.pt", "tiny")
    with pytest.raises(ConfigError, match="do not fit model 'tiny': 2 missing"):
        load_weights(dst, {"other.weight": torch.zeros(1)}, tmp_path / "w.pt", "tiny")


def test_a_checkpoint_that_is_not_a_file_of_tensors_gets_one_line_with_the_fix(tmp_path):
    import torch
    from torch import nn

    from capsbench.train.config import TrainConfig
    from capsbench.train.jobs import load_pretrained

    pickled_module, text = tmp_path / "module.pt", tmp_path / "notes.pt"
    torch.save({"model": nn.Linear(2, 2)}, pickled_module)  # a module object, not a state dict
    text.write_text("not weights\n")
    for path, reason in [(pickled_module, "Unsupported global: GLOBAL torch.nn.modules.linear.Linear"),
                         (text, "Unsupported operand")]:
        cfg = TrainConfig(model="lenet5", checkpoint=str(path))
        with pytest.raises(ConfigError) as err:
            load_pretrained(cfg, torch.device("cpu"))
        line = str(err.value)
        assert "\n" not in line and reason in line and "torch.save(model.state_dict(), PATH)" in line, line


def test_a_run_with_failing_cells_exits_1_and_says_how_many(plugins, data_root, tmp_path):
    proc = cli("run", "--suite", "part_shuffle", "--profile", "smoke", "--models", "capsbench_toy:toy_fails_late",
               "--seeds", "1", "--out", str(tmp_path), "--data-root", str(data_root), "--no-progress")
    assert proc.returncode == 1, proc.stderr
    n_cells = len(json.loads((tmp_path / "part_shuffle-smoke" / "run.json").read_text())["suite"]["cells"])
    assert f"0 training job(s) and {n_cells - 1} cell(s) failed" in proc.stderr
    meta = json.loads((tmp_path / "part_shuffle-smoke" / "run.json").read_text())
    assert meta["status"] == "finished_with_failures" and meta["failed"] == {"jobs": 0, "cells": n_cells - 1}
    assert "report: " in proc.stdout  # the report is still written
