"""Do two versions of capsbench give the same rows? Runs one suite (smoke rotation by default)
with the code of a git revision and with the working tree, and compares results.csv: every
row's model, seed, cell, metric, value, n and job key, exactly. Timings (train_time_s) and
what names the run (run_id, git_sha) are left out. Exit status 1 if anything differs.

    python tests/benchmarks/same_rows.py 1727e6a --data-root ../shared/data

Used to show that a change of layout changed no behaviour (issue 19).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

KEY = ["model", "seed", "cell", "metric"]
COMPARED = KEY + ["value", "n", "job_key", "eval_data", "transform", "error"]
TIMINGS = {"train_time_s"}


def run(tree: Path, out: Path, args: argparse.Namespace) -> pd.DataFrame:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "capsbench", "run", "--suite", args.suite, "--profile", args.profile,
           "--models", args.models, "--seeds", str(args.seeds), "--out", str(out), "--data-root", args.data_root]
    print("$", " ".join(cmd), f"(code from {tree})", flush=True)
    subprocess.run(cmd, env=env, cwd=out.parent, check=True, stdout=subprocess.DEVNULL)
    df = pd.read_csv(out / f"{args.suite}-{args.profile}" / "results.csv", keep_default_na=False, na_values=[""])
    df = df[~df["metric"].isin(TIMINGS)]
    return df[[c for c in COMPARED if c in df.columns]].sort_values(KEY).reset_index(drop=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", help="the git revision to compare the working tree with")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--suite", default="rotation")
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--models", default="capsnet,cnn_maxpool,lenet5,efficientnet_b0")
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args()
    args.data_root = str(Path(args.data_root).resolve())
    repo = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.base], cwd=repo, check=True)
        try:
            before = run(base, Path(tmp) / "runs-base", args)
            after = run(repo, Path(tmp) / "runs-tree", args)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=repo, check=False)
    if before.equals(after):
        print(f"identical: {len(after)} rows ({after['model'].nunique()} models, {after['cell'].nunique()} cells), "
              f"{args.base} and the working tree")
        return 0
    diff = before.merge(after, on=KEY, how="outer", suffixes=("_base", "_tree"), indicator=True)
    cols = [c for c in COMPARED if c not in KEY]
    bad = diff[(diff["_merge"] != "both") | ~pd.concat(
        [(diff[f"{c}_base"] == diff[f"{c}_tree"]) | (diff[f"{c}_base"].isna() & diff[f"{c}_tree"].isna())
         for c in cols if f"{c}_base" in diff], axis=1).all(axis=1)]
    print(f"DIFFERENT: {len(bad)} of {len(diff)} rows")
    print(bad.to_string(max_rows=40))
    return 1


if __name__ == "__main__":
    sys.exit(main())
