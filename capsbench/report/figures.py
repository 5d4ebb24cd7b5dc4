"""The report's figures (matplotlib, written as PNG): robustness curves, examples, CapsNet
reconstructions and capsule dimensions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from capsbench.errors import describe
from capsbench.report import paper
from capsbench.report.load import Run
from capsbench.report.render import Figure
from capsbench.train.protocols import split_entry

CAPSULE_DECODER_MODELS = ("capsnet", "capsnet_r1", "capsnet_uniform")


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


PCT_COLUMNS = ("mean", "ci_low", "ci_high", "wilson_low", "wilson_high")


def _in_percent(s: pd.DataFrame) -> pd.DataFrame:
    """The summary's means and interval edges in percent (every figure's unit, as the tables')."""
    s = s.copy()
    for c in PCT_COLUMNS:
        if c in s.columns:
            s[c] = 100 * s[c].astype(float)
    return s


def _band(sub: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, str]:
    """Lower and upper edges of the interval drawn around a mean: t CI, else Wilson."""
    multi = (sub["n_seeds"] >= 2).all()
    if multi:
        return sub["ci_low"].to_numpy(float), sub["ci_high"].to_numpy(float), "t 95% CI over seeds"
    return sub["wilson_low"].to_numpy(float), sub["wilson_high"].to_numpy(float), "Wilson 95% over images (1 seed)"


def _signed_angle(df: pd.DataFrame) -> pd.Series:
    """Rotation angle in degrees, counter-clockwise positive, clockwise negative (0 for the clean cell)."""
    sign = np.where(df["direction"].astype(str) == "cw", -1.0, 1.0)
    return pd.Series(sign * df["angle"].astype(float).to_numpy(), index=df.index)


def fig_rotation(summary: pd.DataFrame, run: Run, path: Path) -> Path | None:
    s = summary[(summary["run_id"] == run.label) & (summary["metric"] == "accuracy")]
    if "direction" not in s.columns or "angle" not in s.columns:
        return None
    s = _in_percent(s[s["direction"].isin(["cw", "ccw"]) | (s["cell"] == run.clean_cell)])
    if s.empty:
        return None
    s = s.assign(signed=_signed_angle(s))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    kinds, colours = set(), {}
    order = _model_order(run, s)
    # a model trained on rotations (capsnet@rot180) is dashed, in its upright twin's colour
    for model in sorted(order, key=lambda m: split_entry(m)[1] is not None):
        sub = s[s["model"] == model].sort_values("signed")
        x = sub["signed"].to_numpy(float)
        lo, hi, kind = _band(sub)
        kinds.add(kind)
        base, aug = split_entry(model)
        style = {"ls": "--", "color": colours[base]} if aug and base in colours else {}
        (line,) = ax.plot(x, sub["mean"].to_numpy(float), marker="o", ms=3, label=model, **style)
        colours.setdefault(base, line.get_color())
        ok = np.isfinite(lo) & np.isfinite(hi)
        if ok.any():
            ax.fill_between(x[ok], lo[ok], hi[ok], color=line.get_color(), alpha=0.2, lw=0)
    ax.axhline(10, color="grey", ls=":", lw=1, label="chance")
    ax.set_xlabel("rotation angle (degrees; counter-clockwise > 0, clockwise < 0)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 102)
    ticks = sorted(s["signed"].dropna().unique())
    ax.set_xticks(ticks[::2] if len(ticks) > 13 else ticks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, not on them
    ax.set_title(f"{run.label}: accuracy vs rotation (band: {', '.join(sorted(kinds))})", fontsize=9)
    return _save(fig, path)


def fig_rotation_difference(run: Run, a: str, b: str, path: Path) -> Path | None:
    """A - B accuracy by signed rotation angle (clockwise < 0), with its 95% interval over test
    images and seeds and the +-1 point band inside which a difference counts as negligible."""
    from capsbench.report.claims import difference_by_cell

    cells = [c for c in run.suite_meta.get("cells", []) or [] if c.get("transform") == "rotation"]
    if not cells or not {a, b} <= set(run.models()):
        return None
    d = difference_by_cell(run, a, b, [c["name"] for c in cells])
    if d.empty:
        return None
    meta = {c["name"]: c.get("params") or {} for c in cells}
    d["signed"] = [(-1 if meta[c].get("direction") == "cw" else 1) * float(meta[c].get("angle", 0)) for c in d["cell"]]
    d = d.sort_values("signed")
    x = d["signed"].to_numpy(float)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.axhspan(-1, 1, color="grey", alpha=0.15, lw=0, label="+-1 point: negligible")
    ax.axhline(0, color="grey", lw=0.8)
    ax.fill_between(x, 100 * d["ci_low"].to_numpy(float), 100 * d["ci_high"].to_numpy(float), color="tab:blue",
                    alpha=0.25, lw=0, label="95% CI (test images and seeds)")
    ax.plot(x, 100 * d["difference"].to_numpy(float), marker="o", ms=3, color="tab:blue", label=f"{a} - {b}")
    ax.set_xlabel("rotation angle (degrees; counter-clockwise > 0, clockwise < 0)")
    ax.set_ylabel("accuracy difference (points)")
    ticks = sorted(set(x))
    ax.set_xticks(ticks[::2] if len(ticks) > 13 else ticks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{run.label}: {a} - {b} accuracy by rotation angle ({int(d['n_seeds'].max())} seed(s))", fontsize=9)
    return _save(fig, path)


VERDICT_COLOURS = {"supported": "#0a6b0a", "refuted": "#a40000", "negligible": "#444444", "inconclusive": "#b08800"}


def fig_claims(verdicts: Sequence, path: Path) -> Path | None:
    """One row per evaluated claim: its difference with the 95% interval (coloured by verdict),
    the same two models' difference on clean digits beside it (grey), and the +-1 point band."""
    rows = [v for v in verdicts if np.isfinite(v.difference)]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.9 * len(rows) + 1.4))
    ax.axvspan(-1, 1, color="grey", alpha=0.15, lw=0)
    ax.axvline(0, color="grey", lw=0.8)
    for i, v in enumerate(rows):
        y = len(rows) - 1 - i
        colour = VERDICT_COLOURS.get(v.verdict, "black")
        ax.errorbar(100 * v.difference, y + 0.12, xerr=[[100 * (v.difference - v.ci_low)], [100 * (v.ci_high - v.difference)]],
                    fmt="o", color=colour, capsize=4, ms=7, lw=2)
        ax.annotate(f"{v.verdict}: {100 * v.difference:+.2f} [{100 * v.ci_low:+.2f}, {100 * v.ci_high:+.2f}]",
                    (100 * v.ci_high, y + 0.12), xytext=(6, -4), textcoords="offset points", fontsize=8, color=colour)
        if np.isfinite(v.clean_difference):
            ax.errorbar(100 * v.clean_difference, y - 0.22,
                        xerr=[[100 * (v.clean_difference - v.clean_ci_low)], [100 * (v.clean_ci_high - v.clean_difference)]],
                        fmt="o", mfc="white", color="grey", capsize=3, ms=5, lw=1)
    ax.set_yticks(range(len(rows)), [f"{v.claim} ({v.run})\n{v.comparison}, {v.measure}" for v in reversed(rows)],
                  fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    lo = min(100 * min(v.ci_low, v.clean_ci_low if np.isfinite(v.clean_ci_low) else v.ci_low) for v in rows)
    hi = max(100 * max(v.ci_high, v.clean_ci_high if np.isfinite(v.clean_ci_high) else v.ci_high) for v in rows)
    span = max(hi, 1.5) - min(lo, -1.5)
    ax.set_xlim(min(lo, -1.5) - 0.05 * span, max(hi, 1.5) + 0.45 * span)  # room for the labels on the right
    ax.set_xlabel("difference A - B (percentage points); filled: the claim's cells, hollow grey: clean digits; "
                  "shaded: +-1 point", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Claims: difference with its 95% interval (test images and seeds)", fontsize=9)
    return _save(fig, path)


def fig_translation(summary: pd.DataFrame, run: Run, path: Path) -> Path | None:
    s = summary[(summary["run_id"] == run.label) & (summary["metric"] == "accuracy")]
    if "dx" not in s.columns or "dy" not in s.columns:
        return None
    s = _in_percent(s.dropna(subset=["dx", "dy"]))
    models = _model_order(run, s)
    if not models:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models) + 0.8, 3.8), squeeze=False)
    im = None
    for ax, model in zip(axes[0], models, strict=True):
        piv = s[s["model"] == model].pivot_table(index="dy", columns="dx", values="mean", aggfunc="mean")
        piv = piv.sort_index(ascending=False)
        im = ax.imshow(piv.to_numpy(float), vmin=0, vmax=100, cmap="viridis", aspect="equal")
        ax.set_xticks(range(piv.shape[1]), [f"{int(v):+d}" for v in piv.columns], fontsize=7)
        ax.set_yticks(range(piv.shape[0]), [f"{int(v):+d}" for v in piv.index], fontsize=7)
        ax.set_xlabel("dx (px)")
        ax.set_ylabel("dy (px)")
        ax.set_title(model, fontsize=9)
        vals = piv.to_numpy(float)
        if vals.size <= 81:
            for (i, j), v in np.ndenumerate(vals):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 60 else "black")
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="accuracy (%)")
    fig.suptitle(f"{run.label}: accuracy by shift (dx, dy)", fontsize=10)
    return _save(fig, path)


def fig_affnist(summary: pd.DataFrame, run: Run, path: Path) -> Path | None:
    s = _in_percent(summary[(summary["run_id"] == run.label) & (summary["metric"] == "accuracy")])
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
    ax.axhline(100 * paper.AFFNIST_CAPSNET, color="tab:red", ls="--", lw=1.2, label="paper: CapsNet on affNIST, 79%")
    ax.axhline(100 * paper.AFFNIST_CNN, color="tab:purple", ls="--", lw=1.2, label="paper: CNN on affNIST, 66%")
    ax.set_xticks(range(len(models)), models, rotation=20, fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # below: never over a bar
    synth = "affnist_synth" in set(s["eval_data"].dropna().astype(str))
    ax.set_title(f"{run.label}: expanded MNIST and "
                 + ("the generated affNIST-style set (affnist_synth; the paper's lines are real affNIST)"
                    if synth else "affNIST") + " accuracy", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def fig_part_shuffle(summary: pd.DataFrame, run: Run, path: Path) -> Path | None:
    s = _in_percent(summary[summary["run_id"] == run.label])
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
        ax.set_ylabel(f"{metric} (%)")
        ax.set_ylim(0, 102)
        ax.set_title(metric if metric != "unchanged" else "unchanged prediction (vs clean)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{run.label}: part shuffle", fontsize=10, y=1.03)  # above the panels' own titles
    return _save(fig, path)


def fig_cells(summary: pd.DataFrame, run: Run, path: Path) -> Path | None:
    """Generic grouped bars of accuracy per cell (suites without a figure of their own)."""
    s = _in_percent(summary[(summary["run_id"] == run.label) & (summary["metric"] == "accuracy")])
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
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
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
    from capsbench.data.datasets import load_dataset
    from capsbench.train.device import to_float

    root = data_root if data_root is not None else run.meta.get("data_root")
    dataset = run.suite_meta.get("dataset") or "mnist"
    test = load_dataset(dataset, "test", root)
    return to_float(test.images[:n]), test.labels[:n], root


def _cell_images(run: Run, suite, name: str, x, y, root):
    """The images of cell ``name`` made from test digits ``x`` (labels ``y``), as the suite scores
    them: (images, labels, display name). A cell with its own data (affNIST) gives its first len(y)."""
    from capsbench.suites.base import cell_generator

    cell = suite.cell(name)
    if cell.source is not None:
        cache = run.path.parent / "cache"
        imgs, labels, eval_data = cell.source({"n": len(y), "cache_dir": cache if cache.is_dir() else None,
                                               "root": root})
        return imgs, labels, f"{name} ({eval_data})"
    return cell.make(x.clone(), y.clone(), cell_generator(run.suite, cell.name)), y, name


def fig_examples(run: Run, path: Path, data_root: str | Path | None) -> tuple[Path | None, str]:
    """A row of the first 8 test images as each cell transforms them."""
    from capsbench.suites.base import get_suite

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
            imgs, _, name = _cell_images(run, suite, cell.name, x, y, root)
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
        for p in sorted((run.path.parent / "jobs").glob(f"{split_entry(model)[0]}-*-s{seed}-{key}/checkpoint.pt")):
            return p
    return None


def load_checkpoint_model(path: Path):
    """Rebuild a trained model on the CPU from a job checkpoint; returns (model, TrainConfig)."""
    import dataclasses

    import torch

    from capsbench.train.config import TrainConfig
    from capsbench.train.jobs import build_model

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


def _recon_cells(run: Run) -> list[str]:
    """The cells whose inputs the CapsNet figures show: the clean one and up to three transformed
    ones (rotation: +30, +45 and +90 degrees; otherwise the suite's first three)."""
    names = run.cell_names
    preferred = [c for c in ("rot+30", "rot+45", "rot+90") if c in names]
    others = [c for c in names if c != run.clean_cell]
    picked = preferred or others[:3]
    return ([run.clean_cell] if run.clean_cell in names else []) + picked


def fig_capsnet(run: Run, recon_path: Path, dims_path: Path, data_root: str | Path | None
                ) -> tuple[list[Figure], str]:
    """CapsNet reconstructions of 8 test digits and the paper's Figure 4 (capsule dimension sweeps)."""
    import torch

    from capsbench.train.protocols import PROTOCOLS

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
    x, y, root = _test_images(run, data_root)
    shown = _recon_cells(run)
    rows, row_labels, inputs = [], [], []  # inputs: (cell, images, labels, predictions, poses)
    from capsbench.suites.base import get_suite

    try:
        suite = get_suite(run.suite)
    except Exception:
        suite, shown = None, []
    for name in shown:
        try:
            imgs, labels, display = _cell_images(run, suite, name, x, y, root)
        except Exception:  # that cell's data cannot be regenerated here: show the others
            continue
        if name == run.clean_cell and imgs.shape[-1] != PROTOCOLS.get(cfg.protocol).input_size:
            imgs = PROTOCOLS.get(cfg.protocol).clean(imgs)
        with torch.inference_mode():
            out = model(imgs.float())
            pred = out.scores.argmax(1)
            recon = model.decode(out.poses, pred).reshape(-1, imgs.shape[-2], imgs.shape[-1])
        rows += [imgs[:, 0].float().clamp(0, 1).numpy(), recon.numpy()]
        row_labels += [display, "reconstruction"]
        inputs.append((name, imgs, labels, pred, out.poses))
    if not inputs:  # no cell regenerated: the clean digits as the protocol places them
        imgs = PROTOCOLS.get(cfg.protocol).clean(x)
        with torch.inference_mode():
            out = model(imgs)
            pred = out.scores.argmax(1)
            recon = model.decode(out.poses, pred).reshape(-1, imgs.shape[-2], imgs.shape[-1])
        rows, row_labels = [imgs[:, 0].numpy(), recon.numpy()], ["input", "reconstruction"]
        inputs.append(("clean", imgs, y, pred, out.poses))
    figs = []
    title = (f"{run.label}: {model_name} (seed {seed}): the first 8 test digits in "
             + ", ".join(n for n, *_ in inputs) + ", each with its reconstruction from the predicted capsule")
    _show_mosaic(rows, row_labels, None, title, recon_path)
    figs.append(Figure(recon_path, f"{model_name} seed {seed}: 8 test digits as the suite's cells present them "
                                   f"({', '.join(n for n, *_ in inputs)}), each row followed by the reconstruction "
                                   "decoded from the capsule of the predicted class."))
    # Figure 4 on the most transformed cell shown: perturb each of the 16 dimensions of the
    # winning capsule by -0.25..0.25 (step 0.05) and decode.
    cell_name, imgs, y, pred, cell_poses = inputs[-1]
    side = imgs.shape[-1]
    correct = (pred == torch.as_tensor(y)).nonzero().flatten()
    i = int(correct[0]) if len(correct) else 0
    deltas = torch.arange(-5, 6, dtype=torch.float32) * 0.05
    dim = cell_poses.shape[-1]
    cls = int(pred[i])
    poses = cell_poses[i].unsqueeze(0).repeat(dim * len(deltas), 1, 1).clone()
    for d in range(dim):
        poses[d * len(deltas) : (d + 1) * len(deltas), cls, d] += deltas
    with torch.inference_mode():
        imgs = model.decode(poses, torch.full((poses.shape[0],), cls, dtype=torch.long)).reshape(dim, len(deltas), side, side)
    _show_mosaic([imgs[d].numpy() for d in range(dim)], [f"dim {d}" for d in range(dim)],
                 [f"{v:+.2f}" for v in deltas.tolist()],
                 f"{run.label}: {model_name} capsule dimensions ({cell_name}, test image #{i}, label {int(y[i])}, "
                 f"predicted {cls})", dims_path)
    figs.append(Figure(dims_path, f"As the paper's Figure 4, on cell {cell_name}: each row perturbs one of the {dim} "
                                  f"dimensions of the winning capsule (test image #{i}, predicted {cls}) by -0.25 to "
                                  "0.25 in steps of 0.05 and decodes it."))
    return figs, ""
