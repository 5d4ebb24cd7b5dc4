"""Where the accuracy goes, per suite: which digits survive a rotation, how well each model's
confidence is calibrated (within its family), and accuracy against parameters and FLOPs.

All numbers come from the per-image predictions (``predictions/<job>/<cell>.npz``), pooled over
a model's seeds; every figure is in percent.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from capsbench.report.claims import select_cells
from capsbench.report.figures import _model_order, _pyplot, _save
from capsbench.report.load import Run

ECE_BINS = 10


def _pooled(run: Run, model: str, cells: Sequence[str], keys: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The model's predictions on ``cells``, concatenated over cells and seeds (None if a key is
    missing from any file, e.g. ``conf_pred`` in runs written before it was stored)."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for seed in run.seeds(model):
        for cell in cells:
            p = run.predictions(model, seed, cell)
            if p is None:
                continue
            if not set(keys) <= set(p):
                return None
            for k in keys:
                parts[k].append(np.asarray(p[k]))
    if not parts[keys[0]]:
        return None
    return {k: np.concatenate(v) for k, v in parts.items()}


# --------------------------------------------------------------------------- per-class accuracy


def per_class_by_angle(run: Run, model: str) -> pd.DataFrame:
    """Accuracy (%) of each true class at each signed rotation angle, pooled over seeds:
    rows = class, columns = angle (counter-clockwise > 0)."""
    cells = [c for c in run.suite_meta.get("cells", []) or [] if c.get("transform") == "rotation"]
    out = {}
    for c in cells:
        p = _pooled(run, model, [c["name"]], ("pred", "label"))
        if p is None:
            continue
        params = c.get("params") or {}
        angle = float(params.get("angle", 0)) * (-1 if params.get("direction") == "cw" else 1)
        ok = p["pred"] == p["label"]
        out[angle] = pd.Series({int(k): 100 * ok[p["label"] == k].mean() for k in np.unique(p["label"])})
    return pd.DataFrame(out).sort_index(axis=1)


def fig_per_class_rotation(run: Run, path: Path) -> Path | None:
    models = [m for m in _model_order(run, run.ok_rows()) if not per_class_by_angle(run, m).empty]
    if not models:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(models), 1, figsize=(10, 2.3 * len(models) + 0.6), squeeze=False)
    im = None
    for ax, model in zip(axes[:, 0], models, strict=True):
        t = per_class_by_angle(run, model)
        im = ax.imshow(t.to_numpy(float), vmin=0, vmax=100, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(t.index)), [str(k) for k in t.index], fontsize=7)
        step = 2 if t.shape[1] > 13 else 1
        ax.set_xticks(range(0, t.shape[1], step), [f"{a:+.0f}" for a in t.columns[::step]], fontsize=7)
        ax.set_ylabel(f"{model}\ntrue digit", fontsize=8)
    axes[-1, 0].set_xlabel("rotation angle (degrees; counter-clockwise > 0)")
    fig.colorbar(im, ax=list(axes[:, 0]), shrink=0.8, label="accuracy (%)")
    fig.suptitle(f"{run.label}: accuracy of each digit under rotation (pooled over seeds)", fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------- calibration


def reliability(conf: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> tuple[pd.DataFrame, float]:
    """Reliability table (per confidence bin: count, mean confidence, accuracy, in %) and the
    expected calibration error, sum over bins of (n_b / N) |accuracy_b - confidence_b|, in points
    (Guo et al. 2017, equal-width bins on the predicted class's confidence)."""
    conf = np.clip(np.asarray(conf, dtype=float), 0, 1)
    correct = np.asarray(correct, dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        m = which == b
        if not m.any():
            continue
        acc, mean_conf = correct[m].mean(), conf[m].mean()
        ece += m.mean() * abs(acc - mean_conf)
        rows.append({"bin": b, "low": edges[b], "high": edges[b + 1], "n": int(m.sum()),
                     "confidence_pct": 100 * mean_conf, "accuracy_pct": 100 * acc})
    return pd.DataFrame(rows), 100 * ece


def calibration_table(run: Run, families: dict[str, str]) -> pd.DataFrame:
    """Per model: ECE (points) on the clean cell and on the suite's transformed cells, from the
    confidence of the predicted class. Empty when the run's predictions hold no ``conf_pred``."""
    transformed = select_cells("transformed", run)
    rows = []
    for model in run.models():
        row = {"model": model, "family": families.get(model, "")}
        for name, cells in (("clean", [run.clean_cell] if run.clean_cell else []), ("transformed", transformed)):
            p = _pooled(run, model, cells, ("pred", "label", "conf_pred")) if cells else None
            if p is None:
                row[f"ECE {name} (points)"] = float("nan")
                row[f"accuracy {name} (%)"] = float("nan")
                row[f"mean confidence {name} (%)"] = float("nan")
                continue
            correct = p["pred"] == p["label"]
            _, ece = reliability(p["conf_pred"], correct)
            row[f"ECE {name} (points)"] = round(ece, 2)
            row[f"accuracy {name} (%)"] = round(100 * correct.mean(), 2)
            row[f"mean confidence {name} (%)"] = round(100 * float(np.mean(p["conf_pred"], dtype=float)), 2)
        rows.append(row)
    t = pd.DataFrame(rows)
    if t.empty or t.filter(like="ECE").isna().all().all():
        return pd.DataFrame()
    return t


def fig_reliability(run: Run, families: dict[str, str], path: Path) -> Path | None:
    """Reliability diagrams on the transformed cells, one panel per model family (a capsule's
    length and a softmax probability are different quantities: compared within a family only)."""
    cells = select_cells("transformed", run)
    by_family: dict[str, list[tuple[str, pd.DataFrame, float]]] = {}
    for model in run.models():
        p = _pooled(run, model, cells, ("pred", "label", "conf_pred"))
        if p is None:
            continue
        table, ece = reliability(p["conf_pred"], p["pred"] == p["label"])
        by_family.setdefault(families.get(model, "?"), []).append((model, table, ece))
    if not by_family:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(by_family), figsize=(4.6 * len(by_family), 4.2), squeeze=False)
    for ax, (family, entries) in zip(axes[0], sorted(by_family.items()), strict=True):
        ax.plot([0, 100], [0, 100], color="grey", ls=":", lw=1, label="perfectly calibrated")
        for model, table, ece in entries:
            ax.plot(table["confidence_pct"], table["accuracy_pct"], marker="o", ms=3, label=f"{model} (ECE {ece:.1f})")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        ax.set_xlabel("confidence of the predicted class (%)" + (" = capsule length" if family == "capsule" else ""))
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"family: {family}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{run.label}: reliability on the transformed cells ({ECE_BINS} equal-width bins)", fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------- cost


def fig_accuracy_vs_cost(board: pd.DataFrame, run: Run, path: Path) -> Path | None:
    """Robust and clean accuracy (%) against parameters and GFLOPs per image, one point per model
    (from the leaderboard rows of ``run``), with the 95% interval of the robust accuracy."""
    rows = board[board["run_id"] == run.label].dropna(subset=["robust_accuracy_pct"])
    if rows.empty:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, col, label in ((axes[0], "params", "parameters"), (axes[1], "gflops_per_image", "GFLOPs per image")):
        ok = rows.dropna(subset=[col])
        ok = ok[ok[col].astype(float) > 0]
        for _, r in ok.iterrows():
            x = float(r[col])
            lo, hi = r["robust_ci_low_pct"], r["robust_ci_high_pct"]
            err = [[r["robust_accuracy_pct"] - lo], [hi - r["robust_accuracy_pct"]]] if np.isfinite([lo, hi]).all() \
                else None
            (pt,) = ax.plot([x], [r["robust_accuracy_pct"]], marker="o", ls="")
            if err is not None:
                ax.errorbar([x], [r["robust_accuracy_pct"]], yerr=err, color=pt.get_color(), capsize=3)
            ax.plot([x], [r["clean_accuracy_pct"]], marker="^", ls="", color=pt.get_color(), alpha=0.6)
            ax.annotate(r["model"], (x, r["robust_accuracy_pct"]), xytext=(4, 4), textcoords="offset points",
                        fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log scale)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{run.label}: accuracy vs cost (o: mean over the transformed cells, 95% CI; "
                 "triangle: clean)", fontsize=9)
    return _save(fig, path)
