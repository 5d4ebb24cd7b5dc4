"""Reading run directories: results.csv, run.json and predictions/ as a :class:`Run`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from capsbench.errors import CapsbenchError, describe
from capsbench.store import (
    ID_COLUMNS,
    PROVENANCE_COLUMNS,
    TEXT_COLUMNS,
    VALUE_COLUMNS,
    read_predictions,
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
_NON_GRID = set(ID_COLUMNS) | set(VALUE_COLUMNS) | set(PROVENANCE_COLUMNS)


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
        folder = self.path / "predictions" / f"{model}-s{seed}-{key}"
        try:
            out = read_predictions(folder, cell)
            if out is None:
                return None
            if not {"pred", "label"} <= set(out) or len(out["pred"]) != len(out["label"]):
                raise ValueError("no per-image 'pred' and 'label' of one length in it")
        except Exception as e:  # cut off or garbled: that cell is missing, the report goes on
            name = next((p for p in (folder / f"{cell}.npz", folder / f"{cell}.pt") if p.is_file()), folder)
            self.unreadable[str(name)] = describe(e, 120)
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
