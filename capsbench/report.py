"""``capsbench report``: tables, figures, claim verdicts and provenance from run directories.

``write_report([run_dir, ...], out_dir)`` reads what ``capsbench run`` wrote (``results.csv``,
``run.json``, ``predictions/``) and writes::

    out_dir/index.html      self-contained (figures embedded as base64 PNG)
    out_dir/report.md       the same content, figures linked from figures/
    out_dir/tables/*.csv    every table of the report, plus the long summary.csv
    out_dir/figures/*.png

Statistics:

* Per suite, cell, model and metric: the mean over seeds and a 95% confidence interval from
  the t distribution over seeds. With a single seed there is no spread over seeds ("n/a
  (1 seed)"); proportions (accuracy, unchanged) then show the binomial Wilson 95% interval
  over the test images of that seed instead, labelled as such.
* Claim verdicts use the per-image predictions: both models are scored on the same test
  images (paired by image). The 95% interval of the difference A - B has two parts, added
  as variances: test-image sampling (a paired bootstrap that resamples images, each with all
  of its cells and seeds, so their correlation is kept; 2000 resamples from a fixed seed) and
  training variance (the spread of each model's per-seed mean over its seeds, the two models'
  training runs taken as independent); the interval is the difference +- t x the combined
  standard error, with Welch-Satterthwaite degrees of freedom (the image part counted as
  known), and the two-sided p-value comes from the same t. With one seed per model the
  training part cannot be estimated and no claim gets a definite verdict. Cells that are the
  same transform (rotation by +180 and -180 degrees) are pooled once.

Directories written by ``capsbench profile`` (``suite == "profile"``) are accepted too: they
feed the "Cost" section (throughput, FLOPs, achieved GFLOP/s, stage breakdown;
:mod:`capsbench.report_cost`) and are left out of the accuracy tables and claim verdicts.

Anything missing (a model, a failed cell, a checkpoint, the data for example images) is
reported in the report itself; only input that is not a run directory at all is an error.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from capsbench import paper
from capsbench.errors import CapsbenchError, ConfigError, describe
from capsbench.store import (
    ID_COLUMNS,
    PROVENANCE_COLUMNS,
    TEXT_COLUMNS,
    VALUE_COLUMNS,
    atomic_write_text,
    ensure_writable_dir,
)

# The clean (untransformed) cell of each suite: its accuracy stands beside every robustness number.
CLEAN_CELLS = {
    "rotation": "rot0",
    "fashion_rotation": "rot0",
    "part_shuffle": "clean",
    "mnistc_affine": "clean",
    "translation": "dx+0_dy+0",
    "affnist": "expanded_mnist",
}
# Suites trained with the paper's MNIST protocol, whose clean cell is the paper's Table 1 test.
TABLE1_PROTOCOL = "mnist:mnist28_shift2"
PROPORTION_METRICS = ("accuracy", "unchanged")
METRIC_ORDER = ("accuracy", "confidence", "unchanged")
CAPSULE_DECODER_MODELS = ("capsnet", "capsnet_r1", "capsnet_uniform")
NEGLIGIBLE = 0.01  # +-1 percentage point
MIN_SEEDS = 2  # seeds per model before a claim can get a definite verdict (training variance)
_NON_GRID = set(ID_COLUMNS) | set(VALUE_COLUMNS) | set(PROVENANCE_COLUMNS)

VERDICT_RULE = (
    "Verdict rule, checked in this order, on the 95% CI of the difference A - B (test-image "
    "sampling and seed-to-seed training variance both in it, the image x seed interaction counted "
    "once): 'inconclusive' if either model has fewer than 2 seeds (training variance unknown); "
    "'negligible' if the CI lies entirely within +-1 percentage point (no difference that matters, "
    "whatever its sign); 'supported' if it lies entirely on the claimed side of 0; 'refuted' if "
    "entirely on the opposite side; 'inconclusive' otherwise. Two claims compare models that may "
    "differ on clean digits too: the orientation claim is 'supported' only if CapsNet's advantage "
    "on rotated digits is also larger than its advantage on upright ones (the difference in "
    "differences has its CI above 0; otherwise 'inconclusive': the gap may be clean accuracy, not "
    "robustness), and the affNIST claim only if both models were matched in every seed: stopped by "
    "--match-accuracy with a validation accuracy at the stop within the run's tolerance above the "
    "target (otherwise 'inconclusive' instead of 'supported' or 'refuted'). A claim whose suite, "
    "models or predictions are missing is 'not evaluated', with the reason. The three claims are a "
    "family: each p-value is shown raw and Holm-adjusted; the verdicts use the 95% CIs, not the "
    "adjusted p."
)


# --------------------------------------------------------------------------- loading


@dataclass
class Run:
    """One run directory, loaded."""

    path: Path
    label: str
    meta: dict[str, Any]
    rows: pd.DataFrame
    unreadable: dict[str, str] = field(default_factory=dict)  # prediction files that could not be read

    @property
    def suite(self) -> str:
        s = self.meta.get("suite") or {}
        if isinstance(s, dict) and s.get("name"):
            return str(s["name"])
        suites = self.rows["suite"].dropna().unique() if "suite" in self.rows else []
        return str(suites[0]) if len(suites) else "?"

    @property
    def suite_meta(self) -> dict[str, Any]:
        s = self.meta.get("suite")
        return s if isinstance(s, dict) else {}

    @property
    def cell_names(self) -> list[str]:
        return [c["name"] for c in self.suite_meta.get("cells", []) if isinstance(c, dict) and "name" in c]

    @property
    def clean_cell(self) -> str | None:
        return CLEAN_CELLS.get(self.suite, "clean" if "clean" in self.cell_names else None)

    @property
    def grid_columns(self) -> list[str]:
        df = self.rows[self.rows["cell"] != "train"]
        return [c for c in self.rows.columns if c not in _NON_GRID and df[c].notna().any()]

    def job_key(self, model: str, seed: int) -> str | None:
        df = self.rows
        keys = df[(df["model"] == model) & (df["seed"] == seed)]["job_key"].dropna().unique()
        if len(keys):
            return str(keys[0])
        for job in self.meta.get("jobs", []) or []:
            if job.get("model") == model and job.get("seed") == seed and job.get("job_key"):
                return str(job["job_key"])
        return None

    def seeds(self, model: str) -> list[int]:
        df = self.ok_rows()
        return sorted(int(s) for s in df[df["model"] == model]["seed"].unique())

    def models(self) -> list[str]:
        """Models with at least one successful cell, in the order the run lists them."""
        present = set(self.ok_rows()["model"].unique())
        listed = [m for m in self.meta.get("models", []) or [] if m in present]
        return listed + sorted(present - set(listed))

    def ok_rows(self) -> pd.DataFrame:
        df = self.rows
        return df[(df["cell"] != "train") & ~df["metric"].isin(["error", "train_error"]) & (df["error"] == "")]

    def predictions(self, model: str, seed: int, cell: str) -> dict[str, np.ndarray] | None:
        key = self.job_key(model, seed)
        if key is None:
            return None
        path = self.path / "predictions" / f"{model}-s{seed}-{key}" / f"{cell}.pt"
        if not path.is_file():
            return None
        import torch

        try:
            d = torch.load(path, weights_only=True)
            out = {k: v.numpy() if hasattr(v, "numpy") else np.asarray(v) for k, v in d.items()}
            if not {"pred", "label"} <= set(out) or len(out["pred"]) != len(out["label"]):
                raise ValueError("no per-image 'pred' and 'label' of one length in it")
        except Exception as e:  # cut off or garbled: that cell is missing, the report goes on
            self.unreadable[str(path)] = describe(e, 120)
            return None
        return out


def _is_run_dir(p: Path) -> bool:
    return (p / "results.csv").is_file() or (p / "run.json").is_file()


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories named by ``paths``; a folder holding run directories expands to them."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise CapsbenchError(
                f"{p}: no such run directory; pass a folder written by `capsbench run` (e.g. runs/rotation-quick)"
            )
        if p.is_dir() and _is_run_dir(p):
            found.append(p)
            continue
        children = sorted(c for c in p.iterdir() if c.is_dir() and _is_run_dir(c)) if p.is_dir() else []
        if not children:
            raise CapsbenchError(
                f"{p} is not a capsbench run directory (no results.csv or run.json in it); pass a folder "
                "written by `capsbench run`, e.g. runs/rotation-quick"
            )
        found.extend(children)
    if not found:
        raise CapsbenchError("no run directories given; pass at least one folder written by `capsbench run`")
    unique: dict[Path, Path] = {}
    for p in found:  # a folder named twice (or as itself and through its parent) is read once
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def load_run(path: str | Path, label: str | None = None) -> Run:
    """Read one run directory; a missing or empty results.csv or an unreadable run.json is an error."""
    path = Path(path)
    meta_path, results_path = path / "run.json", path / "results.csv"
    if not meta_path.is_file():
        raise CapsbenchError(
            f"{path}: run.json is missing, so this is not a complete run directory; rerun `capsbench run` "
            "into it or leave it out"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CapsbenchError(f"{meta_path}: cannot read it ({e}); rerun `capsbench run` to rewrite it") from None
    if not isinstance(meta, dict):
        raise CapsbenchError(f"{meta_path}: expected a JSON object; rerun `capsbench run` to rewrite it")
    if not results_path.is_file():
        raise CapsbenchError(
            f"{path}: no results.csv yet (the run evaluated nothing); finish it with `capsbench run` or leave it out"
        )
    try:
        rows = pd.read_csv(results_path, keep_default_na=False, na_values=[""], dtype=dict.fromkeys(TEXT_COLUMNS, str))
    except pd.errors.EmptyDataError:
        rows = pd.DataFrame()
    except Exception as e:
        raise CapsbenchError(f"{results_path}: cannot read it ({e}); rerun `capsbench run` to rewrite it") from None
    if rows.empty:
        raise CapsbenchError(
            f"{results_path} has no result rows; rerun the suite with `capsbench run` or leave {path} out"
        )
    missing = [c for c in ("model", "seed", "cell", "metric", "value") if c not in rows.columns]
    if missing:
        raise CapsbenchError(
            f"{results_path}: not a capsbench results file (no column {', '.join(missing)}); pass a run "
            "directory written by `capsbench run`"
        )
    rows = rows.copy()
    for col in ("run_id", "suite", "train_data", "eval_data", "transform", "job_key", "profile", "device", "git_sha"):
        if col not in rows.columns:
            rows[col] = np.nan
    errors = rows["error"] if "error" in rows.columns else [None] * len(rows)
    rows["error"] = ["" if pd.isna(x) else str(x) for x in errors]
    rows["model"] = rows["model"].astype(str)
    rows["cell"] = rows["cell"].astype(str)
    rows["metric"] = rows["metric"].astype(str)
    rows["seed"] = pd.to_numeric(rows["seed"], errors="coerce").fillna(-1).astype(int)
    rows["value"] = pd.to_numeric(rows["value"], errors="coerce")
    rows["n"] = pd.to_numeric(rows.get("n", np.nan), errors="coerce")
    if rows["suite"].isna().all() and isinstance(meta.get("suite"), dict):
        rows["suite"] = meta["suite"].get("name")
    label = label or path.name
    rows["run_id"] = label
    return Run(path=path, label=label, meta=meta, rows=rows)


def load_runs(run_dirs: Sequence[str | Path]) -> list[Run]:
    paths = find_run_dirs(run_dirs)
    names = [p.name for p in paths]
    runs = []
    for p in paths:
        label = p.name if names.count(p.name) == 1 else f"{p.parent.name}/{p.name}"
        runs.append(load_run(p, label))
    return runs


# --------------------------------------------------------------------------- statistics


def t_half_width(values: Sequence[float], level: float = 0.95) -> float:
    """Half-width of the t confidence interval of the mean (NaN for fewer than 2 values)."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size < 2:
        return float("nan")
    return float(stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))


def proportion_ci(values: Sequence[float], n: float, level: float = 0.95) -> tuple[float, float]:
    """95% interval of a proportion measured by several seeds on the same ``n`` test images:
    the mean over seeds +- t x sqrt(p(1 - p) / n + s^2 / S), test-image sampling (binomial) plus
    seed-to-seed training variance, Welch-Satterthwaite degrees of freedom (the binomial part
    counted as known), clipped to [0, 1]. One seed: the Wilson interval over the images."""

    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0 or not n or n <= 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return wilson_interval(float(v[0]), n, level)
    p = float(v.mean())
    se, df = welch_se(p * (1 - p) / n, [float(v.var(ddof=1)) / v.size], v.size)
    half = _t_quantile(df, level) * se
    return max(0.0, p - half), min(1.0, p + half)


def welch_se(var_known: float, seed_vars: Sequence[float], n_seeds: int) -> tuple[float, float]:
    """Standard error and Welch-Satterthwaite degrees of freedom of an estimate whose variance is
    ``var_known`` (test-image sampling, counted as known: infinite degrees of freedom) plus the
    ``seed_vars`` (each a variance of a mean over ``n_seeds`` seeds, n_seeds - 1 degrees of
    freedom). df is infinite when the seed parts are all 0."""
    total = var_known + sum(seed_vars)
    denom = sum(x * x for x in seed_vars) / (n_seeds - 1) if n_seeds > 1 else 0.0
    return math.sqrt(total), (total * total / denom if denom > 0 else math.inf)


def _t_quantile(df: float, level: float = 0.95) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom (normal for inf)."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, df) if math.isfinite(df) else stats.norm.ppf(0.5 + level / 2))


def wilson_interval(p: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Binomial Wilson score interval for a proportion ``p`` observed on ``n`` trials."""
    from scipy import stats

    if n is None or p is None or not np.isfinite(n) or n <= 0 or not np.isfinite(p):
        return float("nan"), float("nan")
    z = float(stats.norm.ppf(0.5 + level / 2))
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def verdict_word(ci_low: float, ci_high: float, n_seeds: int, direction: int = 1,
                 margin: float = NEGLIGIBLE) -> str:
    """Apply :data:`VERDICT_RULE` to a difference whose claimed sign is ``direction`` (+1 or -1),
    estimated from ``n_seeds`` seeds of each model (the fewer of the two)."""
    if not (np.isfinite(ci_low) and np.isfinite(ci_high)):
        return "not evaluated"
    if n_seeds < MIN_SEEDS:
        return "inconclusive"
    lo, hi = (ci_low, ci_high) if direction > 0 else (-ci_high, -ci_low)
    if lo >= -margin and hi <= margin:
        return "negligible"
    if lo > 0:
        return "supported"
    if hi < 0:
        return "refuted"
    return "inconclusive"


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


# --------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class Claim:
    name: str
    statement: str
    suites: tuple[str, ...]
    a: str  # the model the claim says is ahead on the measure
    b: str
    measure: str  # "accuracy" or "unchanged"


CLAIMS: tuple[Claim, ...] = (
    Claim("orientation", "CapsNet is more accurate than the pooling CNN on rotated digits "
          "(pooled over the non-zero angles of the rotation suite)", ("rotation",), "capsnet", "cnn_maxpool",
          "accuracy"),
    Claim("pooling", "the pooling CNN keeps its prediction on shuffled parts more often than CapsNet "
          "(fraction of predictions unchanged from the clean image, pooled over the k x k shuffle cells; the "
          "two-tile swap cell is not pooled)", ("part_shuffle",),
          "cnn_maxpool", "capsnet", "unchanged"),
    Claim("affNIST", "CapsNet generalises better to affNIST than the CNN (accuracy on the affnist cell)",
          ("affnist",), "capsnet", "cnn_maxpool", "accuracy"),
)


@dataclass
class Verdict:
    claim: str
    statement: str
    run: str = ""
    comparison: str = ""
    measure: str = ""
    difference: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    se_images: float = float("nan")
    se_seeds: float = float("nan")
    p_value: float = float("nan")
    p_holm: float = float("nan")  # Holm-adjusted over the claims of one report
    pairs: int = 0
    n_seeds: int = 0
    verdict: str = "not evaluated"
    notes: list[str] = field(default_factory=list)

    def as_row(self) -> dict[str, Any]:
        return {
            "claim": self.claim, "run": self.run, "comparison": self.comparison, "measure": self.measure,
            "difference": self.difference, "ci_low": self.ci_low, "ci_high": self.ci_high,
            "se_images": self.se_images, "se_seeds": self.se_seeds, "p_value": self.p_value,
            "p_holm": self.p_holm,
            "pairs": self.pairs, "seeds": self.n_seeds, "verdict": self.verdict, "notes": " ".join(self.notes),
        }


def _claim_cells(claim: Claim, run: Run) -> list[str]:
    cells = run.suite_meta.get("cells", []) or []
    if claim.name == "orientation":
        # one cell per distinct rotation: +180 and -180 degrees are the same image, pooled once
        seen, out = set(), []
        for c in cells:
            params = c.get("params") or {}
            if c.get("transform") != "rotation" or not params.get("angle"):
                continue
            signed = (params["angle"] * (-1 if params.get("direction") == "cw" else 1)) % 360
            if signed not in seen:
                seen.add(signed)
                out.append(c["name"])
        return out
    if claim.name == "pooling":
        return [c["name"] for c in cells if c.get("transform") == "part_shuffle"]
    if claim.name == "affNIST":
        return [c["name"] for c in cells if c.get("name") == "affnist"]
    return []


def two_way_mean(d: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """Mean of ``d`` (n_images x n_seeds: each image's outcome difference in each seed) and its
    standard error under a two-way random-effects model, d_is = mu + image_i + seed_s + e_is.

    Var(mean) = var(image)/n + var(seed)/S + var(e)/(nS), estimated without bias from the ANOVA
    mean squares (images MS_i, seeds MS_s, residual MS_e) as the sum of two parts:
    the image part max(0, MS_i - MS_e) / (nS) = var(image)/n (which test images were drawn), and
    the seed part MS_s / (nS) = var(per-seed mean differences) / S (training seed to seed; the
    image x seed interaction is in it, once). Satterthwaite degrees of freedom. The earlier rule
    (an image bootstrap of seed-averaged differences plus var(per-seed means)/S) counted the
    interaction twice; docs/methods.md has the coverage of both. One seed: var(d)/n with n - 1
    degrees of freedom (image and interaction not separable; the seed part unknown, NaN).
    """
    d = np.asarray(d, dtype=float)
    if d.ndim == 1:
        d = d[:, None]
    n, s = d.shape
    out = {"difference": float("nan"), "se_images": float("nan"), "se_seeds": float("nan"),
           "df": float("nan"), "half_width": float("nan")}
    if n == 0 or s == 0:
        return out
    mean = float(d.mean())
    if n < 2:
        return {**out, "difference": mean}
    row = d.mean(axis=1)
    if s < 2:
        var_img = float(row.var(ddof=1)) / n
        se = math.sqrt(var_img)
        df = float(n - 1)
        return {**out, "difference": mean, "se_images": se, "df": df, "half_width": _t_quantile(df, level) * se}
    col = d.mean(axis=0)
    ms_img = s * float(row.var(ddof=1))
    ms_seed = n * float(col.var(ddof=1))
    ms_res = float(((d - row[:, None] - col[None, :] + mean) ** 2).sum()) / ((n - 1) * (s - 1))
    var_img = max(0.0, ms_img - ms_res) / (n * s)
    var_seed = ms_seed / (n * s)
    terms = [(ms_seed, s - 1)] + ([(ms_img, n - 1), (ms_res, (n - 1) * (s - 1))] if var_img > 0 else [])
    denom = sum((m / (n * s)) ** 2 / k for m, k in terms)
    total = var_img + var_seed
    df = total * total / denom if denom > 0 else math.inf
    return {"difference": mean, "se_images": math.sqrt(var_img), "se_seeds": math.sqrt(var_seed), "df": df,
            "half_width": _t_quantile(df, level) * math.sqrt(total)}


def _by_seed(units: Sequence[np.ndarray], seeds: Sequence[int]) -> np.ndarray:
    """Stack per-unit difference arrays into images x seeds: each seed's units (its cells) are
    averaged per image when they cover the same images, else concatenated in order; every seed
    must then give the same number of rows."""
    cols = []
    for k in sorted(set(seeds)):
        mine = [u for u, s in zip(units, seeds, strict=True) if s == k]
        if len({len(u) for u in mine}) == 1 and len({len(u) for u in units}) == 1:
            cols.append(np.mean(np.stack(mine, axis=1), axis=1))
        else:
            cols.append(np.concatenate(mine))
    if len({len(c) for c in cols}) != 1:
        raise ValueError("the seeds' outcomes cover different numbers of images: "
                         f"{', '.join(str(len(c)) for c in cols)}; pair each seed's cells on the same images")
    return np.stack(cols, axis=1)


def compare_paired(a_ok: Sequence[np.ndarray], b_ok: Sequence[np.ndarray], seeds: Sequence[int] | None = None,
                   direction: int = 1, level: float = 0.95) -> dict[str, Any]:
    """Difference A - B of paired per-image outcomes, its CI and p-value, and the verdict.

    ``a_ok`` and ``b_ok`` are lists of equally long per-image outcome arrays (0/1, or any
    per-image score such as a difference of outcomes), one per unit (cell and seed); ``seeds``
    gives each unit's training seed (default: one seed for all). The per-image differences are
    averaged over each seed's cells into an images x seeds table, whose mean is the difference;
    its standard error has a test-image part and a training (seed-to-seed) part, the image x seed
    interaction counted once (:func:`two_way_mean`). The interval is the difference +- t x SE
    with Satterthwaite degrees of freedom, the p-value two-sided from the same t. With one seed
    the training part is unknown: the interval covers image sampling only and the verdict
    cannot be definite (:func:`verdict_word`).
    """
    from scipy import stats

    seeds = [0] * len(a_ok) if seeds is None else list(seeds)
    if not (len(a_ok) == len(b_ok) == len(seeds)):
        raise ValueError(f"a_ok, b_ok and seeds differ in length: {len(a_ok)}, {len(b_ok)}, {len(seeds)}")
    a = [np.asarray(x, dtype=float) for x in a_ok]
    b = [np.asarray(x, dtype=float) for x in b_ok]
    if any(len(x) != len(y) for x, y in zip(a, b, strict=True)):
        raise ValueError("each unit's outcomes for A and B must cover the same images")
    pairs = int(sum(len(x) for x in a))
    s_count = len(set(seeds))
    empty = {"difference": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "se_images": float("nan"),
             "se_seeds": float("nan"), "df": float("nan"), "p_value": float("nan"), "pairs": pairs,
             "n_seeds": s_count, "verdict": "not evaluated"}
    if pairs == 0:
        return empty
    res = two_way_mean(_by_seed([x - y for x, y in zip(a, b, strict=True)], seeds), level)
    diff, half, df = res["difference"], res["half_width"], res["df"]
    se = math.sqrt(res["se_images"] ** 2 + (res["se_seeds"] ** 2 if s_count > 1 else 0.0))
    lo, hi = diff - half, diff + half
    if se > 0:
        z = abs(diff) / se
        p = float(2 * (stats.t.sf(z, df) if math.isfinite(df) else stats.norm.sf(z)))
    else:
        p = 1.0 if diff == 0 else 0.0
    return {**empty, "difference": diff, "ci_low": lo, "ci_high": hi, "se_images": res["se_images"],
            "se_seeds": res["se_seeds"], "df": df, "p_value": p, "verdict": verdict_word(lo, hi, s_count, direction)}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaNs stay NaN and are left out of
    the family): the k-th smallest of m is multiplied by m - k + 1, made monotone, capped at 1."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = idx.size
    running = 0.0
    for rank, i in enumerate(idx[np.argsort(p[idx], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def evaluate_claim(claim: Claim, runs: Sequence[Run]) -> list[Verdict]:
    """One verdict per run of the claim's suite (one 'not evaluated' verdict when there is none)."""
    matching = [r for r in runs if r.suite in claim.suites]
    if not matching:
        return [Verdict(claim.name, claim.statement, measure=claim.measure,
                        comparison=f"{claim.a} vs {claim.b}",
                        notes=[f"no run of the {' / '.join(claim.suites)} suite was given to the report."])]
    return [_evaluate_claim_on(claim, run) for run in matching]


def _evaluate_claim_on(claim: Claim, run: Run) -> Verdict:
    v = Verdict(claim.name, claim.statement, run=run.label, measure=claim.measure,
                comparison=f"{claim.a} - {claim.b}")
    present = run.models()
    absent = [m for m in (claim.a, claim.b) if m not in present]
    if absent:
        what = f"model {absent[0]} has" if len(absent) == 1 else f"models {' and '.join(absent)} have"
        v.notes.append(f"{what} no results in {run.label} (models with results: {', '.join(present) or 'none'}).")
        return v
    cells = _claim_cells(claim, run)
    if not cells:
        v.notes.append(f"{run.label} has no cells this claim uses.")
        return v
    seeds = sorted(set(run.seeds(claim.a)) & set(run.seeds(claim.b)))
    extra = sorted(set(run.seeds(claim.a)) ^ set(run.seeds(claim.b)))
    if extra:
        v.notes.append(f"seeds {', '.join(map(str, extra))} are present for only one of the two models and are "
                       "left out of the pairing.")
    a_units, b_units, unit_seeds, missing = [], [], [], []
    clean_units: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # seed -> (A, B) correct on the clean cell
    for seed in seeds:
        ref_a = ref_b = None
        if run.clean_cell is not None:
            ref_a = run.predictions(claim.a, seed, run.clean_cell)
            ref_b = run.predictions(claim.b, seed, run.clean_cell)
            if ref_a is not None and ref_b is not None and np.array_equal(ref_a["label"], ref_b["label"]):
                clean_units[seed] = (ref_a["pred"] == ref_a["label"], ref_b["pred"] == ref_b["label"])
        if claim.measure == "unchanged" and (ref_a is None or ref_b is None):
            missing.append(f"{run.clean_cell} (seed {seed})")
            continue
        for cell in cells:
            pa, pb = run.predictions(claim.a, seed, cell), run.predictions(claim.b, seed, cell)
            if pa is None or pb is None:
                missing.append(f"{cell} (seed {seed})")
                continue
            if len(pa["pred"]) != len(pb["pred"]) or not np.array_equal(pa["label"], pb["label"]):
                missing.append(f"{cell} (seed {seed}: the two models were scored on different images)")
                continue
            if claim.measure == "unchanged":
                a_units.append(pa["pred"] == ref_a["pred"])
                b_units.append(pb["pred"] == ref_b["pred"])
            else:
                a_units.append(pa["pred"] == pa["label"])
                b_units.append(pb["pred"] == pb["label"])
            unit_seeds.append(seed)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        v.notes.append(f"no usable per-image predictions for: {shown}.")
    if not a_units:
        v.notes.insert(0, "no paired predictions to compare.")
        return v
    try:
        res = compare_paired(a_units, b_units, unit_seeds, direction=1)
    except ValueError as e:  # seeds scored on different numbers of images: no images x seeds table
        v.notes.insert(0, f"the predictions cannot be paired across seeds: {e}.")
        return v
    v.difference, v.ci_low, v.ci_high = res["difference"], res["ci_low"], res["ci_high"]
    v.se_images, v.se_seeds, v.p_value = res["se_images"], res["se_seeds"], res["p_value"]
    v.pairs, v.n_seeds, v.verdict = res["pairs"], res["n_seeds"], res["verdict"]
    n_images = len(a_units[0]) if len({len(u) for u in a_units}) == 1 else None
    v.notes.insert(0, f"{v.n_seeds} seed(s) of each model x {len(a_units) // max(v.n_seeds, 1)} cell(s)"
                      + (f" x {n_images} test images" if n_images else f", {v.pairs} paired outcomes") + ". "
                      f"Standard error {_pp(v.se_images)} pp from test-image sampling"
                      + (f", {_pp(v.se_seeds)} pp from training (seed to seed)." if v.n_seeds >= MIN_SEEDS
                         else "; training variance unknown with one seed: run --seeds 3 or more for a verdict."))
    if claim.measure == "accuracy" and claim.name != "affNIST":
        _clean_check(v, claim, run, a_units, b_units, unit_seeds, clean_units)
    elif clean_units and claim.name != "affNIST":
        clean = compare_paired([clean_units[k][0] for k in clean_units], [clean_units[k][1] for k in clean_units],
                               list(clean_units))
        v.notes.append(f"On the clean cell ({run.clean_cell}) {claim.a} - {claim.b} = {_pp(clean['difference'], True)} "
                       f"pp [{_pp(clean['ci_low'], True)}, {_pp(clean['ci_high'], True)}].")
    if claim.name == "affNIST":
        notes, matched = _affnist_notes(run, claim)
        v.notes.extend(notes)
        if not matched and v.verdict in ("supported", "refuted"):
            v.notes.append(f"Verdict 'inconclusive' instead of '{v.verdict}': the models were not compared "
                           "at a matched clean accuracy.")
            v.verdict = "inconclusive"
    return v


def _pp(x: float, sign: bool = False) -> str:
    """A proportion as percentage points with two decimals ("nan" stays "nan")."""
    return f"{100 * x:+.2f}" if sign else f"{100 * x:.2f}"


def _clean_check(v: Verdict, claim: Claim, run: Run, a_units, b_units, unit_seeds, clean_units) -> None:
    """An accuracy claim on transformed cells against the clean cell: note the clean difference
    and the difference in differences (the advantage on transformed digits beyond the one on
    clean digits), and withhold 'supported' unless the latter's CI is above 0."""
    if not all(s in clean_units for s in unit_seeds):
        v.notes.append(f"The clean cell ({run.clean_cell}) has no usable predictions: the difference could not be "
                       "set against the clean-accuracy difference.")
        if v.verdict == "supported":
            v.notes.append("Verdict 'inconclusive' instead of 'supported': the clean-accuracy check could not be made.")
            v.verdict = "inconclusive"
        return
    seeds = sorted(set(unit_seeds))
    clean = compare_paired([clean_units[k][0] for k in seeds], [clean_units[k][1] for k in seeds], seeds)
    did = compare_paired([u.astype(float) - clean_units[k][0] for u, k in zip(a_units, unit_seeds, strict=True)],
                         [u.astype(float) - clean_units[k][1] for u, k in zip(b_units, unit_seeds, strict=True)],
                         unit_seeds)
    v.notes.append(f"On the clean cell ({run.clean_cell}) {claim.a} - {claim.b} = {_pp(clean['difference'], True)} pp "
                   f"[{_pp(clean['ci_low'], True)}, {_pp(clean['ci_high'], True)}]; the advantage beyond it "
                   f"(difference in differences: each model's accuracy on the claim's cells minus its clean accuracy) "
                   f"is {_pp(did['difference'], True)} pp [{_pp(did['ci_low'], True)}, {_pp(did['ci_high'], True)}].")
    if v.verdict == "supported" and not did["ci_low"] > 0:
        v.notes.append(f"Verdict 'inconclusive' instead of 'supported': {claim.a}'s advantage on the claim's cells is not "
                       "shown to exceed its advantage on clean digits, so it may be clean accuracy, not robustness.")
        v.verdict = "inconclusive"


def _match_records(run: Run, model: str) -> dict[int, tuple[int | None, float | None]]:
    """seed -> (step at which --match-accuracy stopped the job or None, validation accuracy at
    the stop or at the last check, None if not recorded), from the run's rows and job records."""
    rec: dict[int, tuple[int | None, float | None]] = {}
    for j in run.meta.get("jobs", []) or []:
        if j.get("model") == model and "stopped_early_at" in j:
            rec[int(j.get("seed", -1))] = (j.get("stopped_early_at") or None, j.get("match_val_accuracy"))
    df = run.rows
    for metric, pos in (("matched_at_step", 0), ("match_val_accuracy", 1)):
        for _, r in df[(df["model"] == model) & (df["metric"] == metric)].iterrows():
            old = list(rec.get(int(r["seed"]), (None, None)))
            if old[pos] is None and not pd.isna(r["value"]):
                old[pos] = int(r["value"]) if pos == 0 else float(r["value"])
            rec[int(r["seed"])] = (old[0], old[1])
    return rec


def _affnist_notes(run: Run, claim: Claim) -> tuple[list[str], bool]:
    """Notes on the affNIST comparison and whether both models were matched: in every seed,
    stopped by --match-accuracy with a validation accuracy at the stop in [target, target + tolerance]."""
    from capsbench.runner import MATCH_TOLERANCE
    from capsbench.runner import matched as is_matched

    notes = []
    target = run.meta.get("match_accuracy")
    tol = run.meta.get("match_tolerance") or MATCH_TOLERANCE
    matched = target is not None
    if target is None:
        notes.append("Trained without --match-accuracy: the models are not at a matched clean accuracy "
                     "(the paper compares them at 99.23% vs 99.22% on expanded MNIST).")
    else:
        for model in (claim.a, claim.b):
            rec = _match_records(run, model)
            if not rec:
                matched = False
                notes.append(f"{model}: no record of its accuracy at the --match-accuracy stop.")
                continue
            shown = "; ".join(f"seed {s}: " + (f"stopped at step {step}" if step else "not stopped (full budget)")
                              + (f", {_pct(acc)}%" if acc is not None else ", accuracy not recorded")
                              for s, (step, acc) in sorted(rec.items()))
            bad = [s for s, (step, acc) in rec.items() if not is_matched(target, acc, step, tol)]
            if bad:
                matched = False
            notes.append(f"{model} validation accuracy at the stop ({shown})"
                         + (f": NOT matched in seed(s) {', '.join(map(str, sorted(bad)))}." if bad else "."))
        notes.append(f"Matched means: stopped by --match-accuracy {_pct(target)}% with a validation accuracy at the "
                     f"stop within {_pp(tol)} pp above it, in every seed of both models; "
                     + ("they were." if matched else "they were not."))
    clean = _clean_accuracy(run)
    if claim.a in clean and claim.b in clean:
        notes.append(f"Expanded-MNIST test accuracy: {claim.a} {_pct(clean[claim.a])}%, {claim.b} {_pct(clean[claim.b])}%.")
    ed = set(run.rows[run.rows["cell"] == "affnist"]["eval_data"].dropna().astype(str))
    if "affnist_synth" in ed:
        notes.append("Evaluated on the generated affNIST-style set (affnist_synth), not the real affNIST; "
                     "numbers are not directly comparable with the paper's.")
    return notes, matched


# --------------------------------------------------------------------------- formatting


def _pct(x: Any, digits: int = 2) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "—"
    return "—" if not np.isfinite(x) else f"{100 * x:.{digits}f}"


def _params_h(p: Any) -> str:
    try:
        p = float(p)
    except (TypeError, ValueError):
        return "?"
    if not np.isfinite(p):
        return "?"
    if p >= 1e6:
        return f"{p / 1e6:.2f}M"
    if p >= 1e3:
        return f"{p / 1e3:.1f}k"
    return f"{int(p)}"


def _fmt_value(r: pd.Series) -> str:
    """'97.31 ± 0.42' over seeds, or '13.28 (Wilson 9.71–17.88)' for one seed."""
    if r["metric"] in PROPORTION_METRICS or r["metric"] == "confidence":
        m = _pct(r["mean"])
        if r["n_seeds"] >= 2:
            return f"{m} ± {100 * r['ci_half']:.2f}"
        if np.isfinite(r.get("wilson_low", np.nan)):
            return f"{m} (Wilson {_pct(r['wilson_low'])}–{_pct(r['wilson_high'])})"
        return f"{m} (n/a, 1 seed)"
    if r["n_seeds"] >= 2:
        return f"{r['mean']:.4g} ± {r['ci_half']:.2g}"
    return f"{r['mean']:.4g}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


# --------------------------------------------------------------------------- document model


@dataclass
class Table:
    df: pd.DataFrame
    caption: str = ""
    csv_name: str | None = None


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Doc:
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, df: pd.DataFrame, caption: str = "", csv_name: str | None = None) -> None:
        self.blocks.append(("table", Table(df, caption, csv_name)))

    def figure(self, path: Path, caption: str) -> None:
        self.blocks.append(("fig", Figure(path, caption)))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))


def _md_cell(x: Any) -> str:
    s = "" if x is None or (isinstance(x, float) and math.isnan(x)) else str(x)
    return s.replace("|", "\\|").replace("\n", " ")


def render_markdown(doc: Doc, out_dir: Path) -> str:
    out: list[str] = []
    for kind, val in doc.blocks:
        if kind == "h":
            level, text = val
            out.append(f"{'#' * level} {text}\n")
        elif kind == "p":
            out.append(f"{val}\n")
        elif kind == "ul":
            out.append("\n".join(f"- {_md_cell(i)}" for i in val) + "\n")
        elif kind == "code":
            out.append(f"```\n{val}\n```\n")
        elif kind == "table":
            t: Table = val
            if t.caption:
                out.append(f"{t.caption}\n")
            cols = [str(c) for c in t.df.columns]
            lines = ["| " + " | ".join(_md_cell(c) for c in cols) + " |", "|" + "---|" * len(cols)]
            for row in t.df.itertuples(index=False):
                lines.append("| " + " | ".join(_md_cell(x) for x in row) + " |")
            out.append("\n".join(lines) + "\n")
        elif kind == "fig":
            f: Figure = val
            rel = f.path.relative_to(out_dir).as_posix()
            out.append(f"![{_md_cell(f.caption)}]({rel})\n\n*{f.caption}*\n")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
figure{margin:1em 0 2em}
img{max-width:100%;height:auto}
figcaption,.caption{color:#555;font-size:.9em}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}
.verdict-supported{color:#0a6b0a;font-weight:bold}
.verdict-refuted{color:#a40000;font-weight:bold}
.verdict-negligible{color:#444;font-weight:bold}
.verdict-inconclusive{color:#8a6d00;font-weight:bold}
"""


def render_html(doc: Doc, title: str) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8" />',
        f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
    ]
    for kind, val in doc.blocks:
        if kind == "h":
            level, text = val
            parts.append(f"<h{level}>{e(text)}</h{level}>")
        elif kind == "p":
            parts.append(f"<p>{e(val)}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{e(str(i))}</li>" for i in val) + "</ul>")
        elif kind == "code":
            parts.append(f"<pre>{e(val)}</pre>")
        elif kind == "table":
            t: Table = val
            if t.caption:
                parts.append(f'<p class="caption">{e(t.caption)}</p>')
            head = "".join(f"<th>{e(str(c))}</th>" for c in t.df.columns)
            body = []
            for row in t.df.itertuples(index=False):
                cells = []
                for c, x in zip(t.df.columns, row, strict=True):
                    s = _md_cell(x).replace("\\|", "|")
                    cls = f' class="verdict-{_slug(s).replace("_", "-")}"' if c == "verdict" else ""
                    cells.append(f"<td{cls}>{e(s)}</td>")
                body.append("<tr>" + "".join(cells) + "</tr>")
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
        elif kind == "fig":
            f: Figure = val
            data = base64.b64encode(f.path.read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img alt="{e(f.caption)}" src="data:image/png;base64,{data}" />'
                f"<figcaption>{e(f.caption)}</figcaption></figure>"
            )
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _band(sub: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, str]:
    """Lower and upper edges of the interval drawn around a mean: t CI, else Wilson."""
    multi = (sub["n_seeds"] >= 2).all()
    if multi:
        return sub["ci_low"].to_numpy(float), sub["ci_high"].to_numpy(float), "t 95% CI over seeds"
    return sub["wilson_low"].to_numpy(float), sub["wilson_high"].to_numpy(float), "Wilson 95% over images (1 seed)"


def fig_rotation(summary: pd.DataFrame, run: Run, path: Path) -> Path | None:
    s = summary[(summary["run_id"] == run.label) & (summary["metric"] == "accuracy")]
    if "direction" not in s.columns or "angle" not in s.columns:
        return None
    s = s[(s["direction"] == "mean") | (s["cell"] == run.clean_cell)]
    if s.empty:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    kinds = set()
    for model in _model_order(run, s):
        sub = s[s["model"] == model].sort_values("angle")
        x = sub["angle"].to_numpy(float)
        lo, hi, kind = _band(sub)
        kinds.add(kind)
        (line,) = ax.plot(x, sub["mean"].to_numpy(float), marker="o", ms=3, label=model)
        ok = np.isfinite(lo) & np.isfinite(hi)
        if ok.any():
            ax.fill_between(x[ok], lo[ok], hi[ok], color=line.get_color(), alpha=0.2, lw=0)
    ax.axhline(0.1, color="grey", ls=":", lw=1, label="chance")
    ax.set_xlabel("rotation angle (degrees; mean of clockwise and counter-clockwise)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(sorted(s["angle"].dropna().unique()))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{run.label}: accuracy vs rotation (band: {', '.join(sorted(kinds))})", fontsize=9)
    return _save(fig, path)


def fig_translation(summary: pd.DataFrame, run: Run, path: Path) -> Path | None:
    s = summary[(summary["run_id"] == run.label) & (summary["metric"] == "accuracy")]
    if "dx" not in s.columns or "dy" not in s.columns:
        return None
    s = s.dropna(subset=["dx", "dy"])
    models = _model_order(run, s)
    if not models:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models) + 0.8, 3.8), squeeze=False)
    im = None
    for ax, model in zip(axes[0], models, strict=True):
        piv = s[s["model"] == model].pivot_table(index="dy", columns="dx", values="mean", aggfunc="mean")
        piv = piv.sort_index(ascending=False)
        im = ax.imshow(piv.to_numpy(float), vmin=0, vmax=1, cmap="viridis", aspect="equal")
        ax.set_xticks(range(piv.shape[1]), [f"{int(v):+d}" for v in piv.columns], fontsize=7)
        ax.set_yticks(range(piv.shape[0]), [f"{int(v):+d}" for v in piv.index], fontsize=7)
        ax.set_xlabel("dx (px)")
        ax.set_ylabel("dy (px)")
        ax.set_title(model, fontsize=9)
        vals = piv.to_numpy(float)
        if vals.size <= 81:
            for (i, j), v in np.ndenumerate(vals):
                if np.isfinite(v):
                    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 0.6 else "black")
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="accuracy")
    fig.suptitle(f"{run.label}: accuracy by shift (dx, dy)", fontsize=10)
    return _save(fig, path)


def fig_affnist(summary: pd.DataFrame, run: Run, path: Path) -> Path | None:
    s = summary[(summary["run_id"] == run.label) & (summary["metric"] == "accuracy")]
    cells = [c for c in ("expanded_mnist", "affnist") if c in set(s["cell"])]
    if not cells:
        return None
    plt = _pyplot()
    models = _model_order(run, s)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(models) + 2), 4.5))
    width = 0.8 / len(cells)
    for i, cell in enumerate(cells):
        sub = s[s["cell"] == cell].set_index("model").reindex(models)
        lo, hi, _ = _band(sub.reset_index())
        mean = sub["mean"].to_numpy(float)
        err = np.vstack([np.nan_to_num(mean - lo), np.nan_to_num(hi - mean)])
        label = cell
        ed = sub["eval_data"].dropna()
        if len(ed):
            label = f"{cell} ({ed.iloc[0]})"
        ax.bar(np.arange(len(models)) + (i - (len(cells) - 1) / 2) * width, mean, width, yerr=err, capsize=3,
               label=label)
    ax.axhline(paper.AFFNIST_CAPSNET, color="tab:red", ls="--", lw=1.2, label="paper: CapsNet on affNIST, 79%")
    ax.axhline(paper.AFFNIST_CNN, color="tab:purple", ls="--", lw=1.2, label="paper: CNN on affNIST, 66%")
    ax.set_xticks(range(len(models)), models, rotation=20, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # below: never over a bar
    synth = "affnist_synth" in set(s["eval_data"].dropna().astype(str))
    ax.set_title(f"{run.label}: expanded MNIST and "
                 + ("the generated affNIST-style set (affnist_synth; the paper's lines are real affNIST)"
                    if synth else "affNIST") + " accuracy", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def fig_part_shuffle(summary: pd.DataFrame, run: Run, path: Path) -> Path | None:
    s = summary[summary["run_id"] == run.label]
    if "k" not in s.columns or s.empty:
        return None
    metrics = [m for m in ("accuracy", "confidence", "unchanged") if m in set(s["metric"])]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    models = _model_order(run, s)
    for ax, metric in zip(axes[0], metrics, strict=True):
        sm = s[s["metric"] == metric]
        for model in models:
            sub = sm[(sm["model"] == model) & (sm["transform"] != "tile_swap")].sort_values("k")
            if sub.empty:
                continue
            x = sub["k"].to_numpy(float)
            (line,) = ax.plot(x, sub["mean"].to_numpy(float), marker="o", ms=3, label=model)
            lo, hi, _ = _band(sub)
            ok = np.isfinite(lo) & np.isfinite(hi)
            if ok.any():
                ax.fill_between(x[ok], lo[ok], hi[ok], color=line.get_color(), alpha=0.2, lw=0)
            swap = sm[(sm["model"] == model) & (sm["transform"] == "tile_swap")]
            if not swap.empty:
                ax.plot(swap["k"].to_numpy(float), swap["mean"].to_numpy(float), marker="x", ms=8, ls="",
                        color=line.get_color())
        ax.set_xticks(sorted(sm["k"].dropna().unique()))
        ax.set_xlabel("k (k x k tiles; x marks the 4x4 two-tile swap)")
        ax.set_ylabel(metric)
        ax.set_ylim(0, 1.02)
        ax.set_title(metric if metric != "unchanged" else "unchanged prediction (vs clean)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{run.label}: part shuffle", fontsize=10, y=1.03)  # above the panels' own titles
    return _save(fig, path)


def fig_cells(summary: pd.DataFrame, run: Run, path: Path) -> Path | None:
    """Generic grouped bars of accuracy per cell (suites without a figure of their own)."""
    s = summary[(summary["run_id"] == run.label) & (summary["metric"] == "accuracy")]
    if s.empty:
        return None
    plt = _pyplot()
    cells = list(dict.fromkeys(s["cell"]))
    models = _model_order(run, s)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(cells) * max(1, len(models)) / 2 + 2), 4.2))
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        sub = s[s["model"] == model].set_index("cell").reindex(cells)
        ax.bar(np.arange(len(cells)) + (i - (len(models) - 1) / 2) * width, sub["mean"].to_numpy(float), width,
               label=model)
    ax.set_xticks(range(len(cells)), cells, rotation=30, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{run.label}: accuracy per cell", fontsize=9)
    return _save(fig, path)


def _model_order(run: Run, s: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(s["model"]))
    ordered = [m for m in run.models() if m in present]
    return ordered + [m for m in present if m not in ordered]


def _mosaic(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Rows of (k, H, W) image stacks -> one 2-D array with a light separator grid."""
    h = max(r.shape[1] for r in rows)
    w = max(r.shape[2] for r in rows)
    k = max(r.shape[0] for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, k * (w + pad) + pad), 0.35, dtype=np.float32)
    for i, r in enumerate(rows):
        for j in range(r.shape[0]):
            img = r[j]
            y0 = pad + i * (h + pad) + (h - img.shape[0]) // 2
            x0 = pad + j * (w + pad) + (w - img.shape[1]) // 2
            out[y0 : y0 + img.shape[0], x0 : x0 + img.shape[1]] = img
    return out


def _show_mosaic(rows: list[np.ndarray], row_labels: list[str], col_labels: list[str] | None, title: str,
                 path: Path) -> Path:
    plt = _pyplot()
    m = _mosaic(rows)
    h = max(r.shape[1] for r in rows) + 2
    w = max(r.shape[2] for r in rows) + 2
    scale = 1.6 if m.shape[0] < 1200 else 1.0
    fig, ax = plt.subplots(figsize=(m.shape[1] * scale / 100 + 1.4, m.shape[0] * scale / 100 + 0.6))
    ax.imshow(m, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([2 + i * h + (h - 2) / 2 for i in range(len(rows))], row_labels, fontsize=7)
    if col_labels:
        ax.set_xticks([2 + j * w + (w - 2) / 2 for j in range(len(col_labels))], col_labels, fontsize=7)
        ax.xaxis.tick_top()
    else:
        ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=9, pad=14 if col_labels else 6)
    return _save(fig, path)


def _test_images(run: Run, data_root: str | Path | None, n: int = 8):
    from capsbench.data import load_dataset
    from capsbench.runner import to_float

    root = data_root if data_root is not None else run.meta.get("data_root")
    dataset = run.suite_meta.get("dataset") or "mnist"
    test = load_dataset(dataset, "test", root)
    return to_float(test.images[:n]), test.labels[:n], root


def fig_examples(run: Run, path: Path, data_root: str | Path | None) -> tuple[Path | None, str]:
    """A row of the first 8 test images as each cell transforms them."""
    from capsbench.suites import cell_generator, get_suite

    try:
        suite = get_suite(run.suite)
    except Exception:
        return None, f"suite {run.suite!r} is not registered in this capsbench, so its cells cannot be regenerated"
    x, y, root = _test_images(run, data_root)
    rows, labels, notes = [], [], []
    for name in run.cell_names or [c.name for c in suite.cells]:
        try:
            cell = suite.cell(name)
        except KeyError:
            notes.append(f"{name} (not in the registered suite)")
            continue
        try:
            if cell.source is not None:
                cache = run.path.parent / "cache"
                imgs, _, eval_data = cell.source({"n": len(y), "cache_dir": cache if cache.is_dir() else None,
                                                  "root": root})
                name = f"{name} ({eval_data})"
            else:
                imgs = cell.make(x.clone(), y.clone(), cell_generator(run.suite, cell.name))
        except Exception as e:  # one cell's data (e.g. affNIST) must not cost the figure
            notes.append(f"{name} ({type(e).__name__}: {e})")
            continue
        rows.append(imgs.detach().float().reshape(imgs.shape[0], imgs.shape[-2], imgs.shape[-1]).clamp(0, 1).numpy())
        labels.append(name)
    if not rows:
        return None, "no cell could be regenerated" + (f": {'; '.join(notes)}" if notes else "")
    title = f"{run.label}: the first {rows[0].shape[0]} test images in each cell"
    _show_mosaic(rows, labels, None, title, path)
    return path, ("; cells left out: " + "; ".join(notes)) if notes else ""


def _find_checkpoint(run: Run, model: str, seed: int) -> Path | None:
    key = run.job_key(model, seed)
    for job in run.meta.get("jobs", []) or []:
        if job.get("model") == model and job.get("seed") == seed and job.get("job_dir"):
            p = Path(job["job_dir"]) / "checkpoint.pt"
            if p.is_file():
                return p
    if key:
        for p in sorted((run.path.parent / "jobs").glob(f"{model}-*-s{seed}-{key}/checkpoint.pt")):
            return p
    return None


def load_checkpoint_model(path: Path):
    """Rebuild a trained model on the CPU from a job checkpoint; returns (model, TrainConfig)."""
    import dataclasses

    import torch

    from capsbench.runner import TrainConfig, build_model

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: optimizer state etc.
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in dict(state.get("config") or {}).items() if k in names}
    if "model_kwargs" in kw:
        kw["model_kwargs"] = tuple(tuple(p) for p in kw["model_kwargs"] or ())
    cfg = TrainConfig(**kw)
    model = build_model(cfg, torch.device("cpu"))
    model.load_state_dict(state["model"])
    model.eval()
    return model, cfg


def pick_capsnet_job(run: Run) -> tuple[str, int] | None:
    present = run.models()
    for model in CAPSULE_DECODER_MODELS:
        if model in present:
            seeds = run.seeds(model)
            if seeds:
                return model, seeds[0]
    return None


def fig_capsnet(run: Run, recon_path: Path, dims_path: Path, data_root: str | Path | None
                ) -> tuple[list[Figure], str]:
    """CapsNet reconstructions of 8 test digits and the paper's Figure 4 (capsule dimension sweeps)."""
    import torch

    from capsbench.runner import PROTOCOLS

    job = pick_capsnet_job(run)
    if job is None:
        return [], "no CapsNet with a decoder (capsnet, capsnet_r1, capsnet_uniform) in this run"
    model_name, seed = job
    ckpt = _find_checkpoint(run, model_name, seed)
    if ckpt is None:
        return [], f"no checkpoint found for {model_name} seed {seed} (looked in run.json jobs and {run.path.parent / 'jobs'})"
    try:
        model, cfg = load_checkpoint_model(ckpt)
    except Exception as e:  # cut off or garbled: say which file
        return [], f"checkpoint {ckpt} cannot be loaded ({describe(e, 120)})"
    if getattr(model, "decoder", None) is None:
        return [], f"{model_name} has no decoder"
    x, y, _ = _test_images(run, data_root)
    x = PROTOCOLS.get(cfg.protocol).clean(x)
    side = x.shape[-1]
    with torch.inference_mode():
        out = model(x)
        pred = out.scores.argmax(1)
        recon = model.decode(out.poses, pred).reshape(-1, side, side)
    figs = []
    title = f"{run.label}: {model_name} (seed {seed}) inputs (top) and reconstructions from the predicted capsule"
    labels = [f"L{int(a)}/P{int(b)}" for a, b in zip(y, pred, strict=True)]
    _show_mosaic([x[:, 0].numpy(), recon.numpy()], ["input", "reconstruction"], labels, title, recon_path)
    figs.append(Figure(recon_path, f"{model_name} seed {seed}: 8 test digits and their reconstructions, decoded "
                                   "from the capsule of the predicted class (L = label, P = prediction)."))
    # Figure 4: perturb each of the 16 dimensions of the winning capsule by -0.25..0.25 (step 0.05).
    correct = (pred == y).nonzero().flatten()
    i = int(correct[0]) if len(correct) else 0
    deltas = torch.arange(-5, 6, dtype=torch.float32) * 0.05
    dim = out.poses.shape[-1]
    cls = int(pred[i])
    poses = out.poses[i].unsqueeze(0).repeat(dim * len(deltas), 1, 1).clone()
    for d in range(dim):
        poses[d * len(deltas) : (d + 1) * len(deltas), cls, d] += deltas
    with torch.inference_mode():
        imgs = model.decode(poses, torch.full((poses.shape[0],), cls, dtype=torch.long)).reshape(dim, len(deltas), side, side)
    _show_mosaic([imgs[d].numpy() for d in range(dim)], [f"dim {d}" for d in range(dim)],
                 [f"{v:+.2f}" for v in deltas.tolist()],
                 f"{run.label}: {model_name} capsule dimensions (test image #{i}, label {int(y[i])}, "
                 f"predicted {cls})", dims_path)
    figs.append(Figure(dims_path, f"As the paper's Figure 4: each row perturbs one of the {dim} dimensions of the "
                                  f"winning capsule (test image #{i}, predicted {cls}) by -0.25 to 0.25 in steps of 0.05 "
                                  "and decodes it."))
    return figs, ""


# --------------------------------------------------------------------------- report sections


def _models_table(run: Run, summary: pd.DataFrame) -> pd.DataFrame:
    df = run.rows
    params = _params(run)
    clean = _clean_accuracy(run)
    out = []
    for model in run.models():
        tr = df[(df["model"] == model) & (df["cell"] == "train")]
        steps = tr[tr["metric"] == "train_steps"]["value"]
        ttime = tr[tr["metric"] == "train_time_s"]["value"]
        matched = tr[tr["metric"] == "matched_at_step"]["value"]
        clean_vals = run.ok_rows()
        clean_vals = clean_vals[(clean_vals["model"] == model) & (clean_vals["cell"] == run.clean_cell)
                                & (clean_vals["metric"] == "accuracy")]["value"]
        row = {
            "model": model,
            "params": f"{int(params[model]):,}" if model in params and np.isfinite(params[model]) else "?",
            f"clean accuracy % ({run.clean_cell})": _pct(clean.get(model)),
            "clean sd over seeds": f"{100 * clean_vals.std(ddof=1):.2f}" if len(clean_vals) > 1 else "n/a (1 seed)",
            "seeds": ", ".join(map(str, run.seeds(model))),
            "train steps (mean)": f"{steps.mean():.0f}" if len(steps) else "—",
            "train time s (mean)": f"{ttime.mean():.1f}" if len(ttime) else "—",
        }
        if len(matched):
            row["matched at step"] = ", ".join("never" if pd.isna(v) else f"{int(v)}" for v in matched)
        out.append(row)
    return pd.DataFrame(out)


def _metric_table(run: Run, summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    s = summary[(summary["run_id"] == run.label) & (summary["metric"] == metric)]
    models = _model_order(run, s)
    grid = [c for c in run.grid_columns if c in s.columns and s[c].notna().any()]
    out = []
    for cell in dict.fromkeys(s["cell"]):
        sc = s[s["cell"] == cell]
        first = sc.iloc[0]
        row: dict[str, Any] = {"cell": cell}
        for c in grid:
            v = first.get(c)
            row[c] = "" if pd.isna(v) else (int(v) if isinstance(v, float) and v.is_integer() else v)
        for model in models:
            sm = sc[sc["model"] == model]
            header = _model_header(run, summary, model)
            row[header] = _fmt_value(sm.iloc[0]) if len(sm) else "missing"
        seeds = sorted(set(sc["n_seeds"]))
        row["seeds"] = "/".join(map(str, seeds))
        out.append(row)
    return pd.DataFrame(out)


def _model_header(run: Run, summary: pd.DataFrame, model: str) -> str:
    params = _params(run).get(model)
    clean = _clean_accuracy(run).get(model)
    return f"{model} ({_params_h(params)} params, clean {_pct(clean)}%)"


def _table1_comparison(runs: Sequence[Run]) -> pd.DataFrame:
    rows = []
    for prow in paper.TABLE1:
        paper_err = f"{prow.test_error:.2f}" + (f" ± {prow.test_error_std:.3f}" if prow.test_error_std else "")
        row = {
            "paper (Table 1)": paper.describe_table1_row(prow),
            "paper test error % (sd, 3 trials)": paper_err,
            "paper params": f"{prow.params_millions}M" if prow.params_millions else "—",
            "our model": prow.our_model or "—",
            "our test error % (sd over seeds)": "—",
            "our 95% CI % (images and seeds)": "—",
            "paper's value in our CI": "—",
            "our params": "—",
            "seeds": "—",
            "test images": "—",
            "source run": "—",
        }
        if prow.our_model:
            best = None
            for run in runs:
                if run.clean_cell is None:
                    continue
                ok = run.ok_rows()
                sub = ok[(ok["model"] == prow.our_model) & (ok["cell"] == run.clean_cell) & (ok["metric"] == "accuracy")
                         & (ok["train_data"] == TABLE1_PROTOCOL)]
                if sub.empty:
                    continue
                # the longest training budget first (a smoke run is a pipeline check), then images, seeds
                score = (PROFILE_RANK.get(_profile_name(run), 1), float(sub["n"].min()), len(sub))
                if best is None or score > best[0]:
                    best = (score, run, sub)
            if best is not None:
                _, run, sub = best
                err = 100 * (1 - sub["value"].to_numpy(float))
                sd = f" ± {err.std(ddof=1):.3f}" if len(err) > 1 else " (1 seed)"
                p = _params(run).get(prow.our_model)
                lo, hi = proportion_ci(1 - sub["value"].to_numpy(float), float(sub["n"].min()))
                row.update({
                    "our test error % (sd over seeds)": f"{err.mean():.2f}{sd}",
                    "our 95% CI % (images and seeds)": f"[{100 * lo:.2f}, {100 * hi:.2f}]",
                    "paper's value in our CI": "yes" if 100 * lo <= prow.test_error <= 100 * hi else "no",
                    "our params": _params_h(p),
                    "seeds": str(len(err)),
                    "test images": f"{int(sub['n'].min()):,}",
                    "source run": f"{run.label} ({run.clean_cell}, profile {_profile_name(run)}"
                                  + ("; a pipeline check, not a result" if _profile_name(run) == "smoke" else "") + ")",
                })
        rows.append(row)
    return pd.DataFrame(rows)


def _affnist_comparison(runs: Sequence[Run]) -> pd.DataFrame:
    rows = []
    arun = [r for r in runs if r.suite == "affnist"]
    for prow in paper.AFFNIST:
        row = {
            "paper (Section 5.2)": prow.method,
            "paper expanded MNIST %": f"{prow.expanded_mnist_accuracy:.2f}",
            "paper affNIST %": f"{prow.affnist_accuracy:.0f}",
            "our model": prow.our_model + (" (ours: max-pooling, no dropout)" if prow.our_model == "cnn_maxpool" else ""),
            "our expanded MNIST %": "—",
            "our affNIST %": "—",
            "our affNIST 95% CI % (images and seeds)": "—",
            "seeds": "—",
            "our test set": "—",
            "source run": "—",
        }
        for run in arun:
            ok = run.ok_rows()
            sub = ok[(ok["model"] == prow.our_model) & (ok["metric"] == "accuracy")]
            e = sub[sub["cell"] == "expanded_mnist"]["value"]
            a = sub[sub["cell"] == "affnist"]
            if e.empty and a.empty:
                continue
            lo, hi = proportion_ci(a["value"].to_numpy(float), float(a["n"].min())) if len(a) else (np.nan, np.nan)
            row.update({
                "our expanded MNIST %": _pct(e.mean()) if len(e) else "—",
                "our affNIST %": _pct(a["value"].mean()) if len(a) else "—",
                "our affNIST 95% CI % (images and seeds)": f"[{_pct(lo)}, {_pct(hi)}]" if np.isfinite(lo) else "—",
                "seeds": str(len(a)) if len(a) else "—",
                "our test set": ", ".join(sorted(set(a["eval_data"].dropna().astype(str)))) or "—",
                "source run": f"{run.label} (profile {_profile_name(run)})",
            })
            break
        rows.append(row)
    return pd.DataFrame(rows)


PROFILE_RANK = {"smoke": 0, "quick": 1, "paper": 2}  # training budgets, shortest first


def _profile_name(run: Run) -> str:
    prof = run.meta.get("profile")
    name = prof.get("name") if isinstance(prof, dict) else prof
    if not name:
        names = run.rows["profile"].dropna().astype(str).unique()
        name = names[0] if len(names) else "?"
    return str(name)


def _failures(runs: Sequence[Run]) -> pd.DataFrame:
    out = []
    for run in runs:
        df = run.rows
        bad = df[(df["error"] != "") | df["metric"].isin(["error", "train_error"])]
        for _, r in bad.iterrows():
            out.append({"run": run.label, "model": r["model"], "seed": int(r["seed"]), "cell": r["cell"],
                        "error": r["error"] or "(no message)"})
    return pd.DataFrame(out, columns=["run", "model", "seed", "cell", "error"])


def _missing_notes(run: Run) -> list[str]:
    notes = []
    if run.meta.get("status") not in (None, "finished"):
        notes.append(f"{run.label}: run status is '{run.meta.get('status')}' (interrupted or still running); "
                     "results may be incomplete.")
    present = set(run.models())
    requested = list(run.meta.get("models", []) or [])
    for m in requested:
        if m not in present:
            errs = [j.get("error") for j in run.meta.get("jobs", []) or [] if j.get("model") == m and j.get("error")]
            why = f" (training failed: {errs[0]})" if errs else ""
            notes.append(f"{run.label}: model {m} was requested but has no results{why}.")
    try:
        from capsbench.suites import get_suite

        defaults = [m for m in get_suite(run.suite).default_models if m not in present and m not in requested]
        if defaults:
            notes.append(f"{run.label}: suite default model(s) not run: {', '.join(defaults)}.")
    except Exception:
        pass
    for path, why in run.unreadable.items():
        notes.append(f"{run.label}: predictions file {path} cannot be read ({why}); that cell and seed are "
                     "left out of the claim verdicts (the accuracy tables come from results.csv and keep them).")
    expected = run.cell_names
    df = run.rows
    for model in sorted(present):
        for seed in run.seeds(model):
            sub = df[(df["model"] == model) & (df["seed"] == seed)]
            seen = set(sub["cell"])
            lost = [c for c in expected if c not in seen]
            if lost:
                shown = ", ".join(lost[:10]) + (f" and {len(lost) - 10} more" if len(lost) > 10 else "")
                notes.append(f"{run.label}: {model} seed {seed} has no rows for cell(s) {shown}.")
    return notes


def _provenance(run: Run) -> tuple[list[str], pd.DataFrame]:
    m = run.meta
    env = m.get("environment") or {}
    prof_name = _profile_name(run)
    eval_data = sorted(set(run.ok_rows()["eval_data"].dropna().astype(str)) - {"", "none"})  # not the train rows
    items = [
        f"command: {m.get('command') or '(not recorded)'}",
        f"status: {m.get('status', '?')}; profile: {prof_name}; eval images per cell: {m.get('eval_images_per_cell', '?')}",
        f"models: {', '.join(m.get('models', []) or [])}; seeds: {m.get('seeds', '?')}; "
        f"match accuracy: {m.get('match_accuracy')}",
        f"device: {m.get('device', '?')} ({env.get('device_name', '?')})",
        "versions: " + ", ".join(f"{k} {env[k]}" for k in ("capsbench", "python", "torch", "torchvision", "timm")
                                 if k in env),
        f"platform: {env.get('platform', '?')}; CPUs {env.get('cpu_count', '?')}, torch threads {env.get('torch_threads', '?')}",
        f"git sha: {env.get('git_sha') or ', '.join(sorted(set(run.rows['git_sha'].dropna().astype(str)))) or '?'}",
        f"data root: {m.get('data_root', '?')}",
        f"evaluation data: {', '.join(eval_data) or '?'}",
    ]
    if run.suite == "affnist":
        if "affnist" in eval_data:
            items.append("affNIST: the real affNIST test set (eval_data affnist)")
        elif "affnist_synth" in eval_data:
            items.append("affNIST: the generated affNIST-style stand-in (eval_data affnist_synth), not the real set")
    sums = m.get("data_checksums") or {}
    rows = [{"file": f, "sha256": str(v.get("sha256", ""))[:16], "md5": v.get("md5", ""), "status": v.get("status", "")}
            for f, v in sums.items() if isinstance(v, dict)]
    return items, pd.DataFrame(rows, columns=["file", "sha256", "md5", "status"])


def _verdict_table(verdicts: Sequence[Verdict]) -> pd.DataFrame:
    rows = []
    for v in verdicts:
        evaluated = np.isfinite(v.difference)
        rows.append({
            "claim": v.claim,
            "run": v.run or "—",
            "comparison": v.comparison,
            "measure": v.measure,
            "difference (pp)": f"{100 * v.difference:+.2f}" if evaluated else "—",
            "95% CI (pp; images and seeds)": f"[{100 * v.ci_low:+.2f}, {100 * v.ci_high:+.2f}]" if evaluated else "—",
            "p (two-sided)": f"{v.p_value:.2g}" if evaluated else "—",
            "p (Holm)": f"{v.p_holm:.2g}" if evaluated and np.isfinite(v.p_holm) else "—",
            "seeds": v.n_seeds if evaluated else "—",
            "verdict": v.verdict,
            "notes": " ".join(v.notes),
        })
    return pd.DataFrame(rows)


def verdict_lines(report_dir: str | Path) -> list[str]:
    """One line per claim evaluated in the report at ``report_dir`` (from tables/verdicts.csv),
    for the terminal: the verdict, the difference and its interval, the seeds, and for a verdict
    that is not definite the reason. Claims whose suite was not in the report are left out."""
    path = Path(report_dir) / "tables" / "verdicts.csv"
    if not path.is_file():
        return []
    table = pd.read_csv(path, keep_default_na=False)
    lines = []
    for _, r in table.iterrows():
        if not r["run"]:
            continue
        line = f"claim {r['claim']} ({r['comparison']}, {r['measure']}): {r['verdict']}"
        try:
            diff, lo, hi = (100 * float(r[c]) for c in ("difference", "ci_low", "ci_high"))
            line += f": {diff:+.2f} pp, 95% CI [{lo:+.2f}, {hi:+.2f}], {r['seeds']} seed(s)"
        except (TypeError, ValueError):
            pass
        if r["verdict"] not in ("supported", "refuted", "negligible"):
            why = [n.strip() for n in re.split(r"(?<=\.) (?=[A-Z'])", str(r["notes"]))
                   if "instead of" in n or "unknown" in n or n.startswith(("no ", "model", "NOT"))]
            if not why and r["verdict"] == "inconclusive" and "CI" in line:
                why = ["the interval holds 0 and reaches beyond +-1 point (more seeds or test images narrow it)."]
            if why:
                line += ". Why: " + " ".join(why)
        lines.append(line)
    return lines


# --------------------------------------------------------------------------- entry point


def check_metrics(metrics: Sequence[str] | None) -> list[str] | None:
    """Validate metric names for ``--metrics``; an unknown one raises, listing the valid ones."""
    if metrics is None:
        return None
    unknown = [m for m in metrics if m not in METRIC_ORDER]
    if unknown or not metrics:
        raise ConfigError(f"unknown metric(s) {', '.join(map(repr, unknown)) or '(none given)'} in --metrics; "
                          f"valid metrics: {', '.join(METRIC_ORDER)}")
    return list(metrics)


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, *, title: str | None = None,
                 data_root: str | Path | None = None, metrics: Sequence[str] | None = None) -> Path:
    """Write the report for ``run_dirs`` into ``out_dir``; returns the path of ``index.html``.

    ``metrics``: the metrics the tables show (default: all of accuracy, confidence, unchanged).

    Raises:
        CapsbenchError: a path is not a run directory, or a run has no result rows.
        ConfigError: an unknown metric name.
    """
    from capsbench.report_cost import add_cost_section, is_profile_run

    metrics = check_metrics(metrics)
    runs = load_runs(list(run_dirs))
    suite_runs = [r for r in runs if not is_profile_run(r)]  # profile runs only feed the Cost section
    out_dir = ensure_writable_dir(out_dir)
    tables_dir, figs_dir = out_dir / "tables", out_dir / "figures"
    for d, pattern in ((tables_dir, "*.csv"), (figs_dir, "*.png")):
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob(pattern):  # a rewritten report must not keep another run's figures
            old.unlink()
    title = title or "capsbench report: " + ", ".join(r.label for r in runs)
    summary = summarize(suite_runs)
    if metrics is not None and not summary.empty:
        summary = summary[summary["metric"].isin(metrics)]
    verdicts = [v for claim in CLAIMS for v in evaluate_claim(claim, suite_runs)]
    for v, adjusted in zip(verdicts, holm([v.p_value for v in verdicts]), strict=True):
        v.p_holm = adjusted

    doc = Doc()
    doc.h(1, title)
    doc.p(f"Generated {_dt.datetime.now().astimezone().isoformat(timespec='seconds')} from "
          f"{len(runs)} run director{'y' if len(runs) == 1 else 'ies'}: "
          + ", ".join(f"{r.label} (suite {r.suite})" for r in runs) + ".")
    doc.p("Numbers are percentages. Beside every model: its parameter count and its clean accuracy (the "
          "suite's untransformed cell). With several seeds a value is the mean ± the half-width of the t 95% "
          "confidence interval over seeds; with one seed the interval over seeds is n/a (1 seed) and the "
          "binomial Wilson 95% interval over that seed's test images is shown instead, labelled 'Wilson'.")

    tables: dict[str, pd.DataFrame] = {}
    skipped: list[str] = []

    # Claims
    doc.h(2, "Claim verdicts")
    doc.p(VERDICT_RULE)
    doc.p("Differences are A - B in percentage points, pooled over the claim's cells and seeds, both models "
          "scored on the same test images. 95% CI: the difference +- t x its standard error. The per-image "
          "differences, averaged over the claim's cells, form an images x seeds table; a two-way random-effects "
          "model splits the variance of its mean into a test-image part (which images were drawn) and a "
          "training part (the spread of the per-seed mean differences, the image x seed interaction in it once), "
          "Satterthwaite degrees of freedom (report.two_way_mean; in a null simulation the 95% interval covers "
          "the true difference 94-95% of the time: docs/methods.md). p: two-sided, from the same t; Holm's "
          "adjustment over the claims evaluated in this report. Rotations by +180 and -180 degrees are one "
          "image and are pooled once.")
    vt = _verdict_table(verdicts)
    tables["verdicts"] = pd.DataFrame([v.as_row() for v in verdicts])
    doc.table(vt, csv_name="verdicts")
    doc.bullets([f"{c.name}: {c.statement}; A = {c.a}, B = {c.b}." for c in CLAIMS])

    # Paper
    doc.h(2, "Comparison with the paper")
    doc.p(f"Source: {paper.CITATION} {paper.ARXIV_URL}")
    t1 = _table1_comparison(suite_runs)
    tables["paper_table1"] = t1
    doc.table(t1, caption="MNIST test error (%) next to the paper's Table 1 (mean ± standard deviation over 3 "
                          "trials there; over our seeds here, on the clean cell of suites trained with the paper's "
                          "data protocol, 28x28 digits shifted by up to 2 px, and the run's own training budget: "
                          "see 'source run' for the profile). Our 95% CI adds test-image sampling (binomial, on "
                          "the images of the clean cell) to the spread over seeds (report.proportion_ci); a sd over "
                          "3 seeds alone leaves out the images. Our mapping: capsnet = routing 3 with "
                          "reconstruction, capsnet_r1 = routing 1 with reconstruction, capsnet_norecon = routing 3 "
                          "without reconstruction, cnn_sabour = the baseline.")
    ta = _affnist_comparison(suite_runs)
    tables["paper_affnist"] = ta
    doc.table(ta, caption="affNIST (paper Section 5.2): accuracy on expanded MNIST and affNIST. The paper's CNN "
                          "has max-pooling and dropout; ours, cnn_maxpool, has max-pooling and no dropout. Our interval adds test-image "
                          "sampling to the spread over seeds (with one seed: the Wilson interval over the images).")

    # Per run
    for run in suite_runs:
        doc.h(2, f"Run {run.label}: suite {run.suite}")
        sm = run.suite_meta
        if sm.get("description"):
            doc.p(f"Suite: {sm['description']}.")
        if sm.get("claim"):
            if any(run.suite in c.suites for c in CLAIMS):
                doc.p(f"Claim tested: {sm['claim']} (verdict under 'Claim verdicts').")
            else:
                doc.p(f"Question: {sm['claim']}. Descriptive only: the report computes no verdict for this suite.")
        mt = _models_table(run, summary)
        tables[f"{_slug(run.label)}_models"] = mt
        if mt.empty:
            doc.p("No model has a successful cell in this run (see 'Missing pieces and failures').")
        else:
            doc.table(mt, caption="Models: parameters, clean accuracy, seeds and training budget.")
        metrics = [m for m in METRIC_ORDER if m in set(summary[summary["run_id"] == run.label]["metric"])]
        metrics += sorted(set(summary[summary["run_id"] == run.label]["metric"]) - set(metrics))
        for metric in metrics:
            t = _metric_table(run, summary, metric)
            name = f"{_slug(run.label)}_{_slug(metric)}"
            tables[name] = t
            doc.h(3, f"{metric}")
            cap = f"{metric} (%) per cell; 'seeds' is the number of seeds per value."
            if "direction" in t.columns and (t["direction"] == "mean").any():
                cap += (" Rows with direction 'mean' average the clockwise and counter-clockwise cells; their "
                        "Wilson interval counts the images of both (of one at 180 degrees, where both are the "
                        "same image).")
            if metric == "confidence":
                cap += (" Confidence is the true class's capsule length for capsule models and its softmax "
                        "probability for CNNs: two different quantities, so compare it within a family, not across.")
            doc.table(t, caption=cap)
        for fig in _run_figures(run, summary, figs_dir, data_root, skipped):
            doc.figure(fig.path, fig.caption)

    # Cost (profile runs)
    add_cost_section(doc, runs, figs_dir, tables, skipped)

    # Missing pieces
    doc.h(2, "Missing pieces and failures")
    fails = _failures(runs)
    tables["failures"] = fails
    notes = [n for run in suite_runs for n in _missing_notes(run)]
    if fails.empty and not notes:
        doc.p("Nothing is missing: every requested model has results and no cell failed.")
    doc.bullets(notes)
    if not fails.empty:
        doc.table(fails, caption="Failed cells and training jobs, with their error text:")
    present_suites = {r.suite for r in suite_runs}
    for suites, what in ((("rotation", "fashion_rotation"), "accuracy vs rotation angle"),
                         (("translation",), "translation heatmaps"), (("affnist",), "affNIST bars"),
                         (("part_shuffle",), "part-shuffle curves")):
        if not present_suites & set(suites):
            skipped.append(f"{what}: no {' / '.join(suites)} run was given.")
    doc.h(3, "Figures not drawn")
    if skipped:
        doc.bullets(skipped)
    else:
        doc.p("Every figure was drawn.")

    # Provenance
    doc.h(2, "Provenance")
    for run in runs:
        items, sums = _provenance(run)
        doc.h(3, f"{run.label} ({run.path})")
        doc.bullets(items)
        if not sums.empty:
            doc.table(sums, caption="Data files (sha256 truncated to 16 hex digits):")
    import capsbench

    doc.p(f"Report written by capsbench {capsbench.__version__} ({Path(__file__).name}); "
          f"paper numbers from capsbench/paper.py.")

    summary_out = summary.copy()
    tables["summary"] = summary_out
    for name, df in tables.items():
        atomic_write_text(tables_dir / f"{_slug(name)}.csv", df.to_csv(index=False))
    atomic_write_text(out_dir / "report.md", render_markdown(doc, out_dir))
    index = out_dir / "index.html"
    atomic_write_text(index, render_html(doc, title))
    return index


def _run_figures(run: Run, summary: pd.DataFrame, figs_dir: Path, data_root: str | Path | None,
                 skipped: list[str]) -> list[Figure]:
    figs: list[Figure] = []
    slug = _slug(run.label)

    def attempt(what: str, fn) -> None:
        try:
            result = fn()
        except Exception as e:  # a figure that cannot be drawn is reported, not fatal
            skipped.append(f"{run.label}: {what}: {type(e).__name__}: {e}")
            return
        if result:
            figs.append(result)

    plots = {
        "rotation": ("accuracy vs rotation angle", fig_rotation, "rotation"),
        "fashion_rotation": ("accuracy vs rotation angle", fig_rotation, "rotation"),
        "translation": ("translation heatmaps", fig_translation, "translation"),
        "affnist": ("affNIST bars", fig_affnist, "affnist"),
        "part_shuffle": ("part-shuffle curves", fig_part_shuffle, "part_shuffle"),
    }
    what, fn, key = plots.get(run.suite, ("accuracy per cell", fig_cells, "cells"))
    captions = {
        "rotation": "Accuracy vs rotation angle (mean of both directions; 0 is the clean cell). Band: t 95% CI "
                    "over seeds, or the Wilson 95% interval over images with one seed.",
        "translation": "Accuracy for each shift (dx, dy) of the test digits on the 40x40 canvas, one panel per model.",
        "affnist": "Accuracy on expanded MNIST and affNIST per model (error bars: t 95% CI over seeds or Wilson "
                   "with one seed); dashed lines: the paper's 79% (CapsNet) and 66% (CNN) on affNIST.",
        "part_shuffle": "Accuracy, true-class confidence and the fraction of predictions unchanged from the clean "
                        "image, vs the number of tiles per side k (k = 1 is the clean cell; x = two-tile swap). "
                        "Confidence is a capsule length for CapsNet and a softmax probability for the CNNs: not "
                        "comparable across the two families.",
        "cells": "Accuracy per cell and model.",
    }

    def main_plot():
        path = fn(summary, run, figs_dir / f"{key}_{slug}.png")
        if path is None:
            skipped.append(f"{run.label}: {what}: no rows to plot")
            return None
        return Figure(path, f"{run.label}: {captions[key]}")

    attempt(what, main_plot)

    def examples():
        path, note = fig_examples(run, figs_dir / f"examples_{slug}.png", data_root)
        if path is None:
            skipped.append(f"{run.label}: example images: {note}")
            return None
        return Figure(path, f"{run.label}: the first 8 test images in every cell, regenerated with each cell's "
                            f"seeded transform{note}.")

    attempt("example images", examples)

    def capsnet():
        got, note = fig_capsnet(run, figs_dir / f"reconstructions_{slug}.png",
                                figs_dir / f"capsule_dims_{slug}.png", data_root)
        if not got:
            skipped.append(f"{run.label}: CapsNet reconstructions and capsule dimensions: {note}")
        figs.extend(got)
        return None

    attempt("CapsNet reconstructions and capsule dimensions", capsnet)
    return figs


__all__ = [
    "CLAIMS",
    "CLEAN_CELLS",
    "VERDICT_RULE",
    "Claim",
    "Run",
    "Verdict",
    "compare_paired",
    "evaluate_claim",
    "find_run_dirs",
    "load_checkpoint_model",
    "load_run",
    "load_runs",
    "holm",
    "verdict_lines",
    "two_way_mean",
    "summarize",
    "t_half_width",
    "verdict_word",
    "wilson_interval",
    "write_report",
]
