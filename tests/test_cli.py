"""The ``capsbench`` command: listings, data, train, and clear one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from capsbench.cli.main import main


def test_list_models_prints_parameter_counts(capsys):
    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    assert "8,215,568" in out and "61,706" in out and "35,445,522" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    # the papers' counts without the reconstruction decoder: Sabour et al. 2017 Table 1's 6.8M,
    # Mazzia et al. 2021's 161K; a model without a decoder shows its total twice
    assert rows["capsnet"][2:4] == ["8,215,568", "6,804,224"]
    assert rows["efficient_capsnet"][2:4] == ["1,573,168", "161,824"]
    assert rows["cnn_maxpool"][2] == rows["cnn_maxpool"][3] == "7,495,946"
    for name in ("capsnet", "capsnet_r1", "capsnet_norecon", "capsnet_uniform", "lenet5",
                 "cnn_maxpool", "cnn_sabour", "cnn_strided", "efficientnet_b0"):
        assert name in out


def test_list_suites_profiles_protocols(capsys):
    for what in ("suites", "profiles", "protocols"):
        assert main(["list", what]) == 0
    out = capsys.readouterr().out
    assert "rotation" in out and "quick" in out and "mnist28_shift2" in out


def test_list_profiles_is_a_table(capsys):
    assert main(["list", "profiles"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["profile", "batch"] and [ln.split()[0] for ln in lines[1:]] == ["paper", "quick",
                                                                                                      "smoke"]
    quick = lines[2]
    assert quick.index("32") == lines[0].index("batch") and "capsnet 700" in quick and "x0.49 on canvas40_random" in quick


def test_data_info_reports_status(data_root, capsys):
    assert main(["data", "info", "--data-root", str(data_root)]) == 0
    out = capsys.readouterr().out
    assert "unverified" in out and "verified" in out and "t10k-images-idx3-ubyte.gz" in out
    # no real affNIST files: says what the affnist suite uses instead and where to get them
    affnist = next(ln for ln in out.splitlines() if ln.strip().startswith("affnist"))
    assert "affnist_synth" in affnist and "https://www.cs.toronto.edu/~tijmen/affNIST/" in affnist


def test_data_fetch_offline_or_online(tmp_path, capsys):
    rc = main(["data", "fetch", "mnist", "--data-root", str(tmp_path)])
    if rc == 2:  # no network (this build machine): one line that says how to point at local files
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--data-root" in err
    else:
        assert rc == 0 and len(list((tmp_path / "MNIST" / "raw").glob("*.gz"))) == 4


def test_missing_data_is_one_clear_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "capsbench", "train", "--model", "lenet5", "--data-root", str(tmp_path / "none"),
         "--out", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "--data-root" in err[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--model", "capsnett"], "unknown model 'capsnett'"),
        (["train", "--model", "lenet5", "--profile", "fast"], "unknown profile 'fast'"),
    ],
)
def test_bad_names_list_the_valid_ones(argv, needle, capsys, data_root, tmp_path):
    assert main([*argv, "--data-root", str(data_root), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--batch-size", "-1"), ("--seed", "-3")])
def test_bad_numbers_are_rejected(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "lenet5", flag, value])
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_train_writes_a_run_directory(data_root, tmp_path, capsys):
    rc = main(["train", "--model", "lenet5", "--steps", "60", "--profile", "smoke", "--seed", "3",
               "--data-root", str(data_root), "--out", str(tmp_path), "--device", "cpu", "--no-progress"])
    assert rc == 0
    (job,) = (tmp_path / "jobs").iterdir()
    meta = json.loads((job / "run.json").read_text())
    assert meta["config"]["model"] == "lenet5" and meta["config"]["seed"] == 3
    assert meta["environment"]["torch"] and meta["environment"]["git_sha"]
    assert {v["status"] for v in meta["data_checksums"].values()} == {"verified", "unverified"}
    df = pd.read_csv(job / "results.csv")
    acc = df[df.metric == "accuracy"]
    assert acc["n"].item() == 10_000 and 0.5 < acc["value"].item() <= 1.0
    assert "clean mnist test accuracy" in capsys.readouterr().out


def test_every_option_has_help_and_shows_its_default():
    import argparse

    from capsbench.cli.main import build_parser

    missing, no_default = [], []

    def walk(parser, path):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    walk(sub, [*path, name])
            elif a.option_strings and not isinstance(a, argparse._HelpAction):
                if not a.help:
                    missing.append(f"{' '.join(path)} {a.option_strings[0]}")
                elif a.default not in (None, False, argparse.SUPPRESS) and "default" not in \
                        parser.formatter_class("x")._get_help_string(a):
                    no_default.append(f"{' '.join(path)} {a.option_strings[0]}")

    walk(build_parser(), ["capsbench"])
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"defaults not shown: {no_default}"
