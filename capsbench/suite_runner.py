"""``capsbench run --suite NAME``: train what a suite needs, evaluate every cell, write rows.

Layout of ``--out`` (default ``runs/``)::

    runs/jobs/<job>/checkpoint.pt, job.json      training jobs, shared by every suite and run
    runs/<suite>-<profile>/results.csv           tidy rows, rewritten atomically after each cell
    runs/<suite>-<profile>/run.json              resolved suite, configuration, provenance
    runs/<suite>-<profile>/predictions/<job>/<cell>.pt   per-image predictions (paired tests)

A second run into the same folder finds the finished jobs and cells and recomputes nothing.
A cell that fails writes a row with its error and the run goes on.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from capsbench.data import data_checksums, ensure_dataset, resolve_data_root
from capsbench.errors import CapsbenchError, ConfigError
from capsbench.models import count_parameters, list_models
from capsbench.profiles import get_profile
from capsbench.runner import (
    PROTOCOLS,
    TrainConfig,
    TrainResult,
    predict,
    resolve_device,
    to_float,
    train,
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
) -> Path:
    """Run a suite end to end and return its run directory (see the module docstring)."""
    suite = get_suite(suite_name)
    prof = get_profile(profile)
    models = list(models or suite.default_models)
    known = list_models()
    unknown = [m for m in models if m not in known]
    if unknown:
        raise ConfigError(f"unknown model(s) {', '.join(unknown)}; known models: {', '.join(known)}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    dev = resolve_device(device)
    out = ensure_writable_dir(out)
    run_dir = ensure_writable_dir(out / f"{suite.name}-{prof.name}")
    # Data first (fetching it when online), so a missing data set stops before any work.
    test = ensure_dataset(suite.dataset, root=data_root, split="test")
    ensure_dataset(suite.dataset, root=data_root, split="train")
    sums = data_checksums(suite.dataset, root=data_root)
    data_tag = stable_hash(sums, 16)
    n_eval = min(prof.eval_images or test.images.shape[0], test.images.shape[0])
    x_clean = to_float(test.images[:n_eval])
    y = test.labels[:n_eval]
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
                "environment": env,
                "data_root": str(resolve_data_root(data_root)),
                "data_checksums": sums,
                "jobs": jobs_meta,
            },
        )

    write_run_json("running")
    t0 = time.perf_counter()
    for model_name in models:
        for seed in range(seeds):
            cfg = TrainConfig(
                model=model_name,
                dataset=suite.dataset,
                protocol=suite.protocol,
                profile=prof.name,
                seed=seed,
                match_accuracy=match_accuracy,
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
            todo = [c for c in suite.cells if (cfg.key, c.name) not in done]
            if not todo:
                log(f"{model_name} seed {seed}: all {len(suite.cells)} cells already evaluated")
                jobs_meta.append({"model": model_name, "seed": seed, "job_key": cfg.key, "reused": True})
                continue
            try:
                result = train(cfg, out=out, data_root=data_root, device=dev, progress=progress, log=log)
            except (CapsbenchError, torch.OutOfMemoryError) as e:
                log(f"{model_name} seed {seed}: training failed: {e}")
                rows.append({**base, "eval_data": "none", "transform": "train", "cell": "train", "metric": "train_error",
                             "value": float("nan"), "n": 0, "error": str(e)})
                write_rows_csv(results_path, rows)
                jobs_meta.append({"model": model_name, "seed": seed, "job_key": cfg.key, "error": str(e)})
                continue
            jobs_meta.append(_job_meta(result))
            write_run_json("running")
            # Job rows first (replacing any from an earlier, interrupted run), then every
            # cell's rows are written as soon as the cell is done.
            rows = [r for r in rows if not (r["job_key"] == cfg.key and r["cell"] == "train")]
            rows.extend(_train_rows(result, base, n_eval))

            def persist(cell_rows: list[dict[str, Any]]) -> None:
                nonlocal rows
                rows = _with_direction_means(suite, rows + cell_rows)
                write_rows_csv(results_path, rows)

            ctx = {"n": n_eval, "cache_dir": out / "cache", "root": data_root}
            evaluate_cells(suite, result, todo, x_clean, y, run_dir, base, dev, log, ctx, persist)
    write_run_json("finished")
    log(f"{suite.name}: done in {time.perf_counter() - t0:.0f} s; results in {results_path}")
    return run_dir


def _job_meta(result: TrainResult) -> dict[str, Any]:
    return {
        "model": result.config.model,
        "seed": result.config.seed,
        "job_key": result.config.key,
        "job_dir": str(result.job_dir),
        "steps": result.steps_done,
        "train_time_s": result.train_time_s,
        "images_per_s": result.images_per_s,
        "stopped_early_at": result.stopped_early_at,
        "reused": result.reused,
        "params": count_parameters(result.model),
    }


def _train_rows(result: TrainResult, base: dict[str, Any], n_eval: int) -> list[dict[str, Any]]:
    common = {**base, "eval_data": "none", "transform": "train", "cell": "train", "error": ""}
    out = [
        {**common, "metric": "params", "value": float(count_parameters(result.model)), "n": 1},
        {**common, "metric": "train_steps", "value": float(result.steps_done), "n": 1},
        {**common, "metric": "train_time_s", "value": float(result.train_time_s), "n": 1},
    ]
    if result.config.match_accuracy is not None:
        stop = result.stopped_early_at
        out.append({**common, "metric": "matched_at_step", "value": float(stop) if stop else float("nan"), "n": 1})
    return out


def _predictions_dir(run_dir: Path, result: TrainResult) -> Path:
    cfg = result.config
    return run_dir / "predictions" / f"{cfg.model}-s{cfg.seed}-{cfg.key}"


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
    pred_dir = _predictions_dir(run_dir, result)
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
        rows.append({**a, "cell": f"rot±{int(angle)}", "direction": "mean",
                     "value": (a["value"] + b["value"]) / 2, "n": a["n"] + b["n"]})
    return rows


__all__ = ["run_suite", "evaluate_cells", "load_predictions", "PROTOCOLS"]
