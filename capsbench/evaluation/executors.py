"""Where a suite's work runs: in this process (``local``) or as Ray tasks (``ray``).

A suite run is a grid of training jobs (model x seed) and, for each, evaluation cells. The
driver (:func:`capsbench.evaluation.run.run_suite`) plans the grid, hands it to an executor and
writes every result the executor reports as soon as it arrives, so a crash loses nothing
finished. Executors yield events:

* ``("trained", spec, meta)``: a job finished training (or was reused); ``meta`` is a dict;
* ``("train_failed", spec, message)``: a job could not be trained; the grid goes on;
* ``("cells", spec, rows)``: tidy rows of one or more evaluated cells.

With Ray, each training job and each batch of evaluation cells is one Ray task. Workers read
the data root and write checkpoints and per-image predictions into the run's ``--out``
folder, so on a cluster that folder and the data root must be on storage every node sees
(NFS, a shared volume), at the same path. The driver alone writes ``results.csv`` and
``run.json``. Jobs run with the same seeds and thread count give the same numbers on either
executor (tested).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from capsbench.errors import CapsbenchError, ConfigError, describe, first_line
from capsbench.models import count_parameters

EXECUTORS = ("local", "ray")


@dataclass
class JobSpec:
    """One training job of the grid and the cells it still has to be evaluated on."""

    cfg: Any  # TrainConfig
    base: dict[str, Any]  # identity and provenance columns of its rows
    cells: list[str]


@dataclass
class RunContext:
    """What every task needs to know about the run (plain data: it travels to Ray workers)."""

    suite: str
    out: str
    run_dir: str
    data_root: str | None
    device: str
    n_eval: int
    # the test images every cell scores (capsbench.data.splits.eval_subset); None: all of them
    eval_indices: list[int] | None = None
    deterministic: bool = False
    threads: int | None = None
    progress: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    speed: dict[str, bool] = field(default_factory=dict)  # SpeedOptions as plain data


def job_meta(result: Any) -> dict[str, Any]:
    """The summary of a trained job that goes into run.json and the job's rows."""
    cfg = result.config
    return {
        "model": cfg.model,
        "seed": cfg.seed,
        "job_key": cfg.key,
        "job_dir": str(result.job_dir),
        "steps": result.steps_done,
        "batch_size": cfg.resolved(60_000)[1],
        "train_time_s": result.train_time_s,
        "images_per_s": result.images_per_s,
        "stopped_early_at": result.stopped_early_at,
        "match_accuracy": cfg.match_accuracy,
        "match_val_accuracy": result.match_val_accuracy,
        "split": result.split,
        "reused": result.reused,
        "params": count_parameters(result.model),
        "oom_retries": list(result.oom_retries),
        "trained_config": asdict(cfg),
        "checkpoint": cfg.checkpoint,
        "checkpoint_sha256": cfg.checkpoint_sha256,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def _prepare_process(ctx: RunContext) -> None:
    from capsbench.malloc import keep_freed_memory
    from capsbench.train.device import set_deterministic

    keep_freed_memory()
    from capsbench.models.registry import resolve_model

    for source in (ctx.extra.get("plugins") or {}).values():  # pkg.module:factory models, in this process too
        resolve_model(source)
    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    if ctx.deterministic:
        set_deterministic(True)


def _test_inputs(ctx: RunContext, dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    from capsbench.data.fetch import ensure_dataset
    from capsbench.train.device import to_float

    test = ensure_dataset(dataset, root=ctx.data_root, split="test", download=False)
    if ctx.eval_indices is None:
        return to_float(test.images), test.labels
    idx = torch.as_tensor(ctx.eval_indices, dtype=torch.long)
    return to_float(test.images[idx]), test.labels[idx]


def train_job(ctx: RunContext, cfg: Any, log: Callable[[str], None] = print,
              label: str | None = None) -> tuple[Any | None, dict | str]:
    """Train (or reuse) one job; returns (TrainResult, meta) or (None, error message).
    ``label`` names it in progress output (e.g. "[job 3/8] capsnet s1")."""
    from capsbench.train.device import SpeedOptions
    from capsbench.train.trainer import train_with_retry

    progress = (label or True) if ctx.progress else False
    try:
        result = train_with_retry(cfg, out=ctx.out, data_root=ctx.data_root, device=ctx.device,
                                  progress=progress, log=log, speed=SpeedOptions(**ctx.speed))
    except CapsbenchError as e:  # NaN loss, out of memory at every size, bad data
        return None, str(e)
    return result, job_meta(result)


def evaluate_job_cells(
    ctx: RunContext, spec: JobSpec, cells: list[str], result: Any = None,
    log: Callable[[str], None] = print, persist: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate ``cells`` of one trained job (loading it from its checkpoint if not given)."""
    from capsbench.evaluation.cells import evaluate_cells
    from capsbench.suites.base import get_suite
    from capsbench.train.device import resolve_device
    from capsbench.train.jobs import load_finished

    suite = get_suite(ctx.suite)
    dev = resolve_device(ctx.device)
    if result is None:
        result = load_finished(spec.cfg, ctx.out, dev)
    x_clean, y = _test_inputs(ctx, suite.dataset)
    by_name = {c.name: c for c in suite.cells}
    base = {k: v for k, v in spec.base.items() if not k.startswith("_")}
    eval_ctx = {"n": ctx.n_eval, "indices": ctx.eval_indices, "cache_dir": Path(ctx.out) / "cache",
                "root": ctx.data_root}
    return evaluate_cells(suite, result, [by_name[c] for c in cells], x_clean, y, Path(ctx.run_dir), base,
                          dev, log, eval_ctx, persist)


# --------------------------------------------------------------------------- local


class LocalExecutor:
    """Everything in this process, one job after another, each cell persisted as it ends."""

    name = "local"

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.log = log

    def run(self, specs: list[JobSpec], ctx: RunContext) -> Iterator[tuple[str, JobSpec, Any]]:
        from capsbench.train.trainer import _duration

        _prepare_process(ctx)
        t0 = time.perf_counter()
        for i, spec in enumerate(specs):
            label = f"[job {i + 1}/{len(specs)}] {spec.base.get('model', spec.cfg.model)} s{spec.cfg.seed}"
            spent = time.perf_counter() - t0
            # a rough guide to the time left: the jobs so far, as if every job took as long
            self.log(f"{label}: " + (f"{_duration(spent)} so far, about {_duration(spent / i * (len(specs) - i))} "
                                     "left for the run" if i else "training or reusing it, then scoring its cells"))
            result, meta = train_job(ctx, spec.cfg, self.log, label)
            if result is None:
                yield "train_failed", spec, meta
                continue
            yield "trained", spec, meta
            for cell in spec.cells:
                yield "cells", spec, evaluate_job_cells(ctx, spec, [cell], result, self.log)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- Ray


def _ray_train(ctx: RunContext, cfg: Any) -> dict | str:
    _prepare_process(ctx)
    _, meta = train_job(ctx, cfg)
    return meta


def _ray_eval(ctx: RunContext, spec: JobSpec, cells: list[str]) -> list[dict[str, Any]]:
    _prepare_process(ctx)
    return evaluate_job_cells(ctx, spec, cells)


def eval_batches(suite_name: str, cells: list[str], size: int) -> list[list[str]]:
    """Split a job's cells into batches; a cell stays with the cell it is compared against."""
    from capsbench.suites.base import get_suite

    suite = get_suite(suite_name)
    ref = {c.name: c.reference for c in suite.cells}
    todo = set(cells)
    groups: dict[str, list[str]] = {}
    for c in cells:  # cells in suite order; a reference comes before the cells that use it
        root = c
        while ref.get(root) in todo:
            root = ref[root]
        groups.setdefault(root, []).append(c)
    batches: list[list[str]] = []
    for group in groups.values():
        if batches and len(batches[-1]) + len(group) <= size:
            batches[-1].extend(group)
        else:
            batches.append(list(group))
    return batches


class RayExecutor:
    """Each training job and each batch of evaluation cells as a Ray task.

    Args:
        address: a running cluster (``ray://host:10001``, ``host:6379`` or ``auto``); None
            starts a local Ray instance for the run (or uses the one this process started).
        cpus_per_task: CPUs each task asks for; it also sets the task's torch threads.
        gpus_per_task: GPUs each task asks for; None: 1 when the cluster has GPUs and the
            device is not ``cpu``, else 0.
        eval_batch: cells per evaluation task.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        cpus_per_task: int = 1,
        gpus_per_task: float | None = None,
        eval_batch: int = 8,
        log: Callable[[str], None] = print,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError(
                "--executor ray needs Ray; install it with: pip install 'capsbench[ray]'"
            ) from None
        if cpus_per_task < 1:
            raise ConfigError(f"--cpus-per-task must be >= 1, got {cpus_per_task}")
        self.ray = ray
        self.log = log
        self.started = False
        if not ray.is_initialized():
            try:
                if address:
                    ray.init(address=address, log_to_driver=True)
                else:
                    ray.init(include_dashboard=False, log_to_driver=True)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"at {address}" if address else "locally"
                raise ConfigError(
                    f"cannot start or reach a Ray cluster {where} ({first_line(e) or type(e).__name__}); "
                    "check --ray-address (e.g. ray://HEAD:10001) or run with --executor local"
                ) from None
            self.started = True
        self.cpus_per_task = cpus_per_task
        self.gpus_per_task = gpus_per_task
        self.eval_batch = eval_batch

    def run(self, specs: list[JobSpec], ctx: RunContext) -> Iterator[tuple[str, JobSpec, Any]]:
        ray = self.ray
        gpus = self.gpus_per_task
        if gpus is None:
            have = ray.cluster_resources().get("GPU", 0)
            gpus = 1 if have >= 1 and ctx.device != "cpu" else 0
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus and self.cpus_per_task > cpus:
            raise ConfigError(f"--cpus-per-task {self.cpus_per_task} is more than the cluster's {cpus:g} CPUs")
        opts = {"num_cpus": self.cpus_per_task, "num_gpus": gpus, "max_retries": 0}
        task_ctx = RunContext(**{**asdict(ctx), "threads": self.cpus_per_task, "progress": False})
        train_remote = ray.remote(_ray_train).options(**opts)
        eval_remote = ray.remote(_ray_eval).options(**opts)
        pending: dict[Any, tuple[str, JobSpec]] = {
            train_remote.remote(task_ctx, spec.cfg): ("train", spec) for spec in specs
        }
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            kind, spec = pending.pop(ref)
            try:
                value = ray.get(ref)
            except Exception as e:  # a worker that died (killed, out of host memory)
                value = f"Ray task failed: {describe(e)}"
                if kind == "cells":
                    yield "cells", spec, [_error_row(spec, c, value) for c in spec.base["_batch"]]
                    continue
            if kind == "train":
                if isinstance(value, str):
                    yield "train_failed", spec, value
                    continue
                yield "trained", spec, value
                cfg = spec.cfg
                if value.get("oom_retries"):  # it trained at a smaller batch size: load that job
                    from capsbench.train.config import TrainConfig

                    cfg = TrainConfig(**value["trained_config"])
                for batch in eval_batches(ctx.suite, spec.cells, self.eval_batch):
                    bspec = JobSpec(cfg, {**spec.base, "_batch": batch}, batch)
                    pending[eval_remote.remote(task_ctx, bspec, batch)] = ("cells", bspec)
            else:
                yield "cells", spec, value

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def _error_row(spec: JobSpec, cell: str, message: str) -> dict[str, Any]:
    base = {k: v for k, v in spec.base.items() if not k.startswith("_")}
    return {**base, "eval_data": "none", "transform": "error", "cell": cell, "metric": "error",
            "value": float("nan"), "n": 0, "error": message}


def make_executor(name: str, log: Callable[[str], None] = print, **ray_kw: Any) -> LocalExecutor | RayExecutor:
    if name == "local":
        return LocalExecutor(log)
    if name == "ray":
        return RayExecutor(log=log, **ray_kw)
    raise ConfigError(f"unknown executor {name!r}; choose one of: {', '.join(EXECUTORS)}")


__all__ = ["EXECUTORS", "JobSpec", "RunContext", "LocalExecutor", "RayExecutor", "make_executor",
           "eval_batches", "train_job", "evaluate_job_cells", "job_meta"]
