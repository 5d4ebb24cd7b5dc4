"""``capsbench run --suite NAME``: train what a suite needs, evaluate every cell, write rows.

Layout of ``--out`` (default ``runs/``)::

    runs/jobs/<job>/checkpoint.pt, job.json      training jobs, shared by every suite and run
    runs/<suite>-<profile>/results.csv           tidy rows, rewritten atomically after each cell
    runs/<suite>-<profile>/run.json              resolved suite, configuration, provenance
    runs/<suite>-<profile>/predictions/<job>/<cell>.npz  per-image predictions (paired tests; NumPy)
    runs/<suite>-<profile>/.lock, runs/jobs/<job>/.lock   held while a run / a training job is live

A second run into the same folder finds the finished jobs and cells and recomputes nothing;
a run killed at any moment (even by SIGKILL) is completed by running it again: finished jobs
and cells are kept, an interrupted job resumes from its last checkpoint, and the temporary
files of interrupted writes are removed. A run directory is locked while a run uses it (a
second run into it fails naming the holder). A cell that fails writes a row with its error,
a job that cannot be trained (NaN loss, out of memory at every batch size) writes an error row,
and the run goes on.

A run folder holds one configuration: more models or seeds can be added to it, but a run whose
jobs would compute something else (another ``--match-accuracy``, ``--amp``, learning rate,
profile budget or model code) is refused before it writes anything. run.json keeps the record
of every run into the folder (models, seeds, jobs, and each command with its time). Rows of
results.csv that were cut off or lack their job key, metric or value are dropped on reading
(with a warning) and their cells evaluated again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from capsbench.data.affnist import load_affnist_test
from capsbench.data.datasets import data_checksums
from capsbench.data.fetch import ensure_dataset
from capsbench.data.specs import resolve_data_root
from capsbench.data.splits import EVAL_SUBSET_SEED, VALIDATION_SEED, eval_subset, validation_split
from capsbench.data.splits import describe as describe_split
from capsbench.errors import CapsbenchError, ConfigError
from capsbench.evaluation.cells import cell_metrics
from capsbench.evaluation.executors import EXECUTORS, JobSpec, RunContext, make_executor
from capsbench.locks import DirLock, remove_partial_files
from capsbench.models import create_model, list_models, model_info
from capsbench.models.registry import resolve_model
from capsbench.store import (
    TEXT_COLUMNS,
    ensure_writable_dir,
    environment_info,
    stable_hash,
    write_json,
    write_rows_csv,
)
from capsbench.suites.base import Suite, get_suite
from capsbench.train.config import TrainConfig
from capsbench.train.device import (
    SpeedOptions,
    check_device_options,
    determinism_flags,
    resolve_device,
    set_deterministic,
)
from capsbench.train.jobs import load_pretrained, pretrained_config
from capsbench.train.matching import MATCH_FAR_SUBSET, MATCH_SEARCH_STEPS, NEAR_EVERY, NEAR_TARGET
from capsbench.train.profiles import get_profile
from capsbench.train.protocols import PROTOCOLS, entry_protocol, split_entry

# A row without one of these was cut off or garbled: it is dropped and its cell evaluated again.
REQUIRED_COLUMNS = ("model", "seed", "cell", "metric", "n", "job_key")
# Metrics whose value is NaN in a good row (error rows aside): a job that never reached
# --match-accuracy has no step at which it did.
NAN_METRICS = ("matched_at_step", "match_val_accuracy")
# The rows every trained job has in the "train" cell (see _train_rows).
TRAIN_METRICS = ("params", "train_steps", "train_time_s")


def _resolve_entry(entry: str) -> str:
    """A --models entry with its model resolved (``pkg.module:factory@rot90`` -> ``factory@rot90``)."""
    model, aug = split_entry(entry)
    return resolve_model(model) + (f"@{aug}" if aug else "")


def _has_error(row: dict[str, Any]) -> bool:
    # rows read back from CSV carry NaN (not "") where there was no error
    err = row.get("error")
    return isinstance(err, str) and bool(err)


def _is_complete(row: dict[str, Any]) -> bool:
    """Whether a row read back from results.csv has every field a written row has."""
    if any(_missing(row.get(c)) for c in REQUIRED_COLUMNS):
        return False
    return not _missing(row.get("value")) or _has_error(row) or row["metric"] in NAN_METRICS


def _missing(v: Any) -> bool:
    return v is None or v == "" or (isinstance(v, float) and v != v)


def _load_rows(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The rows of an earlier results.csv, and how many damaged rows were dropped from it.

    A row cut off mid-line (the file does not end with a newline) or missing its job key,
    metric or value is dropped, so its cell is evaluated again.
    """
    if not path.exists():
        return [], 0
    import io

    import pandas as pd

    data = path.read_bytes()
    cut = 0
    if data and not data.endswith(b"\n") and b"\n" in data:  # the last row was cut off mid-line
        data, cut = data[: data.rindex(b"\n") + 1], 1
    try:
        df = pd.read_csv(io.BytesIO(data), keep_default_na=False, na_values=[""],
                         dtype=dict.fromkeys(TEXT_COLUMNS, str))
    except Exception as e:
        raise CapsbenchError(f"{path}: cannot read earlier results ({e}); move the file away to start afresh") from None
    for c in ("seed", "n", "value"):  # numbers; a garbled one is missing, and its row dropped
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    rows = df.to_dict("records")
    good = [r for r in rows if _is_complete(r)]
    for r in good:  # a dropped row may have left an integer column as floats
        for c in ("seed", "n"):
            if isinstance(r[c], float) and r[c].is_integer():
                r[c] = int(r[c])
    return good, cut + len(rows) - len(good)


def run_suite(
    suite_name: str,
    models: Sequence[str] | None = None,
    seeds: int | None = None,
    profile: str = "quick",
    device: str = "auto",
    out: str | os.PathLike = "runs",
    data_root: str | os.PathLike | None = None,
    match_accuracy: float | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    command: str | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    cpus_per_task: int = 1,
    deterministic: bool = False,
    lr: float | Mapping[str, float] | None = None,
    amp: str | None = None,
    speed: SpeedOptions | None = None,
    epochs: float | None = None,
    checkpoints: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]] | None = None,
) -> Path:
    """Run a suite end to end and return its run directory (see the module docstring).

    ``models``: registered names, or ``pkg.module:factory`` for a model from outside capsbench
    (:func:`capsbench.models.registry.resolve_model`); either with ``@rotN`` for the model trained
    on digits turned by up to N degrees (``capsnet@rot180``; :mod:`capsbench.train.protocols`),
    scored beside the others under that name.
    ``checkpoints``: models trained elsewhere, by name: a checkpoint file (or one per seed) whose
    weights are scored instead of training the model (:func:`capsbench.train.jobs.load_pretrained`).

    ``seeds``: seeds 0..N-1 of every model; None: the suite's claim models 3, the others 1
    (:meth:`capsbench.suites.base.Suite.seeds_for`).
    ``executor``: ``local`` (this process) or ``ray`` (see :mod:`capsbench.evaluation.executors`).
    ``deterministic``: reproducible kernels (:func:`capsbench.train.device.set_deterministic`).
    ``lr``: learning rate for every model, or per model name (others keep the profile's).
    ``amp``: ``"bf16"`` trains under bf16 autocast (CUDA; part of each job's key).
    ``epochs``: train every model for this many epochs instead of the profile's budget (part of
    each job's key, as ``capsbench train --epochs``).
    ``speed``: how training runs on the device (:class:`capsbench.train.device.SpeedOptions`; the
    learning curve option is ignored here).
    """
    suite = get_suite(suite_name)
    prof = get_profile(profile)
    ckpts = {_resolve_entry(m): [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
             for m, paths in (checkpoints or {}).items()}
    models = list(dict.fromkeys(models or (list(ckpts) if ckpts else suite.default_models)))
    known = list_models()
    unknown = [m for m, base in ((m, split_entry(m)[0]) for m in models) if ":" not in base and base not in known]
    if unknown:
        raise ConfigError(f"unknown model(s) {', '.join(unknown)}; known models: {', '.join(known)} (trained on "
                          "rotated digits: MODEL@rotN, e.g. capsnet@rot180)")
    models = list(dict.fromkeys(_resolve_entry(m) for m in models))  # pkg.module:factory -> its name
    absent = [m for m in ckpts if m not in models]
    if absent:
        raise ConfigError(f"--checkpoint for {', '.join(absent)}, which is not in --models ({', '.join(models)})")
    if any(not paths for paths in ckpts.values()):
        raise ConfigError("--checkpoint: name at least one file for each model")
    if seeds is not None and seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; choose one of: {', '.join(EXECUTORS)}")
    lrs = dict(lr) if isinstance(lr, Mapping) else {m: lr for m in models} if lr is not None else {}
    bad_lr = {m: v for m, v in lrs.items() if not (isinstance(v, (int, float)) and v > 0)}
    if bad_lr:
        raise ConfigError(f"learning rates must be > 0, got {bad_lr}")
    dev = resolve_device(device)
    speed = check_device_options(dev, amp, speed)
    for model_name in models:  # every number checked before anything is created
        TrainConfig(model=split_entry(model_name)[0], dataset=suite.dataset,
                    protocol=entry_protocol(suite.protocol, model_name), profile=prof.name,
                    match_accuracy=match_accuracy, amp=amp, epochs=epochs).validate()
    size = PROTOCOLS.get(suite.protocol).input_size
    for model_name in dict.fromkeys(split_entry(m)[0] for m in models):  # a plug-in that breaks the model
        if model_info(model_name).get("source"):  # protocol stops here, in one line
            create_model(model_name, input_size=size)
    pretrained = {m: [pretrained_config(TrainConfig(model=split_entry(m)[0], dataset=suite.dataset,
                                                    protocol=entry_protocol(suite.protocol, m),
                                                    profile=prof.name, seed=i), p) for i, p in enumerate(paths)]
                  for m, paths in ckpts.items()}
    for cfg in (c for cfgs in pretrained.values() for c in cfgs):  # weights that do not fit stop here
        load_pretrained(cfg, torch.device("cpu"))
    # Data next (fetching it when online), so a missing or damaged file stops before any work;
    # a real affNIST file present under the root must be readable too.
    test = ensure_dataset(suite.dataset, root=data_root, split="test")
    train_labels = ensure_dataset(suite.dataset, root=data_root, split="train").labels
    _, val_idx = validation_split(train_labels)  # a training set too small to split stops here
    real_affnist = None
    if any(c.eval_data == "affnist" for c in suite.cells):
        real_affnist = load_affnist_test(data_root)
    splits = {
        "validation": describe_split(val_idx, int(train_labels.numel()), VALIDATION_SEED, "validation"),
        "evaluation": describe_split(eval_subset(test.labels, prof.eval_images), int(test.labels.numel()),
                                     EVAL_SUBSET_SEED, "evaluation", with_indices=True),
    }
    if real_affnist is not None:
        sample = eval_subset(real_affnist[1], prof.eval_images)
        splits["affnist"] = describe_split(sample, int(real_affnist[1].numel()), EVAL_SUBSET_SEED, "evaluation")
    out = ensure_writable_dir(out)
    run_dir = ensure_writable_dir(out / f"{suite.name}-{prof.name}")
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    with DirLock(run_dir, "run directory", command=command):
        removed = remove_partial_files(run_dir)
        if removed:
            log(f"removed {len(removed)} partial file(s) left by an interrupted run in {run_dir}")
        try:
            return _run_locked(suite, prof, models, seeds, dev, out, run_dir, splits, data_root, match_accuracy,
                               progress, log, command, executor, ray_address, cpus_per_task, deterministic, lrs,
                               amp, speed, epochs, pretrained)
        finally:
            if deterministic and not was_deterministic:
                set_deterministic(False)


def _run_locked(suite, prof, models, seeds, dev, out, run_dir, splits, data_root, match_accuracy,
                progress, log, command, executor, ray_address, cpus_per_task, deterministic, lrs,
                amp, speed, epochs, pretrained) -> Path:
    sums = data_checksums(suite.dataset, root=data_root)
    data_tag = stable_hash(sums, 16)
    evaluation = splits["evaluation"]
    n_eval = evaluation["n"]

    def eval_data(cell) -> str:  # run.json names the affNIST set this run scores
        if cell.eval_data == "affnist" and "affnist" not in splits:
            return "affnist_synth"
        return cell.eval_data
    flags = set_deterministic(True) if deterministic else determinism_flags()
    env = environment_info(dev)

    results_path = run_dir / "results.csv"
    loaded, dropped = _load_rows(results_path)
    if dropped:
        log(f"{results_path}: dropped {dropped} damaged row(s) (cut off, or without job key, metric or value); "
            "their cells are evaluated again")
    previous = _read_run_json(run_dir, log)

    planned: list[tuple[TrainConfig, dict[str, Any]]] = []
    seeds_of = {m: len(pretrained[m]) if m in pretrained else suite.seeds_for(m, seeds) for m in models}
    for model_name in models:
        for seed in range(seeds_of[model_name]):
            cfg = pretrained[model_name][seed] if model_name in pretrained else TrainConfig(
                model=split_entry(model_name)[0],
                dataset=suite.dataset,
                protocol=entry_protocol(suite.protocol, model_name),
                profile=prof.name,
                seed=seed,
                match_accuracy=match_accuracy,
                amp=amp,
                epochs=epochs,
                **({"lr": float(lrs[model_name])} if model_name in lrs else {}),
            ).validate()
            base = {
                "run_id": run_dir.name,
                "suite": suite.name,
                "model": model_name,
                "seed": seed,
                "train_data": f"{suite.dataset}:{entry_protocol(suite.protocol, model_name)}",
                "profile": prof.name,
                "device": str(dev),
                "git_sha": env["git_sha"],
                "data_sha256": data_tag,
                "job_key": cfg.key,
            }
            planned.append((cfg, base))
    # Before anything is written: a folder holds one configuration (its jobs would mix).
    _check_same_settings(run_dir, previous, suite, prof, evaluation, match_accuracy, amp, lrs, models, epochs)
    _check_same_jobs(run_dir, loaded, planned)
    if dropped:  # the damaged rows go now, even when nothing is left to do
        write_rows_csv(results_path, _with_direction_means(suite, loaded))

    rows = [r for r in loaded if not _has_error(r)]  # failed cells are retried
    metrics: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        metrics.setdefault((r["job_key"], r["cell"]), set()).add(r["metric"])
    train_metrics = set(TRAIN_METRICS) | ({"matched_at_step", "match_val_accuracy"} if match_accuracy is not None
                                          else set())

    # run.json keeps the record of earlier runs into this folder: models, seeds, jobs, commands
    jobs: dict[str, dict[str, Any]] = {}
    for i, job in enumerate(previous.get("jobs") or []):
        if isinstance(job, dict):
            jobs[str(job.get("job_key") or f"#{i}")] = job
    all_models = list(dict.fromkeys([*(previous.get("models") or []), *models]))
    seen_seeds = [int(r["seed"]) + 1 for r in loaded]
    all_seeds = max([*seeds_of.values(), *seen_seeds,
                     *([previous["seeds"]] if isinstance(previous.get("seeds"), int) else [])])
    seeds_per_model = dict(previous.get("seeds_per_model") or {})
    for m, k in seeds_of.items():
        seeds_per_model[m] = max(k, int(seeds_per_model.get(m, 0)))
    commands = list(previous.get("commands") or [])
    if previous and not commands:  # written before run.json kept a history
        commands.append({"command": previous.get("command"), "time": None, "models": previous.get("models"),
                         "seeds": previous.get("seeds")})
    commands.append({"command": command, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "models": models,
                     "seeds": seeds_of, "device": str(dev)})

    def add_job(key: str, entry: dict[str, Any]) -> None:  # key: the planned job's (as in the rows)
        jobs[key] = _merged_job(jobs.get(key), entry)

    def write_run_json(status: str, failed: Mapping[str, int] | None = None) -> None:
        write_json(
            run_dir / "run.json",
            {
                "status": status,
                "failed": dict(failed) if failed is not None else None,
                "command": command,
                "commands": commands,
                "suite": suite.describe(eval_data),
                "models": all_models,
                "seeds": all_seeds,
                "seeds_per_model": seeds_per_model,
                "profile": asdict(prof),
                "match_accuracy": match_accuracy,
                "match_tolerance": prof.match_tolerance if match_accuracy is not None else None,
                "match_rule": None if match_accuracy is None else (
                    "training stops at the first validation check whose accuracy reaches the target; "
                    f"checked every {TrainConfig.match_eval_every} steps, or after half the steps the steepest rise between two "
                    "checks so far would take to reach the target, if fewer (first on a class-stratified "
                    f"{MATCH_FAR_SUBSET}-digit subset, on the whole split once that subset is within "
                    f"{100 * NEAR_TARGET:g} points of the target), every {max(1, TrainConfig.match_eval_every // NEAR_EVERY)} "
                    f"steps on the whole split once it is within {100 * NEAR_TARGET:g} points; a check past the "
                    "target plus the tolerance sends training back to the previous check (model, optimiser and "
                    "schedule kept in memory), which then replays the same batches with a check after every "
                    f"step; where one step jumps past the band, checks go on after every step for up to "
                    f"{MATCH_SEARCH_STEPS} steps and the stop is the first step inside it; matched if the "
                    f"accuracy at the stop is within {100 * prof.match_tolerance:g} point above the target"),
                "amp": amp,
                "epochs": epochs,
                "lr": {**(previous.get("lr") or {}), **lrs},
                "eval_images_per_cell": n_eval,
                # which images train, select and score: enough to score any cell again
                "splits": splits,
                "train_data_rule": "every job trains on the training set minus the validation split; "
                                   "anything that selects (--match-accuracy) reads the validation split; "
                                   "test images are read only to score cells",
                "device": str(dev),
                "executor": executor,
                "deterministic": deterministic,
                "determinism_flags": flags,
                "speed_options": speed,
                "environment": env,
                "data_root": str(resolve_data_root(data_root)),
                "data_checksums": sums,
                "jobs": list(jobs.values()),
            },
        )

    specs: list[JobSpec] = []
    for cfg, base in planned:
        key = cfg.key
        todo = [c.name for c in suite.cells if not set(cell_metrics(suite, c)) <= metrics.get((key, c.name), set())]
        needs = {"params"} if cfg.checkpoint is not None else train_metrics
        if not todo and needs <= metrics.get((key, "train"), set()):
            log(f"{base['model']} seed {cfg.seed}: all {len(suite.cells)} cells already evaluated")
            add_job(key, {"model": base["model"], "seed": cfg.seed, "job_key": key, "reused": True})
            continue
        specs.append(JobSpec(cfg, base, todo))  # no cell left: the job's own rows are rewritten

    write_run_json("running")
    t0 = time.perf_counter()
    ctx = RunContext(
        suite=suite.name, out=str(out), run_dir=str(run_dir),
        data_root=str(resolve_data_root(data_root)), device=str(dev), n_eval=n_eval,
        eval_indices=evaluation.get("indices"),
        deterministic=deterministic, progress=progress,
        speed={**asdict(speed), "curve": False},
        extra={"plugins": {m: info["source"] for m, info in ((m, model_info(split_entry(m)[0])) for m in models)
                           if info.get("plugin") == "module:factory"}},
    )
    runner = make_executor(executor, log=log, address=ray_address, cpus_per_task=cpus_per_task) \
        if executor == "ray" else make_executor(executor, log=log)
    try:
        for kind, spec, payload in runner.run(specs, ctx):
            key = spec.base["job_key"]
            if kind == "train_failed":
                log(f"{spec.base['model']} seed {spec.base['seed']}: training failed: {payload}")
                rows = [r for r in rows if not (r["job_key"] == key and r["cell"] == "train")]
                rows.append({**spec.base, "eval_data": "none", "transform": "train", "cell": "train",
                             "metric": "train_error", "value": float("nan"), "n": 0, "error": payload})
                add_job(key, {"model": spec.base["model"], "seed": spec.base["seed"], "job_key": key, "error": payload})
                write_run_json("running")
            elif kind == "trained":
                payload = {**payload, "model": spec.base["model"]}  # the entry (capsnet@rot180), as in the rows
                add_job(key, payload)
                # Job rows first (replacing any from an earlier, interrupted run), then every
                # cell's rows as soon as the cell is done.
                rows = [r for r in rows if not (r["job_key"] == key and r["cell"] == "train")]
                rows.extend(_train_rows(payload, spec.base))
                write_run_json("running")
            else:
                # a cell evaluated again replaces its rows (an earlier run may have left some)
                new = {(r["job_key"], r["cell"]) for r in payload}
                rows = _with_direction_means(suite, [r for r in rows if (r["job_key"], r["cell"]) not in new] + payload)
            write_rows_csv(results_path, rows)
    finally:
        runner.close()
    failed = failures(rows)
    write_run_json("finished" if not any(failed.values()) else "finished_with_failures", failed)
    log(f"{suite.name}: done in {time.perf_counter() - t0:.0f} s; results in {results_path}")
    return run_dir


def failures(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How many training jobs and evaluation cells of a run folder's rows failed (their
    error rows: ``train_error`` for a job, ``error`` for a cell)."""
    jobs = {r["job_key"] for r in rows if r.get("metric") == "train_error"}
    cells = {(r["job_key"], r["cell"]) for r in rows if r.get("metric") == "error"}
    return {"jobs": len(jobs), "cells": len(cells)}


# Settings recorded in run.json that change what a run's jobs compute (their job keys, or
# the images each cell is evaluated on): a folder holds one value of each.
PROFILE_SETTINGS = ("steps", "epochs", "batch_size", "protocol_scale", "lr_schedule", "lr", "lr_per_model")
PER_MODEL_SETTINGS = ("steps", "lr_per_model")  # {model or "*": value}


def _read_run_json(run_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """The run.json of earlier runs into ``run_dir`` ({} when none); a damaged one is set aside."""
    path = run_dir / "run.json"
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        meta = None
    if isinstance(meta, dict):
        return meta
    kept = path.with_name("run.json.damaged")
    path.replace(kept)
    log(f"{path} is damaged (not a JSON object); kept it as {kept.name} and started a new record of the runs")
    return {}


def _fmt(v: Any) -> str:
    return "unset" if v is None else json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)


def _refuse(run_dir: Path, what: str) -> ConfigError:
    return ConfigError(f"{run_dir} holds a run with other settings ({what}); its results and this run's would mix: "
                       f"use another --out, or delete {run_dir} to start afresh")


def _check_same_settings(run_dir: Path, previous: Mapping[str, Any], suite: Suite, prof,
                         evaluation: Mapping[str, Any], match_accuracy: float | None, amp: str | None,
                         lrs: Mapping[str, float], models: Sequence[str], epochs: float | None = None) -> None:
    """Refuse to run into a folder whose run.json records other job-defining settings."""
    if not previous:
        return
    now: dict[str, Any] = {"match_accuracy": match_accuracy, "amp": amp, "eval_images_per_cell": evaluation["n"],
                           "epochs": epochs}
    then: dict[str, Any] = {k: previous[k] for k in now if k in previous}
    # the test images the cells score: a folder from before random subsets scored a prefix
    old_eval = (previous.get("splits") or {}).get("evaluation") or {}
    then["evaluation images"] = old_eval.get("sha256", "all images" if old_eval.get("rule") == "all images"
                                             else "the first images in file order")
    now["evaluation images"] = evaluation.get("sha256", "all images")
    old_suite = previous.get("suite") or {}
    if "dataset" in old_suite and "protocol" in old_suite:
        then["training data"] = f"{old_suite['dataset']}:{old_suite['protocol']}"
        now["training data"] = f"{suite.dataset}:{suite.protocol}"
    old_prof, new_prof = previous.get("profile") or {}, json.loads(json.dumps(asdict(prof)))
    old_models = sorted({split_entry(m)[0] for m in previous.get("models") or []})
    for f in PROFILE_SETTINGS:
        if f not in old_prof:
            continue
        old_v, new_v = old_prof[f], new_prof.get(f)
        if f in PER_MODEL_SETTINGS and old_models and isinstance(old_v, dict) and isinstance(new_v, dict):
            # a budget or rate given to another model (one new in the registry) changes none of
            # the folder's results: compare the models the folder has
            for m in old_models:
                then[f"profile {f} of {m}"], now[f"profile {f} of {m}"] = (old_v.get(m, old_v.get("*")),
                                                                         new_v.get(m, new_v.get("*")))
        else:
            then[f"profile {f}"], now[f"profile {f}"] = old_v, new_v
    if isinstance(previous.get("lr"), dict):  # per model, for the models both runs train
        for m in (m for m in models if m in (previous.get("models") or [])):
            then[f"lr of {m}"], now[f"lr of {m}"] = previous["lr"].get(m), lrs.get(m)
    diffs = [f"{k}: {_fmt(then[k])} there, {_fmt(now[k])} now" for k in then if then[k] != now[k]]
    if diffs:
        raise _refuse(run_dir, "; ".join(diffs))


def _check_same_jobs(run_dir: Path, rows: Sequence[Mapping[str, Any]],
                     planned: Sequence[tuple[TrainConfig, Mapping[str, Any]]]) -> None:
    """Refuse when the folder's rows hold a model and seed of this run under another job key.

    Catches what run.json does not record (a profile or model changed in the code; a run.json
    from before settings were recorded).
    """
    want = {(base["model"], base["seed"]): base["job_key"] for _, base in planned}
    for r in rows:
        key = want.get((r["model"], r["seed"]))
        if key is not None and r["job_key"] != key:
            raise _refuse(run_dir, f"{r['model']} seed {r['seed']} there is job {r['job_key']}, now it is job {key}: "
                                   "the profile, the model's code or a training setting changed")


def _merged_job(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """run.json's entry of a job: a reused job keeps the entry of the run that trained it, under
    the name this run gives it (an entry such as ``capsnet@rot180``, not only the model)."""
    if old is not None and new.get("reused") and old.get("job_dir") and not old.get("error"):
        return {**old, "model": new.get("model", old.get("model"))}
    return new


def _train_rows(meta: dict[str, Any], base: dict[str, Any]) -> list[dict[str, Any]]:
    common = {**base, "eval_data": "none", "transform": "train", "cell": "train", "error": ""}
    if meta.get("checkpoint"):  # trained elsewhere: no training here to describe
        return [{**common, "metric": "params", "value": float(meta["params"]), "n": 1}]
    out = [
        {**common, "metric": "params", "value": float(meta["params"]), "n": 1},
        {**common, "metric": "train_steps", "value": float(meta["steps"]), "n": 1},
        {**common, "metric": "train_time_s", "value": float(meta["train_time_s"]), "n": 1},
    ]
    if meta.get("match_accuracy") is not None:
        stop = meta.get("stopped_early_at")
        out.append({**common, "metric": "matched_at_step", "value": float(stop) if stop else float("nan"), "n": 1})
        acc = meta.get("match_val_accuracy")
        n_val = ((meta.get("split") or {}).get("validation") or {}).get("n", 0)
        out.append({**common, "metric": "match_val_accuracy", "value": float("nan") if acc is None else float(acc),
                    "n": int(n_val)})
    if meta.get("oom_retries"):  # trained at a smaller batch size than planned
        out.append({**common, "metric": "train_batch_size", "value": float(meta["batch_size"]), "n": 1})
        out.append({**common, "metric": "oom_retries", "value": float(len(meta["oom_retries"])), "n": 1})
    return out


def _with_direction_means(suite: Suite, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rotation suites: add the mean of the clockwise and counter-clockwise rows per angle."""
    if suite.cells[0].transform != "rotation":
        return rows
    rows = [r for r in rows if r.get("direction") != "mean"]
    by_key: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("transform") == "rotation" and r.get("direction") in ("cw", "ccw") and not _has_error(r):
            by_key.setdefault((r["job_key"], r["angle"], r["metric"]), []).append(r)
    for (_, angle, _), pair in by_key.items():
        if len(pair) != 2:
            continue
        a, b = pair
        same = int(angle) % 180 == 0  # +180 and -180 degrees: the same images, counted once
        rows.append({**a, "cell": f"rot±{int(angle)}", "direction": "mean",
                     "value": (a["value"] + b["value"]) / 2, "n": a["n"] if same else a["n"] + b["n"]})
    return rows


__all__ = ["run_suite", "PROTOCOLS"]
