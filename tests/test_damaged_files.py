"""Damaged files from an earlier run (a cut-off job.json or checkpoint, a garbled predictions
file) and results that a new command would overwrite: one warning or one-line error, the work
goes on, nothing finished is lost."""

from __future__ import annotations

import json
import os
import stat

import pandas as pd
import pytest

from capsbench.cli.main import main
from capsbench.errors import TrainingError
from capsbench.store import archive_previous, atomic_write_text
from capsbench.train.config import TrainConfig
from capsbench.train.jobs import load_finished
from capsbench.train.trainer import train

CFG = TrainConfig(model="lenet5", profile="smoke", seed=0)


@pytest.fixture()
def finished(tmp_path, data_root):
    res = train(CFG, out=tmp_path, data_root=data_root, device="cpu", progress=False, log=lambda m: None)
    assert not res.reused
    return tmp_path, res.job_dir


def test_a_garbled_job_json_is_rewritten_from_the_checkpoint(finished, data_root):
    out, job_dir = finished
    (job_dir / "job.json").write_text('{"status": "fini')
    with pytest.raises(TrainingError, match=r"job.json is damaged; rerun the command") as e:
        load_finished(CFG, out, "cpu")
    assert "\n" not in str(e.value)
    said = []
    res = train(CFG, out=out, data_root=data_root, device="cpu", progress=False, log=said.append)
    assert any("ignoring unreadable" in m and "job.json" in m for m in said), said
    assert any("resuming" in m for m in said), said  # from the checkpoint, at its last step: nothing retrained
    meta = json.loads((job_dir / "job.json").read_text())
    assert meta["status"] == "finished" and meta["key"] == CFG.key and res.steps_done == meta["steps_done"]
    assert load_finished(CFG, out, "cpu").reused


def test_a_cut_off_checkpoint_of_a_finished_job_is_trained_again(finished, data_root):
    out, job_dir = finished
    ckpt = job_dir / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(TrainingError, match=r"checkpoint .*checkpoint.pt cannot be loaded .*delete the job folder") as e:
        load_finished(CFG, out, "cpu")
    assert "\n" not in str(e.value)
    said = []
    res = train(CFG, out=out, data_root=data_root, device="cpu", progress=False, log=said.append)
    assert any("cannot be loaded" in m and "training it again" in m for m in said), said
    assert not res.reused and load_finished(CFG, out, "cpu").reused


def test_a_second_profile_keeps_the_first_ones_results(tmp_path, capsys):
    args = ["profile", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--out", str(tmp_path)]
    assert main([*args, "--models", "lenet5"]) == 0
    assert main([*args, "--models", "cnn_strided"]) == 0
    assert "earlier profile results moved to" in capsys.readouterr().err
    folder = tmp_path / "profile-cpu"
    assert set(pd.read_csv(folder / "results.csv").model) == {"cnn_strided"}
    (old,) = (folder / "previous").iterdir()
    assert set(pd.read_csv(old / "results.csv").model) == {"lenet5"}
    assert json.loads((old / "run.json").read_text())["settings"]["models"] == ["lenet5"]


def test_archive_previous_never_overwrites(tmp_path):
    assert archive_previous(tmp_path) is None  # nothing there: nothing moved
    moved = []
    for text in ("first", "second"):
        (tmp_path / "results.csv").write_text(text)
        moved.append(archive_previous(tmp_path))
    assert moved[0] != moved[1]  # same second: a second folder, not an overwrite
    assert sorted((m / "results.csv").read_text() for m in moved) == ["first", "second"]
    assert not (tmp_path / "results.csv").exists()


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    path = atomic_write_text(tmp_path / "results.csv", "a,b\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600


@pytest.mark.parametrize("args, message", [
    (["run", "--suite", "rotation", "--models", ""], "--models is empty"),
    (["run", "--suite", "rotation", "--models", " , "], "--models is empty"),
    (["profile", "--models", ""], "--models is empty"),
    (["speed", "--variants", ""], "--variants is empty"),
    (["speed", "--model", "lenet5", "--variants", "fp32,bf16_cl_graph"], "bf16_cl_graph need a CUDA device"),
    (["run", "--suite", "rotation", "--cpus-per-task", "2"], "--cpus-per-task only apply with --executor ray"),
    (["run", "--suite", "rotation", "--ray-address", "auto"], "--ray-address only apply with --executor ray"),
])
def test_empty_lists_and_gpu_only_variants_stop_before_any_work(tmp_path, capsys, args, message):
    assert main([*args, "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o" / "speed-cpu" / "results.csv").exists()


def test_describe_gives_one_line_even_for_an_empty_message():
    from capsbench.errors import describe, first_line

    assert describe(ValueError("")) == "ValueError" and first_line(ValueError("")) == ""
    assert describe(RuntimeError("  first\nsecond"), limit=3) == "RuntimeError: fir"
