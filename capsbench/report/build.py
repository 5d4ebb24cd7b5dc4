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
  images (paired by image); the interval of the difference A - B counts test-image sampling,
  seed-to-seed training variance and their interaction once each (two-way random effects,
  Satterthwaite t: :mod:`capsbench.report.stats`, docs/methods.md). With one seed per model
  the training part cannot be estimated and no claim gets a definite verdict.

Directories written by ``capsbench profile`` (``suite == "profile"``) are accepted too: they
feed the "Cost" section (throughput, FLOPs, achieved GFLOP/s, stage breakdown;
:mod:`capsbench.report.cost`) and are left out of the accuracy tables and claim verdicts.

Anything missing (a model, a failed cell, a checkpoint, the data for example images) is
reported in the report itself; only input that is not a run directory at all is an error.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from capsbench.errors import ConfigError
from capsbench.report import paper
from capsbench.report.claims import VERDICT_RULE, Claim, Verdict, compare_claim, evaluate_claim, list_claims
from capsbench.report.figures import (
    _model_order,
    fig_affnist,
    fig_capsnet,
    fig_cells,
    fig_claims,
    fig_examples,
    fig_part_shuffle,
    fig_rotation,
    fig_rotation_difference,
    fig_translation,
)
from capsbench.report.leaderboard import leaderboard, write_leaderboard
from capsbench.report.load import METRIC_ORDER, TABLE1_PROTOCOL, Run, load_runs
from capsbench.report.render import (
    Doc,
    Figure,
    _fmt_value,
    _params_h,
    _pct,
    _slug,
    render_html,
    render_markdown,
    try_draw,
)
from capsbench.report.stats import holm, proportion_ci
from capsbench.report.summary import _clean_accuracy, _params, summarize
from capsbench.store import (
    atomic_write_text,
    ensure_writable_dir,
)

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
        from capsbench.suites.base import get_suite

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


def lead_sentence(v: Verdict) -> str:
    """One sentence for the top of the report: the claim, its verdict, the difference with its
    interval and seeds, and the clean-digit difference beside it."""
    head = f"{v.claim} ({v.run}): {v.statement}: {v.verdict}"
    if not np.isfinite(v.difference):
        return f"{head}. " + (v.notes[0] if v.notes else "")
    out = (f"{head}, {v.comparison} = {100 * v.difference:+.2f} points ({v.measure}), 95% CI "
           f"{100 * v.ci_low:+.2f} to {100 * v.ci_high:+.2f}, {v.n_seeds} seed(s)")
    if np.isfinite(v.clean_difference):
        out += (f"; on clean digits {100 * v.clean_difference:+.2f} points "
                f"({100 * v.clean_ci_low:+.2f} to {100 * v.clean_ci_high:+.2f})")
    return out + "."


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


def comparison_claims(runs: Sequence[Run], compare: Sequence[tuple[str, str]]) -> list[Claim]:
    """The claims ``--compare A:B`` poses: one per suite whose runs hold both models. A model that
    no run holds is an error (one line naming the models the runs do hold)."""
    out = []
    held = {m for r in runs for m in r.models()}
    for a, b in compare:
        absent = [m for m in (a, b) if m not in held]
        if absent:
            raise ConfigError(f"--compare {a}:{b}: no run given holds {' or '.join(absent)} (models in the runs: "
                              f"{', '.join(sorted(held)) or 'none'})")
        suites = list(dict.fromkeys(r.suite for r in runs if {a, b} <= set(r.models())))
        if not suites:
            raise ConfigError(f"--compare {a}:{b}: no run holds both models; give runs of one suite that hold both")
        out.extend(compare_claim(a, b, s) for s in suites)
    return out


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, *, title: str | None = None,
                 data_root: str | Path | None = None, metrics: Sequence[str] | None = None,
                 claims: Sequence[Claim] | None = None, compare: Sequence[tuple[str, str]] = ()) -> Path:
    """Write the report for ``run_dirs`` into ``out_dir``; returns the path of ``index.html``.

    ``metrics``: the metrics the tables show (default: all of accuracy, confidence, unchanged).
    ``claims``: the claims to judge (default: the registered ones, :func:`list_claims`);
    ``compare``: (A, B) model pairs, each posed as a claim on every suite whose runs hold both
    (:func:`capsbench.report.claims.compare_claim`). All of them form one Holm family.

    Raises:
        CapsbenchError: a path is not a run directory, or a run has no result rows.
        ConfigError: an unknown metric name.
    """
    from capsbench.report.cost import add_cost_section, is_profile_run

    metrics = check_metrics(metrics)
    runs = load_runs(list(run_dirs))
    suite_runs = [r for r in runs if not is_profile_run(r)]  # profile runs only feed the Cost section
    claims = list(list_claims() if claims is None else claims) + comparison_claims(suite_runs, compare)
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
    verdicts = [v for claim in claims for v in evaluate_claim(claim, suite_runs)]
    for v, adjusted in zip(verdicts, holm([v.p_value for v in verdicts]), strict=True):
        v.p_holm = adjusted

    doc = Doc()
    doc.h(1, title)
    doc.p(f"Generated {_dt.datetime.now().astimezone().isoformat(timespec='seconds')} from "
          f"{len(runs)} run director{'y' if len(runs) == 1 else 'ies'}: "
          + ", ".join(f"{r.label} (suite {r.suite})" for r in runs) + ".")

    # The answer first: one sentence per claim, and every claim in one figure
    doc.h(2, "Answer")
    judged = [v for v in verdicts if v.run]
    doc.bullets([lead_sentence(v) for v in judged] or ["No claim could be judged: no run of a claim's suite was given."])
    skipped_early: list[str] = []
    _, fig = try_draw(skipped_early, "claims summary figure", lambda: fig_claims(judged, figs_dir / "claims.png"))
    if fig is not None:
        doc.figure(fig, "Each claim's difference A - B in percentage points with its 95% interval over test images "
                        "and seeds (filled, coloured by verdict), the same two models' difference on clean digits "
                        "(hollow, grey), and the +-1 point band inside which a difference is negligible.")
    doc.toc()
    doc.p("Numbers are percentages. Beside every model: its parameter count and its clean accuracy (the "
          "suite's untransformed cell). With several seeds a value is the mean ± the half-width of the t 95% "
          "confidence interval over seeds; with one seed the interval over seeds is n/a (1 seed) and the "
          "binomial Wilson 95% interval over that seed's test images is shown instead, labelled 'Wilson'.")

    tables: dict[str, pd.DataFrame] = {}
    skipped: list[str] = list(skipped_early)

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
    doc.bullets([f"{c.name}: {c.statement}; A = {c.a}, B = {c.b}." for c in claims])

    # Leaderboard: the same numbers as leaderboard.csv / .json beside the report
    board = leaderboard(suite_runs)
    write_leaderboard(board, out_dir)
    doc.h(2, "Leaderboard")
    doc.p("One row per model and run (leaderboard.csv and leaderboard.json beside this report, for scripts). "
          "Accuracy in percent with its 95% interval over test images and seeds (test images only with one "
          "seed); robust accuracy: the mean over the suite's transformed cells, each distinct rotation once; "
          "GFLOPs: one inference pass per image; training images/s: the mean over the model's jobs.")
    doc.table(board.drop(columns=["ci_note"]).rename(columns=lambda c: c.replace("_pct", " (%)").replace("_", " ")))

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
            if any(run.suite in c.suites for c in claims):
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
        _add_breakdown(doc, run, board, figs_dir, tables, skipped)

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
          f"paper numbers from capsbench/report/paper.py.")

    summary_out = summary.copy()
    tables["summary"] = summary_out
    for name, df in tables.items():
        atomic_write_text(tables_dir / f"{_slug(name)}.csv", df.to_csv(index=False))
    atomic_write_text(out_dir / "report.md", render_markdown(doc, out_dir))
    index = out_dir / "index.html"
    atomic_write_text(index, render_html(doc, title))
    return index


def _add_breakdown(doc: Doc, run: Run, board: pd.DataFrame, figs_dir: Path, tables: dict[str, pd.DataFrame],
                   skipped: list[str]) -> None:
    """Per suite: which digits survive rotation, calibration within each family, accuracy vs cost."""
    from capsbench.report import breakdown

    slug = _slug(run.label)
    families = dict(zip(board["model"], board["family"], strict=True)) if not board.empty else {}

    def attempt(what: str, fn, caption: str) -> None:
        ok, path = try_draw(skipped, f"{run.label}: {what}", fn)
        if ok and path is None:
            skipped.append(f"{run.label}: {what}: no predictions to draw it from")
        elif ok:
            doc.figure(path, f"{run.label}: {caption}")

    if any(c.get("transform") == "rotation" for c in run.suite_meta.get("cells", []) or []):
        attempt("accuracy per digit under rotation",
                lambda: breakdown.fig_per_class_rotation(run, figs_dir / f"per_class_{slug}.png"),
                "accuracy of each true digit at each rotation angle (pooled over seeds): which digits survive.")
    cal = breakdown.calibration_table(run, families)
    if cal.empty:
        skipped.append(f"{run.label}: calibration: its predictions hold no confidence of the predicted class "
                       "(runs scored before capsbench stored it; score the cells again in a new run folder)")
    else:
        tables[f"{slug}_calibration"] = cal
        doc.table(cal, caption="Calibration: expected calibration error (ECE, points; 10 equal-width bins of the "
                               "predicted class's confidence), accuracy and mean confidence, on the clean cell and "
                               "on the transformed cells pooled. Compare within a family: a capsule's length and a "
                               "softmax probability are different quantities.")
        attempt("reliability diagram", lambda: breakdown.fig_reliability(run, families, figs_dir / f"reliability_{slug}.png"),
                "reliability diagrams on the transformed cells, one panel per model family (the diagonal is "
                "perfect calibration).")
    attempt("accuracy vs parameters and FLOPs",
            lambda: breakdown.fig_accuracy_vs_cost(board, run, figs_dir / f"cost_{slug}.png"),
            "accuracy against parameters and GFLOPs per image (one inference pass), one point per model; circles: "
            "mean over the transformed cells with its 95% interval, triangles: clean accuracy.")


def _run_figures(run: Run, summary: pd.DataFrame, figs_dir: Path, data_root: str | Path | None,
                 skipped: list[str]) -> list[Figure]:
    figs: list[Figure] = []
    slug = _slug(run.label)

    def attempt(what: str, fn) -> None:
        _, result = try_draw(skipped, f"{run.label}: {what}", fn)
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
        "rotation": "Accuracy vs rotation angle, counter-clockwise (> 0) and clockwise (< 0) apart; 0 is the clean "
                    "cell. Band: t 95% CI over seeds, or the Wilson 95% interval over images with one seed.",
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

    pair = run.suite_meta.get("claim_models") or []
    if run.suite in ("rotation", "fashion_rotation") and len(pair) == 2:
        a, b = pair

        def difference():
            path = fig_rotation_difference(run, a, b, figs_dir / f"rotation_difference_{slug}.png")
            if path is None:
                skipped.append(f"{run.label}: {a} - {b} by rotation angle: no paired predictions of both models")
                return None
            return Figure(path, f"{run.label}: {a} - {b} accuracy at each rotation angle, clockwise (< 0) and "
                                "counter-clockwise (> 0) apart, paired on the same test images; band: 95% CI over "
                                "test images and seeds; grey: the +-1 point band of a negligible difference.")

        attempt(f"{a} - {b} by rotation angle", difference)

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
