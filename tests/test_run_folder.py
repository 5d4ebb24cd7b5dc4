"""One run folder across reruns: settings that must not mix, run.json's history, results.csv read back.

Every run is real (LeNet-5, smoke profile, CPU): a rerun into ``<out>/<suite>-<profile>/``
must find exactly what the earlier runs left there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from capsbench.cli.main import main
from capsbench.errors import ConfigError
from capsbench.evaluation.run import _load_rows, run_suite
from capsbench.train.config import TrainConfig


def _run(out: Path, data_root: Path, suite: str = "part_shuffle", log=None, **kw) -> Path:
    kw = {"models": ["lenet5"], "profile": "smoke", "device": "cpu", "progress": False, **kw}
    return run_suite(suite, out=out, data_root=data_root, log=log or (lambda m: None), **kw)


def _cli(out: Path, data_root: Path, *args: str) -> int:
    return main(["run", "--suite", "part_shuffle", "--profile", "smoke", "--models", "lenet5", "--out", str(out),
                 "--data-root", str(data_root), "--device", "cpu", "--no-progress", "--no-report", *args])


def _table(run_dir: Path) -> pd.DataFrame:
    df = pd.read_csv(run_dir / "results.csv", dtype={"job_key": str})
    cols = ["model", "seed", "job_key", "cell", "metric", "direction", "value", "n"]
    df = df[[c for c in cols if c in df.columns]]
    return df.sort_values(cols[:5] if "direction" not in df else cols[:6]).reset_index(drop=True)


def _jobs(out: Path) -> list[Path]:
    return [p for p in (out / "jobs").iterdir() if p.is_dir()]


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (run_dir / "results.csv", run_dir / "run.json")}


# --------------------------------------------------------------------------- 1. settings


def test_a_rerun_with_other_settings_is_refused_and_changes_nothing(tmp_path, data_root, capsys):
    assert _cli(tmp_path, data_root) == 0
    run_dir = tmp_path / "part_shuffle-smoke"
    before = _snapshot(run_dir)
    capsys.readouterr()

    assert _cli(tmp_path, data_root, "--match-accuracy", "0.5") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("capsbench: error: ") and str(run_dir) in err
    assert "match_accuracy: unset there, 0.5 now" in err and "another --out" in err and "delete" in err
    assert _snapshot(run_dir) == before
    assert len(_jobs(tmp_path)) == 1  # nothing trained

    with pytest.raises(ConfigError, match=r"lr of lenet5: unset there, 0.01 now"):
        _run(tmp_path, data_root, lr=0.01)
    assert _snapshot(run_dir) == before
    assert len(_jobs(tmp_path)) == 1


def test_a_budget_for_another_model_does_not_refuse_the_folder(tmp_path, data_root):
    """A model new in the registry gets a budget and a rate; the folder's models keep theirs."""
    run_dir = _run(tmp_path, data_root)
    path = run_dir / "run.json"
    meta = json.loads(path.read_text())
    meta["profile"]["steps"] = {"*": 12, "other_model": 5}
    meta["profile"]["lr_per_model"] = {"other_model": 0.5}
    path.write_text(json.dumps(meta))
    _run(tmp_path, data_root)  # accepted: lenet5 trains 12 steps at the profile's rate, then and now
    meta = json.loads(path.read_text())
    meta["profile"]["steps"] = {"*": 12, "lenet5": 7}
    path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"profile steps of lenet5: 7 there, 12 now"):
        _run(tmp_path, data_root)


def test_a_folder_whose_jobs_have_other_keys_is_refused_even_without_run_json(tmp_path, data_root):
    """A changed profile or model code gives new job keys; without run.json the rows show it."""
    run_dir = _run(tmp_path, data_root)
    (run_dir / "run.json").unlink()
    df = pd.read_csv(run_dir / "results.csv", dtype={"job_key": str})
    old_key = df.job_key.iloc[0]
    df["job_key"] = "0123456789ab"
    df.to_csv(run_dir / "results.csv", index=False)
    with pytest.raises(ConfigError) as e:
        _run(tmp_path, data_root)
    msg = str(e.value)
    assert "\n" not in msg and str(run_dir) in msg and "another --out" in msg
    assert "lenet5 seed 0 there is job 0123456789ab, now it is job " + old_key in msg


def test_adding_seeds_and_models_to_a_run_keeps_working(tmp_path, data_root):
    _run(tmp_path, data_root)
    run_dir = _run(tmp_path, data_root, seeds=2)
    run_dir = _run(tmp_path, data_root, models=["lenet5", "capsnet_r1"], suite="part_shuffle")
    df = pd.read_csv(run_dir / "results.csv", dtype={"job_key": str})
    assert set(zip(df.model, df.seed, strict=True)) == {("lenet5", 0), ("lenet5", 1), ("capsnet_r1", 0)}
    assert (df.groupby(["model", "seed"]).job_key.nunique() == 1).all()  # one job per model and seed
    assert not df.duplicated(["model", "seed", "cell", "metric"]).any()
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["models"] == ["lenet5", "capsnet_r1"] and meta["seeds"] == 2


# --------------------------------------------------------------------------- 2. run.json


FULL = {"job_dir", "train_time_s", "images_per_s", "host", "pid", "trained_config", "params", "steps"}


def test_reruns_keep_run_json_s_record_of_earlier_runs(tmp_path, data_root):
    two = ["lenet5", "capsnet_r1"]
    _run(tmp_path, data_root, models=two, command="capsbench run A")
    first = json.loads((tmp_path / "part_shuffle-smoke" / "run.json").read_text())
    assert len(first["jobs"]) == 2 and all(FULL <= set(j) for j in first["jobs"])

    _run(tmp_path, data_root, models=["lenet5"], command="capsbench run B")  # fewer models
    run_dir = _run(tmp_path, data_root, models=["lenet5", "lenet5"], command="capsbench run C")  # a no-op
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["models"] == two
    assert meta["seeds"] == 1
    assert meta["command"] == "capsbench run C"
    assert [c["command"] for c in meta["commands"]] == ["capsbench run A", "capsbench run B", "capsbench run C"]
    assert all(c["time"] for c in meta["commands"])
    assert meta["commands"][-1]["models"] == ["lenet5"]  # given twice, run once
    assert meta["jobs"] == first["jobs"]  # the full entries, not stubs of the reruns
    df = pd.read_csv(run_dir / "results.csv")
    assert not df.duplicated(["model", "seed", "cell", "metric"]).any()


def test_a_run_json_without_history_is_extended(tmp_path, data_root):
    """A run.json written before the history was kept: its command becomes the first entry."""
    run_dir = _run(tmp_path, data_root, command="capsbench run old")
    meta = json.loads((run_dir / "run.json").read_text())
    del meta["commands"]
    meta["jobs"] = [{"model": "lenet5", "seed": 0, "job_key": meta["jobs"][0]["job_key"], "reused": True}]
    (run_dir / "run.json").write_text(json.dumps(meta))
    _run(tmp_path, data_root, seeds=2, command="capsbench run new")
    meta = json.loads((run_dir / "run.json").read_text())
    assert [c["command"] for c in meta["commands"]] == ["capsbench run old", "capsbench run new"]
    assert meta["seeds"] == 2 and len(meta["jobs"]) == 2
    assert meta["jobs"][0]["reused"] and FULL <= set(meta["jobs"][1])


# --------------------------------------------------------------------------- 3. cut-off rows


@pytest.mark.parametrize("suite", ["part_shuffle", "rotation"])
def test_a_row_cut_off_mid_line_is_dropped_and_its_cell_evaluated_again(tmp_path, data_root, suite):
    """The last row of part_shuffle is a cell's; of rotation, a mean of both directions."""
    run_dir = _run(tmp_path, data_root, suite=suite)
    ref = _table(run_dir)
    path = run_dir / "results.csv"
    text = path.read_bytes()
    last = text.rstrip(b"\n").rindex(b"\n") + 1
    path.write_bytes(text[: last + (len(text) - last) // 2])  # up to the middle of the last row

    logs: list[str] = []
    _run(tmp_path, data_root, suite=suite, log=logs.append)
    assert sum("dropped 1 damaged row" in m for m in logs) == 1
    # part_shuffle's last cell is evaluated again; rotation's mean is recomputed from its rows
    assert sum(": accuracy " in m for m in logs) == (1 if suite == "part_shuffle" else 0)
    assert path.read_bytes().endswith(b"\n")
    df = pd.read_csv(path, dtype={"job_key": str})
    assert df.job_key.notna().all() and df.data_sha256.notna().all()
    assert df.git_sha.nunique() == 1  # no cut-off sha
    pd.testing.assert_frame_equal(_table(run_dir), ref)

    logs.clear()  # and the next run finds everything
    _run(tmp_path, data_root, suite=suite, log=logs.append)
    assert not any("damaged" in m for m in logs) and any("already evaluated" in m for m in logs)


def test_a_row_without_its_job_key_or_value_is_dropped_and_its_cell_evaluated_again(tmp_path, data_root):
    run_dir = _run(tmp_path, data_root)
    ref = _table(run_dir)
    path = run_dir / "results.csv"
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    cells = df.index[df.cell == "shuffle_k4"]
    df.loc[cells[0], "job_key"] = ""
    df.loc[cells[1], "value"] = ""
    df.to_csv(path, index=False)

    logs: list[str] = []
    _run(tmp_path, data_root, log=logs.append)
    assert any("dropped 2 damaged row" in m for m in logs)
    assert [m.split(":")[0].strip() for m in logs if ": accuracy " in m] == ["lenet5 s0 shuffle_k4"]
    pd.testing.assert_frame_equal(_table(run_dir), ref)


def test_reading_back_keeps_error_rows_and_unmatched_jobs_and_drops_damaged_rows(tmp_path):
    cols = "run_id,suite,model,seed,cell,metric,value,n,git_sha,data_sha256,job_key,error"
    good = [
        "r,s,lenet5,0,clean,accuracy,0.5,256,abc,0011,aaaaaaaaaaaa,",
        "r,s,lenet5,0,swap_k4,error,,0,abc,0011,aaaaaaaaaaaa,RuntimeError: boom",  # a failed cell
        "r,s,lenet5,0,train,train_error,,0,abc,0011,bbbbbbbbbbbb,training loss became nan",
        "r,s,lenet5,0,train,matched_at_step,,1,abc,0011,aaaaaaaaaaaa,",  # never reached the target
    ]
    bad = [
        "r,s,lenet5,0,clean,confidence,,256,abc,0011,aaaaaaaaaaaa,",  # no value, no error
        "r,s,lenet5,0,clean,,0.5,256,abc,0011,aaaaaaaaaaaa,",  # no metric
        "r,s,lenet5,0,clean,accuracy,0.5,256,abc,0011,,",  # no job key
        "r,s,lenet5,0,shuffle_k2,accuracy,0.5,256,abc,0011,aaaaaaaaaaaa,",
    ]
    path = tmp_path / "results.csv"
    path.write_text("\n".join([cols, *good, *bad])[:-6])  # the last row cut off in its job key
    rows, dropped = _load_rows(path)
    assert dropped == len(bad)
    assert [(r["cell"], r["metric"]) for r in rows] == [tuple(g.split(",")[4:6]) for g in good]
    assert rows[1]["error"] == "RuntimeError: boom" and rows[3]["value"] != rows[3]["value"]  # NaN kept


# --------------------------------------------------------------------------- 4. text columns


KEYS = ["1234e5678901", "012345678901", "123456789012", "00000000000e"]


def test_text_columns_read_back_as_written(tmp_path):
    rows = [{"run_id": "123", "suite": "rotation", "model": "lenet5", "seed": 0, "cell": "rot0", "direction": "none",
             "angle": 0, "metric": "accuracy", "value": 0.25, "n": 256, "profile": "smoke", "device": "cpu",
             "git_sha": "0123456789abcdef", "data_sha256": "000123400e100000", "job_key": k, "error": ""}
            for k in KEYS]
    path = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    back, dropped = _load_rows(path)
    assert dropped == 0
    for want, got in zip(rows, back, strict=True):
        for col in ("run_id", "model", "cell", "direction", "metric", "git_sha", "data_sha256", "job_key"):
            assert got[col] == want[col] and isinstance(got[col], str), col
        for col in ("seed", "n", "angle", "value"):  # numbers stay numbers
            assert got[col] == want[col] and not isinstance(got[col], str), col


@pytest.mark.parametrize("key", ["1234e5678901", "012345678901"])
def test_a_job_key_that_looks_like_a_number_is_found_again(tmp_path, data_root, monkeypatch, key):
    monkeypatch.setattr(TrainConfig, "key", property(lambda self: key))
    run_dir = _run(tmp_path, data_root)
    before = (run_dir / "results.csv").read_bytes()
    logs: list[str] = []
    _run(tmp_path, data_root, log=logs.append)
    assert any("all 5 cells already evaluated" in m for m in logs), logs
    assert (run_dir / "results.csv").read_bytes() == before
    assert set(pd.read_csv(run_dir / "results.csv", dtype={"job_key": str}).job_key) == {key}


def test_a_folder_from_before_random_evaluation_subsets_is_refused(tmp_path, data_root):
    # Such a folder scored the first test images in file order and trained on all 60,000 digits:
    # its rows must not be mixed with a run that scores a random sample.
    run_dir = _run(tmp_path, data_root)
    meta = json.loads((run_dir / "run.json").read_text())
    del meta["splits"]
    (run_dir / "run.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="evaluation images: the first images in file order there"):
        _run(tmp_path, data_root)
