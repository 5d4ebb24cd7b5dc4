"""``capsbench run --suite NAME``: train what a suite needs, evaluate every cell, write rows.

Layout of ``--out`` (default ``runs/``)::

    runs/jobs/<job>/checkpoint.pt, job.json      training jobs, shared by every suite and run
    runs/<suite>-<profile>/results.csv           tidy rows, rewritten atomically after each cell
    runs/<suite>-<profile>/run.json              resolved suite, configuration, provenance
    runs/<suite>-<profile>/predictions/<job>/<cell>.pt   per-image predictions (paired tests)
    runs/<suite>-<profile>/.lock, runs/jobs/<job>/.lock   held while a run / a training job is live

A second run into the same folder finds the finished jobs and cells and recomputes nothing;
a run killed at any moment (even by SIGKILL) is completed by running it again: finished jobs
and cells are kept, an interrupted job resumes from its last checkpoint, and the temporary
files of interrupted writes are removed. A run directory is locked while a run uses it (a
second run into it fails naming the holder). A cell that fails writes a row with its error,
a job that cannot be trained (NaN loss, out of memory at every batch size) writes an error row,
and the run goes on.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from capsbench.data import data_checksums, ensure_dataset, load_affnist_test, resolve_data_root
from capsbench.errors import CapsbenchError, ConfigError
from capsbench.executors import EXECUTORS, JobSpec, RunContext, make_executor
from capsbench.locks import DirLock, remove_partial_files
from capsbench.models import list_models
from capsbench.profiles import get_profile
from capsbench.runner import (
    PROTOCOLS,
    SpeedOptions,
    TrainConfig,
    TrainResult,
    check_device_options,
    determinism_flags,
    predict,
    resolve_device,
    set_deterministic,
)
from capsbench.store import (
    atomic_torch_save,
    ensure_writable_dir,
    environment_info,
    stable_hash,
    write_json,
    write_rows_csv,
)
from capsbench.suites import Suite, cell_generator, get_suite


def _has_error(row: dict[str, Any]) -> bool:
    # rows read back from CSV carry NaN (not "") where there was no error
    err = row.get("error")
    return isinstance(err, str) and bool(err)


def _load_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    import pandas as pd

    try:
        df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except Exception as e:
        raise CapsbenchError(f"{path}: cannot read earlier results ({e}); move the file away to start afresh") from None
    return df.to_dict("records")


def run_suite(
    suite_name: str,
    models: Sequence[str] | None = None,
    seeds: int = 1,
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
) -> Path:
    """Run a suite end to end and return its run directory (see the module docstring).

    ``executor``: ``local`` (this process) or ``ray`` (see :mod:`capsbench.executors`).
    ``deterministic``: reproducible kernels (:func:`capsbench.runner.set_deterministic`).
    ``lr``: learning rate for every model, or per model name (others keep the profile's).
    ``amp``: ``"bf16"`` trains under bf16 autocast (CUDA; part of each job's key).
    ``speed``: how training runs on the device (:class:`capsbench.runner.SpeedOptions`; the
    learning curve option is ignored here).
    """
    suite = get_suite(suite_name)
    prof = get_profile(profile)
    models = list(models or suite.default_models)
    known = list_models()
    unknown = [m for m in models if m not in known]
    if unknown:
        raise ConfigError(f"unknown model(s) {', '.join(unknown)}; known models: {', '.join(known)}")
    if seeds < 1:
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
        TrainConfig(model=model_name, dataset=suite.dataset, protocol=suite.protocol, profile=prof.name,
                    match_accuracy=match_accuracy, amp=amp).validate()
    # Data next (fetching it when online), so a missing or damaged file stops before any work;
    # a real affNIST file present under the root must be readable too.
    test = ensure_dataset(suite.dataset, root=data_root, split="test")
    ensure_dataset(suite.dataset, root=data_root, split="train")
    if any(c.eval_data == "affnist" for c in suite.cells):
        load_affnist_test(data_root)
    out = ensure_writable_dir(out)
    run_dir = ensure_writable_dir(out / f"{suite.name}-{prof.name}")
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    with DirLock(run_dir, "run directory", command=command):
        removed = remove_partial_files(run_dir)
        if removed:
            log(f"removed {len(removed)} partial file(s) left by an interrupted run in {run_dir}")
        try:
            return _run_locked(suite, prof, models, seeds, dev, out, run_dir, test, data_root, match_accuracy,
                               progress, log, command, executor, ray_address, cpus_per_task, deterministic, lrs,
                               amp, speed)
        finally:
            if deterministic and not was_deterministic:
                set_deterministic(False)


def _run_locked(suite, prof, models, seeds, dev, out, run_dir, test, data_root, match_accuracy,
                progress, log, command, executor, ray_address, cpus_per_task, deterministic, lrs,
                amp, speed) -> Path:
    sums = data_checksums(suite.dataset, root=data_root)
    data_tag = stable_hash(sums, 16)
    n_eval = min(prof.eval_images or test.images.shape[0], test.images.shape[0])
    flags = set_deterministic(True) if deterministic else determinism_flags()
    env = environment_info(dev)

    results_path = run_dir / "results.csv"
    rows = _load_rows(results_path)
    done = {(r["job_key"], r["cell"]) for r in rows if not _has_error(r)}
    rows = [r for r in rows if (r["job_key"], r["cell"]) in done]  # failed cells are retried
    jobs_meta: list[dict[str, Any]] = []

    def write_run_json(status: str) -> None:
        write_json(
            run_dir / "run.json",
            {
                "status": status,
                "command": command,
                "suite": suite.describe(),
                "models": models,
                "seeds": seeds,
                "profile": asdict(prof),
                "match_accuracy": match_accuracy,
                "eval_images_per_cell": n_eval,
                "device": str(dev),
                "executor": executor,
                "deterministic": deterministic,
                "determinism_flags": flags,
                "amp": amp,
                "speed_options": speed,
                "environment": env,
                "data_root": str(resolve_data_root(data_root)),
                "data_checksums": sums,
                "jobs": jobs_meta,
            },
        )

    specs: list[JobSpec] = []
    for model_name in models:
        for seed in range(seeds):
            cfg = TrainConfig(
                model=model_name,
                dataset=suite.dataset,
                protocol=suite.protocol,
                profile=prof.name,
                seed=seed,
                match_accuracy=match_accuracy,
                amp=amp,
                **({"lr": float(lrs[model_name])} if model_name in lrs else {}),
            ).validate()
            base = {
                "run_id": run_dir.name,
                "suite": suite.name,
                "model": model_name,
                "seed": seed,
                "train_data": f"{suite.dataset}:{suite.protocol}",
                "profile": prof.name,
                "device": str(dev),
                "git_sha": env["git_sha"],
                "data_sha256": data_tag,
                "job_key": cfg.key,
            }
            todo = [c.name for c in suite.cells if (cfg.key, c.name) not in done]
            if not todo:
                log(f"{model_name} seed {seed}: all {len(suite.cells)} cells already evaluated")
                jobs_meta.append({"model": model_name, "seed": seed, "job_key": cfg.key, "reused": True})
                continue
            specs.append(JobSpec(cfg, base, todo))

    write_run_json("running")
    t0 = time.perf_counter()
    ctx = RunContext(
        suite=suite.name, out=str(out), run_dir=str(run_dir),
        data_root=str(resolve_data_root(data_root)), device=str(dev), n_eval=n_eval,
        deterministic=deterministic, progress=progress,
        speed={**asdict(speed), "curve": False},
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
                jobs_meta.append({"model": spec.base["model"], "seed": spec.base["seed"], "job_key": key,
                                  "error": payload})
                write_run_json("running")
            elif kind == "trained":
                jobs_meta.append(payload)
                # Job rows first (replacing any from an earlier, interrupted run), then every
                # cell's rows as soon as the cell is done.
                rows = [r for r in rows if not (r["job_key"] == key and r["cell"] == "train")]
                rows.extend(_train_rows(payload, spec.base))
                write_run_json("running")
            else:
                rows = _with_direction_means(suite, rows + payload)
            write_rows_csv(results_path, rows)
    finally:
        runner.close()
    write_run_json("finished")
    log(f"{suite.name}: done in {time.perf_counter() - t0:.0f} s; results in {results_path}")
    return run_dir


def _train_rows(meta: dict[str, Any], base: dict[str, Any]) -> list[dict[str, Any]]:
    common = {**base, "eval_data": "none", "transform": "train", "cell": "train", "error": ""}
    out = [
        {**common, "metric": "params", "value": float(meta["params"]), "n": 1},
        {**common, "metric": "train_steps", "value": float(meta["steps"]), "n": 1},
        {**common, "metric": "train_time_s", "value": float(meta["train_time_s"]), "n": 1},
    ]
    if meta.get("match_accuracy") is not None:
        stop = meta.get("stopped_early_at")
        out.append({**common, "metric": "matched_at_step", "value": float(stop) if stop else float("nan"), "n": 1})
    if meta.get("oom_retries"):  # trained at a smaller batch size than planned
        out.append({**common, "metric": "train_batch_size", "value": float(meta["batch_size"]), "n": 1})
        out.append({**common, "metric": "oom_retries", "value": float(len(meta["oom_retries"])), "n": 1})
    return out


def _predictions_dir(run_dir: Path, base: dict[str, Any], result: TrainResult) -> Path:
    # keyed like the rows (the planned job), even when an out-of-memory retry trained another
    cfg = result.config
    model, seed, key = base.get("model", cfg.model), base.get("seed", cfg.seed), base.get("job_key", cfg.key)
    return run_dir / "predictions" / f"{model}-s{seed}-{key}"


def load_predictions(run_dir: Path, model: str, seed: int, job_key: str, cell: str) -> dict[str, torch.Tensor] | None:
    """Per-image predictions of a finished cell (for paired tests), or None."""
    path = Path(run_dir) / "predictions" / f"{model}-s{seed}-{job_key}" / f"{cell}.pt"
    if not path.exists():
        return None
    return torch.load(path, weights_only=True)


def evaluate_cells(
    suite: Suite,
    result: TrainResult,
    cells: Sequence,
    x_clean: torch.Tensor,
    y: torch.Tensor,
    run_dir: Path,
    base: dict[str, Any],
    dev: torch.device,
    log: Callable[[str], None] = print,
    ctx: dict[str, Any] | None = None,
    persist: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate ``cells`` for one trained model; returns rows (errors become rows too).

    ``persist(rows)`` is called after each cell with that cell's rows, so an interrupted run
    keeps every finished cell.
    """
    pred_dir = _predictions_dir(run_dir, base, result)
    preds: dict[str, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    for cell in cells:
        eval_data = f"{suite.dataset}_test" if cell.eval_data == "test" else cell.eval_data
        cell_base = {**base, "eval_data": eval_data, "transform": cell.transform, "cell": cell.name, **cell.params}
        try:
            t = time.perf_counter()
            labels = y
            if cell.source is not None:  # a cell with its own test data (affNIST)
                x, labels, eval_data = cell.source(ctx or {})
                cell_base["eval_data"] = eval_data
            else:
                x = cell.make(x_clean.to(dev), y.to(dev), cell_generator(suite.name, cell.name))
            scores, conf = predict(result.model, x, device=dev, amp=result.config.amp)
            pred = scores.argmax(1)
            correct = pred == labels
            conf_true = conf.gather(1, labels.view(-1, 1)).squeeze(1)
            atomic_torch_save(
                {"pred": pred.to(torch.int16), "label": labels.to(torch.int16), "conf_true": conf_true.half()},
                pred_dir / f"{cell.name}.pt",
            )
            preds[cell.name] = pred
            n = int(labels.shape[0])
            values = {"accuracy": correct.float().mean().item(), "confidence": conf_true.mean().item()}
            if "unchanged" in suite.metrics and cell.reference is not None:
                ref = preds.get(cell.reference)
                if ref is None:
                    saved = torch.load(pred_dir / f"{cell.reference}.pt", weights_only=True)
                    ref = saved["pred"].long()
                values["unchanged"] = (pred == ref).float().mean().item()
            cell_rows = [{**cell_base, "metric": m, "value": float(v), "n": n, "error": ""} for m, v in values.items()]
            log(f"  {base['model']} s{base['seed']} {cell.name}: accuracy {values['accuracy']:.4f} "
                f"({time.perf_counter() - t:.1f} s)")
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # one broken cell must not cost the others
            msg = f"{type(e).__name__}: {e}"
            log(f"  {base['model']} s{base['seed']} {cell.name}: FAILED ({msg})")
            if os.environ.get("CAPSBENCH_DEBUG"):
                traceback.print_exc(file=sys.stderr)
            cell_rows = [{**cell_base, "metric": "error", "value": float("nan"), "n": 0, "error": msg}]
        rows.extend(cell_rows)
        if persist is not None:
            persist(cell_rows)
    return rows


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


__all__ = ["run_suite", "evaluate_cells", "load_predictions", "PROTOCOLS"]
