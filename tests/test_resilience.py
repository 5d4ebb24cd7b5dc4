"""Crash safety, locks, determinism, NaN and out-of-memory handling (issue #7).

The kill tests are real: a ``capsbench`` subprocess is killed with SIGKILL while it works,
then started again, and what it recomputes is read from its output and the files' mtimes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from capsbench.evaluation.run import run_suite
from capsbench.locks import DirLock, LockedError, remove_partial_files
from capsbench.train.config import TrainConfig
from capsbench.train.device import set_deterministic
from capsbench.train.trainer import train, train_with_retry

ENV = {**os.environ, "CAPSBENCH_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "capsbench", *args]


def _partial_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name == ".lock"]


def _kill_when(cmd: list[str], ready, timeout: float = 120.0) -> bool:
    """Start ``cmd``; SIGKILL it as soon as ``ready()`` is true. True if it was killed."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            if ready():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
        assert proc.poll() is not None, f"{cmd} did not finish in {timeout} s"
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- locks


def test_a_second_run_into_a_held_run_directory_fails_naming_the_holder(tmp_path, data_root):
    run_dir = tmp_path / "part_shuffle-smoke"
    run_dir.mkdir()
    (run_dir / "results.csv").write_text("earlier results\n")
    with DirLock(run_dir, command="capsbench run --suite part_shuffle (the holder)"):
        proc = subprocess.run(
            _cli("run", "--suite", "part_shuffle", "--profile", "smoke", "--models", "lenet5",
                 "--out", str(tmp_path), "--data-root", str(data_root), "--no-progress"),
            env=ENV, capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert f"pid {os.getpid()}" in lines[0] and "(the holder)" in lines[0] and "another --out" in lines[0]
    assert (run_dir / "results.csv").read_text() == "earlier results\n"  # nothing lost
    assert not (tmp_path / "jobs").exists()  # nothing trained
    assert not (run_dir / ".lock").exists()  # released and removed


def test_a_lock_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from capsbench.locks import DirLock; "
         f"DirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=ENV,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"pid {holder.pid}"):
            DirLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with DirLock(tmp_path):  # the kernel let go of the dead holder's lock
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_partial_files_are_removed(tmp_path):
    (tmp_path / "a").mkdir()
    keep = tmp_path / "a" / "results.csv"
    keep.write_text("x")
    stale = [tmp_path / ".results.csv.abc123.tmp", tmp_path / "a" / ".cell.pt.zz.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    assert sorted(remove_partial_files(tmp_path)) == sorted(stale)
    assert keep.exists() and not any(p.exists() for p in stale)


# --------------------------------------------------------------------------- SIGKILL


def test_training_killed_by_sigkill_resumes_to_the_same_weights(tmp_path, data_root):
    args = ["train", "--model", "lenet5", "--profile", "smoke", "--steps", "300", "--data-root", str(data_root),
            "--no-progress", "--device", "cpu"]
    subprocess.run(_cli(*args, "--out", str(tmp_path / "whole")), env=ENV, check=True, capture_output=True,
                   timeout=300)
    out = tmp_path / "killed"
    ckpts = lambda: list(out.glob("jobs/*/checkpoint.pt"))  # noqa: E731 - first checkpoint at step 50
    assert _kill_when(_cli(*args, "--out", str(out)), lambda: bool(ckpts())), "finished before the kill"
    assert not list(out.glob("jobs/*/job.json"))  # it really was mid-training
    proc = subprocess.run(_cli(*args, "--out", str(out)), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stdout and "at step 0/" not in proc.stdout
    whole = torch.load(next((tmp_path / "whole").glob("jobs/*/checkpoint.pt")), weights_only=False)
    resumed = torch.load(ckpts()[0], weights_only=False)
    assert resumed["step"] == whole["step"] == 300
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert _partial_files(out) == []


def _table(run_dir: Path) -> pd.DataFrame:
    df = pd.read_csv(run_dir / "results.csv")
    df = df[~df.metric.isin(["train_time_s"])]
    return df.sort_values(["model", "seed", "cell", "metric"])[["model", "seed", "cell", "metric", "value"]]


def _finished_work(out: Path, run_dir: Path) -> dict[Path, int]:
    """mtimes of the checkpoints of finished jobs and of the predictions of recorded cells."""
    files = [p for p in out.glob("jobs/*/checkpoint.pt") if (p.parent / "job.json").exists()]
    if (run_dir / "results.csv").exists():
        df = pd.read_csv(run_dir / "results.csv")
        df = df[df.error.isna() & (df.cell != "train")]
        for r in df[["model", "seed", "job_key", "cell"]].drop_duplicates().itertuples():
            files.append(run_dir / "predictions" / f"{r.model}-s{r.seed}-{r.job_key}" / f"{r.cell}.npz")
    return {p: p.stat().st_mtime_ns for p in files}


def test_a_suite_killed_at_any_moment_completes_without_redoing_finished_work(tmp_path, data_root):
    args = ["run", "--suite", "part_shuffle", "--profile", "smoke", "--models", "lenet5", "--seeds", "2",
            "--data-root", str(data_root), "--device", "cpu", "--no-progress", "--no-report"]
    ref = tmp_path / "ref"
    subprocess.run(_cli(*args, "--out", str(ref)), env=ENV, check=True, capture_output=True, timeout=300)
    out = tmp_path / "killed"
    run_dir = out / "part_shuffle-smoke"

    # Kill points: while the first job trains, right after it finished, after a few cells.
    triggers = [
        lambda: bool(list(out.glob("jobs/*/.lock"))),
        lambda: bool(list(out.glob("jobs/*/job.json"))),
        lambda: len(list(run_dir.glob("predictions/*/*.npz"))) >= 3,
    ]
    kills = 0
    for i, ready in enumerate(triggers):
        before = _finished_work(out, run_dir)
        killed = _kill_when(_cli(*args, "--out", str(out)), ready)
        kills += killed
        # whatever had finished before this start was not redone by it
        assert {p: p.stat().st_mtime_ns for p in before} == before
        print(f"start {i + 1}: {'killed' if killed else 'finished'}; finished before it: {len(before)} files "
              f"(kept); after it: {len(_finished_work(out, run_dir))} finished jobs/cells, partial files "
              f"left: {[p.name for p in _partial_files(out)]}")
    assert kills >= 2, "the run finished before it could be killed"

    before = _finished_work(out, run_dir)
    n_done_cells = sum(p.parent.parent.name == "predictions" for p in before)
    proc = subprocess.run(_cli(*args, "--out", str(out)), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    print(f"final start: {proc.stdout.count(': accuracy ')} cells evaluated, "
          f"{proc.stdout.count('reusing finished job')} finished jobs reused, "
          f"{proc.stdout.count('resuming')} resumed; kept {len(before)} finished files")
    assert {p: p.stat().st_mtime_ns for p in before} == before  # no finished job or cell redone
    assert proc.stdout.count(": accuracy ") == 10 - n_done_cells  # 2 jobs x 5 cells: the missing ones
    assert _partial_files(out) == []
    pd.testing.assert_frame_equal(_table(run_dir).reset_index(drop=True),
                                  _table(ref / "part_shuffle-smoke").reset_index(drop=True))


# --------------------------------------------------------------------------- NaN, OOM


def test_a_nan_job_fails_with_its_reason_and_the_grid_goes_on(tmp_path, data_root):
    run_dir = run_suite("part_shuffle", models=["lenet5", "capsnet_r1"], profile="smoke", out=tmp_path,
                        data_root=data_root, device="cpu", progress=False, log=lambda m: None,
                        lr={"lenet5": 1e30})
    df = pd.read_csv(run_dir / "results.csv")
    failed = df[(df.model == "lenet5")]
    assert list(failed.metric) == ["train_error"]
    assert "training loss became nan" in failed.error.item() and "--lr" in failed.error.item()
    ok = df[(df.model == "capsnet_r1") & (df.metric == "accuracy")]
    assert len(ok) == 5 and ok.value.notna().all()
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "finished_with_failures" and meta["failed"] == {"jobs": 1, "cells": 0}
    assert any("nan" in j.get("error", "") for j in meta["jobs"])


def test_out_of_memory_retries_at_half_the_batch_size(tmp_path, data_root):
    """A CUDA out-of-memory error in a step: the job is retried at half the batch size.

    There is no GPU here, so the error is raised from the trainer's per-step hook at the first
    step of the first attempt (the real exception type, at the point where a step's memory is
    spent); the GPU tier has a test that runs out of memory for real.
    """
    sizes = []

    def on_step(step):
        if not sizes:
            sizes.append(step)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    cfg = TrainConfig(model="lenet5", profile="smoke", train_limit=512)
    res = train_with_retry(cfg, out=tmp_path, data_root=data_root, device="cpu", progress=False,
                           log=lambda m: None, on_step=on_step)
    assert res.oom_retries == [{"batch_size": 64, "error": "CUDA out of memory. Tried to allocate 2.00 GiB"}]
    assert res.config.batch_size == 32 and res.steps_done == 24  # as many images as planned
    assert not res.reused


@pytest.mark.gpu
def test_real_cuda_out_of_memory_is_retried(tmp_path, data_root, monkeypatch):
    if not torch.cuda.is_available():
        pytest.fail("the gpu tier needs a CUDA device")
    free, _ = torch.cuda.mem_get_info()
    # capsnet's u_hat alone is 737 kB per image (written by the plain routing, which this test
    # selects): a batch that cannot fit, trained for 2 steps
    monkeypatch.setenv("CAPSBENCH_ROUTING", "torch")
    bs = int(2 * free / 737_280) + 1
    cfg = TrainConfig(model="capsnet", profile="smoke", steps=2, batch_size=bs, train_limit=60_000)
    res = train_with_retry(cfg, out=tmp_path, data_root=data_root, device="cuda", progress=False)
    assert res.oom_retries and res.config.batch_size < bs


# --------------------------------------------------------------------------- determinism


def test_deterministic_runs_give_identical_metrics(tmp_path, data_root):
    kw = dict(models=["lenet5"], profile="smoke", data_root=data_root, device="cpu", progress=False,
              log=lambda m: None, deterministic=True)
    a = run_suite("part_shuffle", out=tmp_path / "a", **kw)
    b = run_suite("part_shuffle", out=tmp_path / "b", **kw)
    pd.testing.assert_frame_equal(_table(a), _table(b))
    flags = json.loads((a / "run.json").read_text())["determinism_flags"]
    assert flags["use_deterministic_algorithms"] and flags["cudnn_deterministic"] and not flags["cudnn_benchmark"]
    assert flags["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    ckpt = [torch.load(next(p.glob("jobs/*/checkpoint.pt")), weights_only=False)["model"]
            for p in (tmp_path / "a", tmp_path / "b")]
    assert all(torch.equal(ckpt[0][k], ckpt[1][k]) for k in ckpt[0])


def test_set_deterministic_round_trip():
    try:
        assert set_deterministic(True)["use_deterministic_algorithms"]
    finally:
        flags = set_deterministic(False)
    assert not flags["use_deterministic_algorithms"] and not flags["cudnn_deterministic"]


def test_two_trainers_of_one_job_train_it_once(tmp_path, data_root):
    """A second process needing a job that is being trained waits and reuses it."""
    cfg = TrainConfig(model="lenet5", profile="smoke", steps=200)
    job_dir = tmp_path / "jobs" / cfg.job_name
    other = subprocess.Popen(
        _cli("train", "--model", "lenet5", "--profile", "smoke", "--steps", "200", "--out", str(tmp_path),
             "--data-root", str(data_root), "--no-progress"),
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        t0 = time.monotonic()
        while not (job_dir / ".lock").exists() and time.monotonic() - t0 < 60:
            time.sleep(0.005)
        logs = []
        res = train(cfg, out=tmp_path, data_root=data_root, device="cpu", progress=False, log=logs.append)
    finally:
        other.wait(timeout=300)
    assert other.returncode == 0
    assert res.reused, logs
    assert any("waiting for job" in m for m in logs) or any("reusing" in m for m in logs)
