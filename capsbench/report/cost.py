"""The "Cost" section of ``capsbench report``, drawn from ``capsbench profile`` run directories.

A profile run (``suite == "profile"``, see :mod:`capsbench.perf.profiler`) gives, per model and
routing-iteration count r: FLOPs per image (``cell`` "model[-rR]", no batch size) and, per batch
size, timings, throughput and (at the stage batch size) a per-stage breakdown. For each profile
run this module adds a table and four figures:

* table: model, batch size, r, train / inference images per second, GFLOP per image of a
  training step, achieved GFLOP/s = ``flops_train_step * images_per_s_train / 1e9`` and the
  routing share of the step;
* throughput vs batch size per model (train and inference, log x);
* time per training step vs routing iterations (capsule models);
* stacked stage breakdown (forward + backward ``stage_time_s`` per stage, one bar per model);
* achieved GFLOP/s per model (FLOPs counted vs time measured), one bar per batch size.

A figure whose rows are missing is skipped with a note in "Figures not drawn".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from capsbench.report.figures import _pyplot, _save
from capsbench.report.load import Run
from capsbench.report.render import Doc, _slug, try_draw

PROFILE_SUITE = "profile"
COST_COLUMNS = [
    "model", "batch size", "routing iters", "train img/s", "inference img/s",
    "GFLOP/image (train step)", "achieved GFLOP/s (train)", "routing share",
]


def is_profile_run(run: Run) -> bool:
    return run.suite == PROFILE_SUITE


def _ok(run: Run) -> pd.DataFrame:
    df = run.rows
    df = df[(df["error"] == "") & df["value"].notna()].copy()
    for col in ("batch_size", "routing_iters"):
        df[col] = pd.to_numeric(df[col], errors="coerce") if col in df.columns else np.nan
    for col in ("stage", "pass"):
        df[col] = df[col].map(lambda x: "" if pd.isna(x) else str(x)) if col in df.columns else ""
    return df


def _r_key(r: float) -> float:
    """NaN-safe key for a routing-iteration count (-1 for models without routing)."""
    return -1.0 if pd.isna(r) else float(r)


def _label(model: str, r: float) -> str:
    return model if pd.isna(r) else f"{model} (r{int(r)})"


def cost_table(run: Run) -> pd.DataFrame:
    """Numeric cost table of one profile run (one row per model, r and batch size)."""
    df = _ok(run)
    df["_r"] = df["routing_iters"].map(_r_key)
    per_model = df[df["batch_size"].isna()]
    flops = {(m, r): v for m, r, v in per_model[per_model["metric"] == "flops_train_step"][["model", "_r", "value"]]
             .itertuples(index=False)}
    timed = df[df["batch_size"].notna()]
    rows = []
    for (model, r, bs), g in timed.groupby(["model", "_r", "batch_size"], sort=False):
        def val(metric: str, g=g) -> float:
            s = g[g["metric"] == metric]["value"]
            return float(s.iloc[0]) if len(s) else float("nan")

        train = val("images_per_s_train")
        f = flops.get((model, r), float("nan"))
        rows.append({
            "model": model,
            "batch size": int(bs),
            "routing iters": np.nan if r < 0 else int(r),
            "train img/s": train,
            "inference img/s": val("images_per_s_inference"),
            "GFLOP/image (train step)": f / 1e9,
            "achieved GFLOP/s (train)": f * train / 1e9,
            "routing share": val("routing_share"),
        })
    out = pd.DataFrame(rows, columns=COST_COLUMNS)
    if not out.empty:
        out = out.sort_values(["model", "routing iters", "batch size"], kind="stable", na_position="first")
    return out.reset_index(drop=True)


def _fmt(x: float, spec: str) -> str:
    return "—" if x is None or pd.isna(x) else format(x, spec)


def _display(t: pd.DataFrame) -> pd.DataFrame:
    d = t.copy().astype(object)
    d["routing iters"] = [_fmt(x, ".0f") for x in t["routing iters"]]
    for c in ("train img/s", "inference img/s"):
        d[c] = [_fmt(x, ".1f") for x in t[c]]
    d["GFLOP/image (train step)"] = [_fmt(x, ".4g") for x in t["GFLOP/image (train step)"]]
    d["achieved GFLOP/s (train)"] = [_fmt(x, ".4g") for x in t["achieved GFLOP/s (train)"]]
    d["routing share"] = [_fmt(x, ".1%") for x in t["routing share"]]
    return d


def _main_r(t: pd.DataFrame) -> dict[str, float]:
    """Per model, the r timed at the most batch sizes (the model's own r; ties: r = 3, then the largest)."""
    out: dict[str, float] = {}
    for model, g in t.groupby("model", sort=False):
        counts = g.groupby(g["routing iters"].map(_r_key))["batch size"].nunique()
        best = max(counts.index, key=lambda r: (counts[r], r == 3, r))
        out[model] = float("nan") if best < 0 else best
    return out


def _main_rows(t: pd.DataFrame) -> pd.DataFrame:
    main = _main_r(t)
    keep = [_r_key(r) == _r_key(main[m]) for m, r in zip(t["model"], t["routing iters"], strict=True)]
    return t[keep]


def fig_throughput(t: pd.DataFrame, path: Path) -> Path | None:
    m = _main_rows(t)
    if m[["train img/s", "inference img/s"]].notna().sum().sum() == 0:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, col, name in zip(axes, ("train img/s", "inference img/s"), ("training step", "inference"), strict=True):
        for (model, r), g in m.groupby(["model", m["routing iters"].map(_r_key)], sort=False):
            g = g[g[col].notna()].sort_values("batch size")
            if len(g):
                ax.plot(g["batch size"], g[col], marker="o", label=_label(model, np.nan if r < 0 else r))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.set_title(name)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def fig_routing(t: pd.DataFrame, run: Run, path: Path) -> Path | None:
    df = _ok(run)
    df = df[(df["metric"] == "time_train_step_s") & df["routing_iters"].notna() & df["batch_size"].notna()]
    if df.empty:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for (model, bs), g in df.groupby(["model", "batch_size"], sort=True):
        if g["routing_iters"].nunique() < 2 and df[df["model"] == model]["routing_iters"].nunique() >= 2:
            continue  # a batch size timed at one r only: the routing curve is drawn at the routing batch size
        g = g.sort_values("routing_iters")
        ax.plot(g["routing_iters"], g["value"], marker="o", label=f"{model}, batch {int(bs)}")
    ax.set_xlabel("routing iterations r")
    ax.set_ylabel("seconds per training step (median)")
    ax.set_xticks(sorted(df["routing_iters"].unique()))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def fig_stages(t: pd.DataFrame, run: Run, path: Path) -> tuple[Path | None, str]:
    df = _ok(run)
    df = df[(df["metric"] == "stage_time_s") & df["pass"].isin(["forward", "backward"]) & (df["stage"] != "")]
    if df.empty:
        return None, ""
    main = _main_r(t) if not t.empty else {}
    bars: list[tuple[str, int, pd.Series]] = []
    for model, g in df.groupby("model", sort=False):
        r = main.get(model, g["routing_iters"].iloc[0])
        g = g[g["routing_iters"].map(_r_key) == _r_key(r)] if g["routing_iters"].notna().any() else g
        if g.empty:
            g = df[df["model"] == model]
            r = g["routing_iters"].iloc[0]
            g = g[g["routing_iters"].map(_r_key) == _r_key(r)]
        bs = int(g["batch_size"].iloc[0])
        g = g[g["batch_size"] == bs]
        per_stage = g.groupby("stage", sort=False)["value"].sum()
        bars.append((_label(model, r), bs, per_stage))
    stages: list[str] = []
    for _, _, s in bars:
        stages += [x for x in s.index if x not in stages and x != "other"]
    if any("other" in s.index for _, _, s in bars):
        stages.append("other")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(bars) + 3), 4.5))
    x = np.arange(len(bars))
    bottom = np.zeros(len(bars))
    cmap = plt.get_cmap("tab20")
    for i, stage in enumerate(stages):
        h = np.array([float(s.get(stage, 0.0)) for _, _, s in bars])
        ax.bar(x, h, bottom=bottom, label=stage, color=cmap(i % 20))
        bottom += h
    ax.set_xticks(x, [f"{lbl}\nbatch {bs}" for lbl, bs, _ in bars], fontsize=8)
    ax.set_ylabel("seconds per training step (forward + backward)")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.grid(alpha=0.3, axis="y")
    sizes = sorted({bs for _, bs, _ in bars})
    return _save(fig, path), ", ".join(str(b) for b in sizes)


def fig_achieved(t: pd.DataFrame, path: Path) -> Path | None:
    m = _main_rows(t)
    m = m[m["achieved GFLOP/s (train)"].notna()]
    if m.empty:
        return None
    labels = list(dict.fromkeys(_label(mo, r) for mo, r in zip(m["model"], m["routing iters"], strict=True)))
    sizes = sorted(m["batch size"].unique())
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(labels) + 2), 4))
    width = 0.8 / len(sizes)
    x = np.arange(len(labels))
    lab = [_label(mo, r) for mo, r in zip(m["model"], m["routing iters"], strict=True)]
    for j, bs in enumerate(sizes):
        h = []
        for name in labels:
            s = m[[a == name for a in lab] & (m["batch size"] == bs).to_numpy()]["achieved GFLOP/s (train)"]
            h.append(float(s.iloc[0]) if len(s) else 0.0)
        ax.bar(x + (j - (len(sizes) - 1) / 2) * width, h, width, label=f"batch {int(bs)}")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("achieved GFLOP/s (training step)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def implementations_note(run: Run) -> str:
    """One sentence on what the timings ran: the --conv / --routing settings and, per model and
    mode, the convolution path and routing kernel at each batch size (from run.json; "" for a
    profile written before run.json recorded them)."""
    ran = run.meta.get("implementations") or {}
    if not ran:
        return ""
    settings = run.meta.get("settings", {})
    parts = []
    for label, cells in ran.items():
        for mode in ("train", "inference"):
            groups: dict[str, list[str]] = {}
            for cell, modes in cells.items():
                used = modes.get(mode)
                if used:
                    groups.setdefault(", ".join(f"{k} {v}" for k, v in sorted(used.items())), []).append(cell)
            if groups:
                parts.append(f"{label} {mode}: " + "; ".join(f"{impl} ({', '.join(c)})" for impl, c in groups.items()))
    return (f"Implementations timed (`--conv {settings.get('conv_impl', 'auto')} --routing "
            f"{settings.get('routing', 'auto')}`; auto = each model's own choice, which training uses): "
            + ". ".join(parts) + ".")


def add_cost_section(doc: Doc, runs: Sequence[Run], figs_dir: Path, tables: dict[str, pd.DataFrame],
                     skipped: list[str]) -> None:
    """Append the "Cost" section for the profile runs among ``runs`` to ``doc``."""
    prof = [r for r in runs if is_profile_run(r)]
    if not prof:
        return
    doc.h(2, "Cost")
    doc.p("From `capsbench profile`. FLOPs are per image, counted by torch's FlopCounterMode (matrix products "
          "and convolutions only; the optimizer update is not counted). Images per second are batch size / "
          "median time per call. Achieved GFLOP/s = FLOPs of a training step per image × training images per "
          "second / 1e9. Routing share: (u_hat + routing) / instrumented training step, at the stage batch size.")
    for run in prof:
        _add_run(doc, run, figs_dir, tables, skipped)


def _add_run(doc: Doc, run: Run, figs_dir: Path, tables: dict[str, pd.DataFrame], skipped: list[str]) -> None:
    """The Cost subsection of one profile run: table and figures."""
    slug = _slug(run.label)
    doc.h(3, f"Cost: {run.label} (device {run.meta.get('environment', {}).get('device', '?')})")
    t = cost_table(run)
    tables[f"cost_{slug}"] = t
    if t.empty:
        doc.p("No timed configuration in this profile run.")
    else:
        doc.table(_display(t), caption="Throughput, FLOPs and achieved GFLOP/s per model, routing "
                                       "iterations and batch size ('—': not measured or failed).")

    note = implementations_note(run)
    if note:
        doc.p(note)

    def draw(what: str, fn, caption: str) -> None:
        ok, res = try_draw(skipped, f"{run.label}: {what}", fn)
        if not ok:
            return
        path, extra = res if isinstance(res, tuple) else (res, "")
        if path is None:
            skipped.append(f"{run.label}: {what}: no rows to plot")
        else:
            doc.figure(path, f"{run.label}: {caption.format(extra=extra)}")

    draw("throughput vs batch size", lambda: fig_throughput(t, figs_dir / f"cost_throughput_{slug}.png"),
         "Training and inference images per second vs batch size (log-log), each model at its own routing "
         "iterations.")
    draw("time per training step vs routing iterations",
         lambda: fig_routing(t, run, figs_dir / f"cost_routing_{slug}.png"),
         "Median seconds per training step vs routing iterations (capsule models).")
    draw("stage breakdown", lambda: fig_stages(t, run, figs_dir / f"cost_stages_{slug}.png"),
         "Training step split into stages (forward + backward stage_time_s, medians over instrumented "
         "steps; the optimizer update is left out), at the stage batch size ({extra}).")
    draw("FLOPs vs measured time", lambda: fig_achieved(t, figs_dir / f"cost_achieved_{slug}.png"),
         "Achieved GFLOP/s of a training step (counted FLOPs × measured images per second) per model and "
         "batch size.")


__all__ = ["COST_COLUMNS", "add_cost_section", "cost_table", "is_profile_run"]
