"""capsbench report on ``capsbench profile`` directories: the Cost section, its table and figures.

The profile is a real one, tiny (lenet5 and capsnet at batch size 2, r = 1 and 3, ~5 s on a CPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib import image as mpimg

from capsbench import report
from capsbench.perf.profiler import profile_models, write_profile

COST_FIGURES = ("cost_throughput", "cost_routing", "cost_stages", "cost_achieved")


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory) -> Path:
    rows = profile_models(["lenet5", "capsnet"], batch_sizes=[2], routing_iters=[1, 3], device="cpu", repeats=3)
    return write_profile(rows, tmp_path_factory.mktemp("prof"))


@pytest.fixture(scope="module")
def built(profile_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    report.write_report([profile_dir], out)
    return out


def test_cost_section_and_figures(profile_dir, built):
    md = (built / "report.md").read_text()
    assert "## Cost" in md
    assert (built / "index.html").is_file()
    # what the timings ran, per model and mode (batch 2: CapsNet's direct convolutions)
    assert "Implementations timed (`--conv auto --routing auto`" in md
    assert "capsnet r3 train: conv direct, routing " in md and "lenet5 train" not in md
    slug = profile_dir.name
    for name in COST_FIGURES:
        png = built / "figures" / f"{name}_{slug}.png"
        assert png.is_file(), name
        assert f"figures/{png.name}" in md
        assert float(np.var(mpimg.imread(png))) > 0, name
    # profile rows are not accuracy results: no per-run accuracy section, claims not evaluated
    assert f"## Run {slug}" not in md
    v = pd.read_csv(built / "tables" / "verdicts.csv", keep_default_na=False)
    assert set(v["verdict"]) == {"not evaluated"}


def test_achieved_gflops_match_results_csv(profile_dir, built):
    res = pd.read_csv(profile_dir / "results.csv")
    res = res[res["error"].isna()]
    res["r"] = res["routing_iters"].fillna(-1)
    flops = res[res["metric"] == "flops_train_step"].set_index(["model", "r"])["value"]
    ips = res[res["metric"] == "images_per_s_train"]
    expected = {(m, r, int(b)): flops.loc[(m, r)] * v / 1e9
                for m, r, b, v in ips[["model", "r", "batch_size", "value"]].itertuples(index=False)}
    assert len(expected) == 3  # lenet5, capsnet r1, capsnet r3 at batch 2

    table = pd.read_csv(built / "tables" / f"cost_{profile_dir.name}.csv")
    table["r"] = table["routing iters"].fillna(-1)
    got = {(m, r, int(b)): g for m, r, b, g in
           table[["model", "r", "batch size", "achieved GFLOP/s (train)"]].itertuples(index=False)}
    assert got.keys() == expected.keys()
    for k, g in got.items():
        assert g == pytest.approx(expected[k], rel=1e-9), k
    # the Markdown table shows the same numbers (4 significant digits)
    md = (built / "report.md").read_text()
    for k, g in expected.items():
        assert f"| {format(g, '.4g')} |" in md, k


def test_mix_of_suite_and_profile_runs(profile_dir, tmp_path):
    from test_report import LABELS, ROT_CELLS, _outcome, _write_run

    rng = np.random.default_rng(1)
    preds = {(m, 0, c): np.where(_outcome(rng, 0.9), LABELS, (LABELS + 1) % 10)
             for m in ("capsnet", "cnn_maxpool") for c in ROT_CELLS}
    run_dir = _write_run(tmp_path / "runs", "rotation", ROT_CELLS, preds, models=["capsnet", "cnn_maxpool"])
    out = tmp_path / "rep"
    report.write_report([run_dir, profile_dir], out)
    md = (out / "report.md").read_text()
    assert "## Run rotation-smoke: suite rotation" in md
    assert "## Cost" in md
    assert (out / "figures" / "rotation_rotation-smoke.png").is_file()
    for name in COST_FIGURES:
        assert (out / "figures" / f"{name}_{profile_dir.name}.png").is_file()
    summary = pd.read_csv(out / "tables" / "summary.csv")
    assert set(summary["suite"]) == {"rotation"}


def test_missing_rows_skip_figures_with_a_note(profile_dir, tmp_path):
    d = tmp_path / "profile-cpu"
    d.mkdir()
    (d / "run.json").write_text((profile_dir / "run.json").read_text())
    res = pd.read_csv(profile_dir / "results.csv")
    res = res[~res["metric"].isin(["stage_time_s", "stage_share", "routing_share"])]
    res = res[~((res["model"] == "capsnet") & res["metric"].isin(["time_train_step_s"]))]
    res.to_csv(d / "results.csv", index=False)
    out = tmp_path / "rep"
    report.write_report([d], out)
    md = (out / "report.md").read_text()
    assert "profile-cpu: stage breakdown: no rows to plot" in md
    assert "profile-cpu: time per training step vs routing iterations: no rows to plot" in md
    assert (out / "figures" / "cost_throughput_profile-cpu.png").is_file()
    assert not (out / "figures" / "cost_stages_profile-cpu.png").exists()
