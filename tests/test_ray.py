"""The Ray executor on a local Ray instance: same rows as the local executor (issue #7)."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import ray
import torch

from capsbench.evaluation.executors import eval_batches
from capsbench.evaluation.run import run_suite


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _table(run_dir):
    df = pd.read_csv(run_dir / "results.csv")
    df = df[df.metric != "train_time_s"]
    return df.sort_values(["model", "seed", "cell", "metric"]).reset_index(drop=True)


def test_ray_run_gives_the_same_rows_as_a_local_run(tmp_path, data_root, local_ray):
    kw = dict(models=["lenet5"], seeds=2, profile="smoke", data_root=data_root, device="cpu", progress=False,
              log=lambda m: None)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray task (cpus_per_task=1) does
    try:
        local = run_suite("part_shuffle", out=tmp_path / "local", **kw)
    finally:
        torch.set_num_threads(before)
    distributed = run_suite("part_shuffle", out=tmp_path / "ray", executor="ray", cpus_per_task=1, **kw)
    a, b = _table(local), _table(distributed)
    cols = ["model", "seed", "cell", "metric", "value", "n", "job_key", "error"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert len(b[b.metric == "unchanged"]) == 2 * 4
    meta = json.loads((distributed / "run.json").read_text())
    assert meta["executor"] == "ray" and meta["status"] == "finished"
    assert {j["seed"] for j in meta["jobs"]} == {0, 1}
    assert all(j["pid"] != os.getpid() for j in meta["jobs"])  # trained in Ray workers
    preds = sorted(p.relative_to(distributed) for p in (distributed / "predictions").glob("*/*.npz"))
    assert preds == sorted(p.relative_to(local) for p in (local / "predictions").glob("*/*.npz"))
    assert not list(distributed.glob("**/.*.tmp")) and not (distributed / ".lock").exists()


def test_a_cell_stays_in_the_batch_of_the_cell_it_is_compared_with():
    cells = ["clean", "shuffle_k2", "shuffle_k4", "shuffle_k7", "swap_k4"]
    batches = eval_batches("part_shuffle", cells, size=2)
    assert batches == [cells]  # every part-shuffle cell is compared with "clean"
    # with "clean" already done (read back from disk), the rest split freely
    assert eval_batches("part_shuffle", cells[1:], size=2) == [cells[1:3], cells[3:5]]
    from capsbench.suites.base import get_suite

    rot = [c.name for c in get_suite("rotation").cells]  # 25 cells, no references
    assert [len(b) for b in eval_batches("rotation", rot, size=8)] == [8, 8, 8, 1]
    assert sum(eval_batches("rotation", rot, size=8), []) == rot
