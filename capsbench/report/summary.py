"""The long summary table: per suite, cell, model and metric, the mean over seeds and its interval."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from capsbench.report.load import METRIC_ORDER, PROPORTION_METRICS, Run
from capsbench.report.stats import t_half_width, wilson_interval


def summarize(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per run, cell, model and metric: mean over seeds, t CI, Wilson interval, context."""
    frames = []
    for run in runs:
        ok = run.ok_rows()
        if ok.empty:
            continue
        grid = run.grid_columns
        keys = ["run_id", "suite", "cell", "model", "metric"]
        agg: dict[str, Any] = {
            "transform": ("transform", "first"),
            "eval_data": ("eval_data", "first"),
            "n_seeds": ("value", "count"),
            "mean": ("value", "mean"),
            "sd": ("value", "std"),
            "n_images": ("n", "min"),
        }
        for c in grid:
            agg[c] = (c, "first")
        g = ok.groupby(keys, sort=False, dropna=False).agg(**agg).reset_index()
        half = ok.groupby(keys, sort=False, dropna=False)["value"].agg(t_half_width).reset_index(drop=True)
        g["ci_half"] = half.to_numpy()
        bounded = g["metric"].isin(PROPORTION_METRICS + ("confidence",)).to_numpy()  # values in [0, 1]
        g["ci_low"] = np.where(bounded, (g["mean"] - g["ci_half"]).clip(lower=0), g["mean"] - g["ci_half"])
        g["ci_high"] = np.where(bounded, (g["mean"] + g["ci_half"]).clip(upper=1), g["mean"] + g["ci_half"])
        g["ci_seeds"] = [
            "n/a (1 seed)" if k < 2 else f"t 95% over {k} seeds" for k in g["n_seeds"]
        ]
        wl, wh = [], []
        for _, r in g.iterrows():
            if r["n_seeds"] == 1 and r["metric"] in PROPORTION_METRICS:
                lo, hi = wilson_interval(float(r["mean"]), float(r["n_images"]))
            else:
                lo, hi = float("nan"), float("nan")
            wl.append(lo)
            wh.append(hi)
        g["wilson_low"], g["wilson_high"] = wl, wh
        params = _params(run)
        clean = _clean_accuracy(run)
        g["params"] = g["model"].map(params)
        g["clean_accuracy"] = g["model"].map(clean)
        g["clean_cell"] = run.clean_cell
        rank = _cell_rank(run, ok)
        g["_rank"] = g["cell"].map(rank)
        g["_mrank"] = g["metric"].map(lambda m: METRIC_ORDER.index(m) if m in METRIC_ORDER else 99)
        g = g.sort_values(["_rank", "_mrank", "model"], kind="stable").drop(columns=["_rank", "_mrank"])
        frames.append(g)
    if not frames:
        return pd.DataFrame(columns=["run_id", "suite", "cell", "model", "metric", "n_seeds", "mean", "ci_half"])
    return pd.concat(frames, ignore_index=True)


def _params(run: Run) -> dict[str, float]:
    df = run.rows
    p = df[(df["cell"] == "train") & (df["metric"] == "params")].groupby("model")["value"].first().to_dict()
    for job in run.meta.get("jobs", []) or []:
        if job.get("params") and job.get("model") not in p:
            p[job["model"]] = float(job["params"])
    return p


def _clean_accuracy(run: Run) -> dict[str, float]:
    cell = run.clean_cell
    if cell is None:
        return {}
    ok = run.ok_rows()
    sub = ok[(ok["cell"] == cell) & (ok["metric"] == "accuracy")]
    return sub.groupby("model")["value"].mean().to_dict()


def _cell_rank(run: Run, ok: pd.DataFrame) -> dict[str, float]:
    order = {name: float(i) for i, name in enumerate(run.cell_names)}
    extra = [c for c in ok["cell"].unique() if c not in order]
    for i, c in enumerate(extra):
        row = ok[ok["cell"] == c].iloc[0]
        if row.get("direction") == "mean" and "angle" in ok.columns:
            same = ok[(ok["angle"] == row["angle"]) & (ok["cell"].isin(list(order)))]["cell"].unique()
            if len(same):
                order[c] = max(order[s] for s in same) + 0.5
                continue
        order[c] = len(run.cell_names) + i
    return order
