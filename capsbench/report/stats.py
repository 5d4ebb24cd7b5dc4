"""The report's statistics, as pure functions of numbers (no runs, no files).

* Per cell: the mean over seeds with a t interval over seeds; with one seed, the binomial
  Wilson interval over the test images (:func:`t_half_width`, :func:`proportion_ci`,
  :func:`wilson_interval`).
* Claims: an images x seeds table of paired differences, split by a two-way random-effects
  model into image, seed and interaction parts, each counted once, with a Satterthwaite t
  (:func:`two_way_mean`, :func:`compare_paired`; docs/methods.md), Holm's adjustment across a
  family of claims (:func:`holm`), and the verdict rule (:func:`verdict_word`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

NEGLIGIBLE = 0.01  # +-1 percentage point
MIN_SEEDS = 2  # seeds per model before a claim can get a definite verdict (training variance)


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


def by_seed(units: Sequence[np.ndarray], seeds: Sequence[int]) -> np.ndarray:
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
    res = two_way_mean(by_seed([x - y for x, y in zip(a, b, strict=True)], seeds), level)
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
