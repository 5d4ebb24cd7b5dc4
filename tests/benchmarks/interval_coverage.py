"""Coverage of the claim interval in simulated null data: the current rule
(``capsbench.report.stats.compare_paired``, two-way random effects) against the rule it replaced
(image bootstrap of seed-averaged differences plus each model's seed variance / S, which
counts the image x seed interaction twice; computed here with the bootstrap's analytic
variance). Prints a Markdown table for docs/methods.md.

    python tests/benchmarks/interval_coverage.py --reps 3000
"""

from __future__ import annotations

import argparse

import numpy as np

from capsbench import report
from capsbench.report import stats as report_stats


def replaced_rule_covers(a: np.ndarray, b: np.ndarray) -> bool:
    """a, b: images x seeds outcomes. The pre-2026-12 interval: var(row means of d)/n (what the
    image bootstrap of seed-averaged differences estimates) + var(per-seed means of A)/S +
    var(per-seed means of B)/S, Welch-Satterthwaite degrees of freedom."""
    d = a - b
    n, s = d.shape
    parts = [float(np.var(x.mean(axis=0), ddof=1)) / s for x in (a, b)]
    var_img = float(d.mean(axis=1).var(ddof=1)) / n
    total = var_img + sum(parts)
    denom = sum(p * p for p in parts) / (s - 1)
    df = total * total / denom if denom > 0 else float("inf")
    return abs(float(d.mean())) <= report_stats._t_quantile(df) * np.sqrt(total)


def experiment(rng, n: int, seeds: int, cells: int, sd_seed: float) -> tuple[bool, bool]:
    difficulty = rng.normal(2.0, 2.0, n)  # logit of an image's chance to be right
    outcomes = []
    for _model in range(2):  # A and B drawn alike: the true difference is 0
        logit = (difficulty[:, None, None] + rng.normal(0, sd_seed, seeds)[None, :, None]
                 + rng.normal(0, 1.0, (n, seeds, cells)))
        outcomes.append((rng.random((n, seeds, cells)) < 1 / (1 + np.exp(-logit))).astype(float))
    a, b = outcomes
    units_a = [a[:, s, c] for s in range(seeds) for c in range(cells)]
    units_b = [b[:, s, c] for s in range(seeds) for c in range(cells)]
    res = report.compare_paired(units_a, units_b, [s for s in range(seeds) for _ in range(cells)])
    return res["ci_low"] <= 0 <= res["ci_high"], replaced_rule_covers(a.mean(axis=2), b.mean(axis=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3000)
    ap.add_argument("--images", type=int, default=1000)
    args = ap.parse_args()
    settings = [(3, 1, 0.0), (3, 23, 0.0), (3, 1, 0.05), (3, 1, 0.1), (3, 1, 0.2), (3, 1, 0.5), (3, 23, 0.2),
                (2, 1, 0.2), (5, 1, 0.0)]
    print("| seeds | cells | sd_seed | coverage, this rule (%) | coverage, replaced rule (%) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for i, (seeds, cells, sd_seed) in enumerate(settings):
        rng = np.random.default_rng(1000 + i)
        hits = np.array([experiment(rng, args.images, seeds, cells, sd_seed) for _ in range(args.reps)])
        new, old = hits.mean(axis=0)
        print(f"| {seeds} | {cells} | {sd_seed:g} | {100 * new:.1f} | {100 * old:.1f} |", flush=True)


if __name__ == "__main__":
    main()
