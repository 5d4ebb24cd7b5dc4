"""``leaderboard.csv`` / ``leaderboard.json``: one row per model and run, plain numbers for a
script or a paper's table.

Accuracies are in percent, with 95% intervals that count both sources of doubt once each (which
test images were drawn, how training went seed to seed: :func:`capsbench.report.stats.two_way_mean`
on the images x seeds table of per-image correctness), rounded to 0.01 point; with one seed the
interval holds the test images only (``ci_note`` says so). ``robust_accuracy_pct`` is the mean
over the suite's transformed cells (each distinct rotation once: +-180 degrees pooled).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

import numpy as np
import pandas as pd

from capsbench.report.claims import select_cells
from capsbench.report.load import Run
from capsbench.report.stats import by_seed, two_way_mean
from capsbench.report.summary import _params
from capsbench.train.protocols import split_entry

COLUMNS = [
    "run_id", "suite", "model", "family", "seeds", "params", "gflops_per_image",
    "clean_accuracy_pct", "clean_ci_low_pct", "clean_ci_high_pct",
    "robust_accuracy_pct", "robust_ci_low_pct", "robust_ci_high_pct", "robust_cells",
    "train_images_per_s", "train_time_s", "hardware", "ci_note",
]


def _round_sig(x: float, digits: int = 3) -> float:
    if x is None or not math.isfinite(x) or x == 0:
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _accuracy(run: Run, model: str, cells: Sequence[str]) -> tuple[float, float, float, int]:
    """Mean accuracy (percent) over ``cells`` with its 95% interval, and the seeds it rests on:
    each seed's per-image correctness averaged over the cells, then the images x seeds table."""
    units, seeds = [], []
    for seed in run.seeds(model):
        got = [run.predictions(model, seed, c) for c in cells]
        if not cells or any(p is None for p in got):
            continue  # a seed without every cell's predictions would tilt the mean
        units += [(p["pred"] == p["label"]).astype(float) for p in got]
        seeds += [seed] * len(got)
    if not units:
        return float("nan"), float("nan"), float("nan"), 0
    res = two_way_mean(by_seed(units, seeds))
    mean, half = 100 * res["difference"], 100 * res["half_width"]
    lo, hi = (max(0.0, mean - half), min(100.0, mean + half)) if math.isfinite(half) else (math.nan, math.nan)
    return round(mean, 2), round(lo, 2), round(hi, 2), len(set(seeds))


@cache
def _gflops(model: str, input_size: int) -> float:
    """GFLOPs of one inference pass per image (the architecture's count: capsbench.perf.flops),
    NaN when the model cannot be built here (a plug-in that is not installed)."""
    try:
        from capsbench.models import create_model
        from capsbench.perf.flops import count_flops

        flops, _ = count_flops(create_model(model, input_size=input_size), train=False, batch_size=2)
    except Exception:  # the leaderboard goes on without it
        return float("nan")
    return _round_sig(flops / 1e9, 3)


def _family(model: str) -> str:
    try:
        from capsbench.models import model_info

        return str(model_info(model).get("family", ""))
    except Exception:
        return ""


def _input_size(run: Run) -> int | None:
    try:
        from capsbench.train.protocols import PROTOCOLS

        return PROTOCOLS.get(run.suite_meta.get("protocol")).input_size
    except Exception:
        return None


def _hardware(run: Run) -> str:
    """Where the run scored (and, unless its jobs were reused, trained): the GPU's name, or the
    CPU's model with the instruction set it ran with (``avx2`` where CAPSBENCH_CPU_ISA capped it)."""
    env = run.meta.get("environment") or {}
    if not isinstance(env, dict):
        return ""
    if str(env.get("device", "")).startswith("cuda"):
        return str(env.get("device_name", "cuda"))
    isa = env.get("cpu_isa") if isinstance(env.get("cpu_isa"), dict) else {}
    name = str(isa.get("cpu_model") or env.get("processor") or "")
    if isa:
        name += f" ({isa['limit'] if isa.get('limit', 'native') != 'native' else isa.get('hardware', '?')})"
    return name.strip()


def leaderboard(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per run and model (the columns of ``COLUMNS``)."""
    rows = []
    for run in runs:
        if not run.suite_meta.get("cells"):
            continue  # a profile or speed run: no cells to score
        robust_cells = select_cells("transformed", run)
        params = _params(run)
        size = _input_size(run)
        jobs = [j for j in run.meta.get("jobs", []) or [] if isinstance(j, dict)]
        for model in run.models():
            clean = _accuracy(run, model, [run.clean_cell] if run.clean_cell else [])
            robust = _accuracy(run, model, robust_cells)
            mine = [j for j in jobs if j.get("model") == model and not j.get("error")]
            speed = [float(j["images_per_s"]) for j in mine if j.get("images_per_s")]
            times = [float(j["train_time_s"]) for j in mine if j.get("train_time_s")]
            n_seeds = max(clean[3], robust[3])
            rows.append({
                "run_id": run.label, "suite": run.suite, "model": model, "family": _family(split_entry(model)[0]),
                "seeds": n_seeds,
                "params": int(params[model]) if model in params and math.isfinite(params[model]) else None,
                "gflops_per_image": _gflops(split_entry(model)[0], size) if size else float("nan"),
                "clean_accuracy_pct": clean[0], "clean_ci_low_pct": clean[1], "clean_ci_high_pct": clean[2],
                "robust_accuracy_pct": robust[0], "robust_ci_low_pct": robust[1], "robust_ci_high_pct": robust[2],
                "robust_cells": len(robust_cells),
                "train_images_per_s": _round_sig(float(np.mean(speed)), 3) if speed else float("nan"),
                "train_time_s": round(float(np.mean(times)), 1) if times else float("nan"),
                "hardware": _hardware(run),
                "ci_note": ("test images and seeds" if n_seeds >= 2 else
                            "test images only (1 seed: training variance unknown)" if n_seeds else ""),
            })
    return pd.DataFrame(rows, columns=COLUMNS)


def write_leaderboard(table: pd.DataFrame, out_dir) -> list:
    """``leaderboard.csv`` and ``leaderboard.json`` (a list of records, NaN as null) in ``out_dir``."""
    from pathlib import Path

    from capsbench.store import atomic_write_text

    out = Path(out_dir)
    csv = atomic_write_text(out / "leaderboard.csv", table.to_csv(index=False))
    js = atomic_write_text(out / "leaderboard.json", table.to_json(orient="records", indent=1) + "\n")
    return [csv, js]
