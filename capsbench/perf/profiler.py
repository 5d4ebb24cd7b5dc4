"""``capsbench profile``: FLOPs, time, memory and a per-stage breakdown, CapsNet next to CNNs.

What is measured, per model (and, for capsule models, per routing-iteration count r):

* ``params``: trainable and frozen parameters.
* ``flops_inference`` / ``flops_train_step``: FLOPs per image counted by
  :class:`torch.utils.flop_counter.FlopCounterMode` at batch size 2, divided by 2. The mode
  counts matrix products and convolutions (``aten.mm/addmm/bmm/baddbmm/convolution`` and
  their backward), not element-wise work. The training step is forward + loss + backward;
  the optimizer update is NOT counted. FlopCounterMode is a dispatch mode, so it also sees
  the ``torch.matmul`` calls inside CapsNet's hand-written routing backward
  (``_DynamicRouting.backward``); ``tests/test_profiler.py`` checks that exactly.
* ``routing_flops_inference`` / ``routing_flops_train``: the routing work of capsule models
  (u_hat and dynamic routing) counted analytically with :func:`routing_flops`, element-wise
  parts included.
* Per batch size: ``time_inference_s`` and ``time_train_step_s`` (median seconds per call),
  ``iqr_inference_s`` / ``iqr_train_step_s`` (interquartile range), ``images_per_s_inference``
  and ``images_per_s_train`` (batch / median). A training step is zero_grad + forward +
  ``model.loss`` + backward + Adam step; inference is ``model.eval()`` under ``torch.no_grad``.
  Timing: ``warmup`` calls (the second one is skipped when the first took over a second), then
  up to ``repeats`` timed repeats, each a block of calls lasting at least ~20 ms (one call for
  anything slower) whose mean is one sample; after ``min(3, repeats)`` repeats a configuration
  stops once it has used ``budget_s`` seconds. CPU: ``time.perf_counter``; CUDA:
  ``torch.cuda.Event`` pairs around the block, then synchronize.
* Memory. CUDA: ``peak_cuda_alloc_inference_bytes`` / ``peak_cuda_alloc_train_bytes``, the
  ``torch.cuda.max_memory_allocated`` after a reset (weights, gradients and Adam state
  included). CPU: ``peak_rss_process_bytes`` is ``ru_maxrss``, the peak resident memory of the
  WHOLE PROCESS so far (monotone: it never goes down, so it also holds earlier, bigger
  configurations), and ``peak_rss_increase_bytes`` is how much that peak grew during this
  configuration (0 when it stayed under an earlier peak; batch sizes run in increasing order).
* Stage breakdown of the training step at one batch size (32 on CPU, 128 on GPU by default):
  a few steps run inside :func:`capsbench.models.base.record_stages` and the stage marks are
  turned into per-stage forward and backward times (:func:`split_stage_times`). Rows:
  ``stage_time_s`` (median over steps) and ``stage_share`` (fraction of the step) per
  ``stage`` and ``pass`` (forward / backward / total; the stage "other" is the loss, what
  follows the last mark, and the optimizer, which has pass "optimizer"), plus
  ``routing_share`` = (u_hat + routing) / step for capsule models. On CUDA every mark
  synchronizes, so the instrumented step is slower than the timed one; shares are computed
  within the instrumented steps.

Defaults: models capsnet, lenet5, cnn_maxpool, efficientnet_b0; batch sizes 1, 32, 128, 512 on
CUDA but 1, 32, 128 on CPU: on a 2-core machine one CapsNet or cnn_maxpool training step at
512 takes ~10-15 s, about a minute per model with warm-up, repeats and inference, which would
push the default CPU profile (~1.5-2.5 minutes without it) past its 5-minute budget. Routing
iterations 1, 2, 3 and 5 are timed at one batch size (32 on CPU, 128 on GPU). Everything runs
in float32 without ``torch.compile`` or AMP (the rows say so).

Example:
    >>> rows = profile_models(["lenet5"], [2], device="cpu", repeats=1, warmup=0)  # doctest: +SKIP
    >>> write_profile(rows, "runs")  # doctest: +SKIP
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from capsbench.errors import ConfigError, describe, first_line
from capsbench.models import count_parameters, create_model, model_info
from capsbench.models.capsnet import ROUTING_KERNELS
from capsbench.models.kernels.fft_conv import CONV_IMPLS
from capsbench.perf.flops import FLOP_BATCH, _batch, count_flops, routing_flops_for
from capsbench.perf.stages import STAGE_STEPS, stage_breakdown, trace_train_step
from capsbench.perf.timing import (
    DEFAULT_REPEATS,
    DEFAULT_WARMUP,
    MIN_BLOCK_S,
    MIN_REPEATS,
    make_inference,
    make_train_step,
    time_fn,
)
from capsbench.train.device import channels_last_for

DEFAULT_MODELS = ("capsnet", "lenet5", "cnn_maxpool", "efficientnet_b0")
CUDA_BATCH_SIZES = (1, 32, 128, 512)
# 512 is left out on CPU: one training step of CapsNet or cnn_maxpool at 512 takes ~10-15 s on
# 2 cores (~1 s at 32 on one busy core), so warm-up, repeats and inference would cost about a
# minute per model and break the 5-minute budget of the default CPU profile.
CPU_BATCH_SIZES = (1, 32, 128)
DEFAULT_ROUTING_ITERS = (1, 2, 3, 5)
DTYPE = "float32"

TRAIN_METRICS = ("time_train_step_s", "iqr_train_step_s", "images_per_s_train")
INFER_METRICS = ("time_inference_s", "iqr_inference_s", "images_per_s_inference")
GRID_COLUMNS = ["batch_size", "routing_iters", "stage", "pass"]
EXTRA_PROVENANCE = ["device_name", "torch_version", "cuda_version", "threads", "dtype", "compile", "amp"]


class ProfileRows(list):
    """The tidy rows of a profile (a ``list`` of dicts) plus ``meta`` for run.json."""

    def __init__(self, rows: Iterable[dict] = (), meta: dict | None = None) -> None:
        super().__init__(rows)
        self.meta: dict[str, Any] = dict(meta or {})


# --------------------------------------------------------------------------- memory


def _maxrss_bytes() -> int | None:
    """Peak resident memory of this process so far (``ru_maxrss``), in bytes; None if unknown."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS reports bytes, Linux KiB


_OOM = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", RuntimeError)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, _OOM) and "out of memory" in str(e).lower()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the profile


@dataclass
class _Config:
    model: str
    routing_iters: int | None
    batch_sizes: list[int]
    stage_batch_size: int | None
    capsule: bool


def _pick_batch(requested: int | None, preferred: int, batch_sizes: Sequence[int]) -> int:
    """``requested``, else ``preferred`` if profiled, else the largest profiled size below it."""
    if requested:
        return int(requested)
    if preferred in batch_sizes:
        return preferred
    below = [b for b in batch_sizes if b <= preferred]
    return max(below) if below else min(batch_sizes)


def _choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ConfigError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
    return value


def implementations(model: torch.nn.Module, x: torch.Tensor, train: bool) -> dict[str, str]:
    """Which routing kernel and convolution path ``model`` runs on input ``x`` in a training
    step (``train``) or in inference: {"routing": "cpp" | "torch" | "triton", "conv": "fft" |
    "direct"} for the parts the model has (empty for a model with neither). A routing kernel
    that cannot run raises here, before anything is timed."""
    used: dict[str, str] = {}
    with torch.set_grad_enabled(train):
        if hasattr(model, "routing_impl"):
            used["routing"] = model.routing_impl(torch.zeros(1, 1, 1, device=x.device))
        if hasattr(model, "uses_fft_conv"):
            used["conv"] = "fft" if model.uses_fft_conv(x) else "direct"
    return used


def _positive_ints(values: Iterable[int], what: str) -> list[int]:
    out = sorted({int(v) for v in values})
    if not out:
        raise ConfigError(f"no {what} given")
    if out[0] < 1:
        raise ConfigError(f"{what} must be >= 1, got {out[0]}")
    return out


def profile_models(
    models: Sequence[str] | None = None,
    batch_sizes: Sequence[int] | None = None,
    routing_iters: Sequence[int] | None = None,
    device: str | torch.device = "auto",
    repeats: int | None = None,
    *,
    warmup: int = DEFAULT_WARMUP,
    budget_s: float | None = None,
    stage_batch_size: int | None = None,
    routing_batch_size: int | None = None,
    stage_steps: int = STAGE_STEPS,
    input_size: int = 28,
    threads: int | None = None,
    trace_dir: str | Path | None = None,
    run_id: str | None = None,
    log: Callable[[str], None] | None = None,
    on_progress: Callable[[ProfileRows], None] | None = None,
    routing: str = "auto",
    conv_impl: str = "auto",
) -> ProfileRows:
    """Profile ``models`` and return tidy rows (see the module docstring for the metrics).

    Args:
        models: registered model names (default :data:`DEFAULT_MODELS`).
        batch_sizes: default 1, 32, 128, 512 on CUDA and 1, 32, 128 on CPU.
        routing_iters: r values for every capsule model with routing (default 1, 2, 3, 5); each
            is built with ``create_model(name, routing_iters=r)`` and timed at
            ``routing_batch_size``; the model's own r is timed at every batch size.
        device: "auto", "cpu", "cuda", ...
        repeats: timed repeats per configuration (default 5; at least 3 are run before the
            time budget can stop a configuration, fewer only if ``repeats`` is smaller).
        warmup: untimed calls first (the second is skipped for calls slower than 1 s).
        budget_s: seconds of timed repeats per configuration and mode (default 4 on CPU, 2 on GPU).
        stage_batch_size / routing_batch_size: default 32 on CPU and 128 on GPU, or the
            largest profiled batch size below that.
        stage_steps: instrumented training steps for the stage breakdown.
        threads: ``torch.set_num_threads`` for the run (default: leave as is).
        trace_dir: also write one chrome trace per model at the stage batch size here.
        log: called with a progress line per configuration.
        on_progress: called with the rows so far after each model configuration.
        routing / conv_impl: the capsule models' routing kernel ("auto", "torch", "triton",
            "cpp") and the convolutions of the models that have a DFT path ("auto", "direct",
            "fft"), as ``capsbench speed --routing / --conv``. "auto" lets each model choose
            (CapsNet: C++ routing and DFT PrimaryCaps on CPUs from batch 32; the pooling CNNs:
            direct), which is what training runs; ``conv_impl="direct"`` times every model
            with the same oneDNN / cuDNN convolutions. What ran is in ``meta["implementations"]``.

    Returns:
        :class:`ProfileRows`: a list of row dicts with ``.meta`` (settings, FLOPs by op,
        timing details) for :func:`write_profile`.
    """
    from capsbench.train.device import resolve_device

    dev = resolve_device(device)
    impl = {"routing": _choice(routing, ROUTING_KERNELS, "routing"),
            "conv_impl": _choice(conv_impl, CONV_IMPLS, "conv_impl")}
    if threads is None:
        return _profile(models, batch_sizes, routing_iters, dev, repeats, warmup, budget_s, stage_batch_size,
                        routing_batch_size, stage_steps, input_size, trace_dir, run_id, log, on_progress, impl)
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        return _profile(models, batch_sizes, routing_iters, dev, repeats, warmup, budget_s, stage_batch_size,
                        routing_batch_size, stage_steps, input_size, trace_dir, run_id, log, on_progress, impl)
    finally:
        torch.set_num_threads(before)


def _profile(models, batch_sizes, routing_iters, dev, repeats, warmup, budget_s, stage_batch_size,
             routing_batch_size, stage_steps, input_size, trace_dir, run_id, log, on_progress, impl) -> ProfileRows:
    from capsbench.store import environment_info

    t_run = time.perf_counter()
    models = list(models) if models else list(DEFAULT_MODELS)
    for name in models:
        model_info(name)  # an unknown name stops here, listing the known ones
    cuda = dev.type == "cuda"
    batch_sizes = _positive_ints(batch_sizes or (CUDA_BATCH_SIZES if cuda else CPU_BATCH_SIZES), "batch sizes")
    routing_iters = _positive_ints(routing_iters or DEFAULT_ROUTING_ITERS, "routing iterations")
    repeats = DEFAULT_REPEATS if repeats is None else int(repeats)
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ConfigError(f"warmup must be >= 0, got {warmup}")
    budget_s = (2.0 if cuda else 4.0) if budget_s is None else float(budget_s)
    stage_bs = _pick_batch(stage_batch_size, 128 if cuda else 32, batch_sizes)
    routing_bs = _pick_batch(routing_batch_size, 128 if cuda else 32, batch_sizes)
    say = log or (lambda msg: None)

    env = environment_info(dev)
    prov = {
        "profile": "profile",
        "device": str(dev),
        "git_sha": env.get("git_sha", "unknown"),
        "data_sha256": "",
        "job_key": "",
        "error": "",
        "device_name": env.get("device_name", ""),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "",
        "threads": torch.get_num_threads(),
        "dtype": DTYPE,
        "compile": False,
        "amp": False,
    }
    run_id = run_id or f"profile-{dev.type}"

    # The plan: each model at its own r over all batch sizes, plus the other r values.
    plan: list[_Config] = []
    for name in models:
        probe = create_model(name, input_size=input_size)
        capsule = getattr(probe, "family", "cnn") == "capsule"
        own_r = getattr(probe, "routing_iters", None) if capsule else None
        sweep = capsule and own_r is not None and not getattr(probe, "uniform_coupling", False)
        del probe
        bss = set(batch_sizes) | {stage_bs}
        if sweep and own_r in routing_iters:
            bss.add(routing_bs)
        plan.append(_Config(name, own_r, sorted(bss), stage_bs, capsule))
        if sweep:
            plan += [_Config(name, r, [routing_bs], routing_bs, capsule) for r in routing_iters if r != own_r]

    rows = ProfileRows()
    meta: dict[str, Any] = {
        "run_id": run_id,
        "environment": env,
        "settings": {
            "models": models,
            "batch_sizes": batch_sizes,
            "routing_iters": routing_iters,
            "routing_batch_size": routing_bs,
            "stage_batch_size": stage_bs,
            "stage_steps": stage_steps,
            "repeats": repeats,
            "min_repeats": min(MIN_REPEATS, repeats),
            "warmup": warmup,
            "budget_s_per_config_and_mode": budget_s,
            "min_block_s": MIN_BLOCK_S,
            "input_size": input_size,
            "threads": torch.get_num_threads(),
            "dtype": DTYPE,
            "compile": False,
            "amp": False,
            "flop_batch_size": FLOP_BATCH,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            **impl,
        },
        "notes": {
            "flops": "FlopCounterMode (matmul + convolution work) per image, counted at batch 2 / 2; "
            "flops_train_step = forward + loss + backward, optimizer excluded",
            "routing_flops": "analytic, see capsbench.perf.flops.routing_flops: "
            "inference = u_hat + r*(wsum + squash) + (r-1)*(agree + softmax); "
            "train = inference + 2*(u_hat + r*wsum + (r-1)*agree)",
            "timing": "median and IQR over timed repeats after warm-up; a repeat is a block of "
            "calls_per_repeat calls (>= 20 ms); CPU perf_counter, CUDA events",
            "train_step": "zero_grad + forward + model.loss + backward + Adam step",
            "memory": "CUDA: max_memory_allocated after reset. CPU: peak_rss_process_bytes = ru_maxrss "
            "(whole process, monotone); peak_rss_increase_bytes = its growth during the configuration",
            "stages": "stage_time_s medians over instrumented steps; stage_share = stage / step summed "
            "over those steps; 'other' = loss, code after the last mark, optimizer (pass 'optimizer')",
            "channels_last": "per model: NHWC weights and inputs, as the runner trains it on this device "
            "(capsbench.train.device.channels_last_for)",
            "implementations": "per model and batch size, the routing kernel and convolution path each "
            "timed mode ran (settings routing / conv_impl: 'auto' = each model's own choice)",
        },
        "channels_last": {},
        "implementations": {},
        "flops_by_op": {},
        "timing": {},
        "traces": [],
    }
    rows.meta = meta

    for cfg in plan:
        rows.extend(
            _profile_config(
                cfg, dev, prov, run_id, repeats, warmup, budget_s, stage_steps, input_size,
                Path(trace_dir) if trace_dir else None, meta, say, impl,
            )
        )
        if on_progress is not None:
            on_progress(rows)
    meta["wall_time_s"] = time.perf_counter() - t_run
    return rows


def _profile_config(
    cfg: _Config, dev, prov, run_id, repeats, warmup, budget_s, stage_steps, input_size, trace_dir, meta, say,
    impl: dict[str, str],
) -> list[dict[str, Any]]:
    r = cfg.routing_iters
    label = cfg.model + (f" r{r}" if r is not None else "")
    suffix = f"-r{r}" if r is not None else ""
    nan = float("nan")

    def row(cell: str, metric: str, value: float, n: int, bs: int | None = None, **extra) -> dict[str, Any]:
        return {
            "run_id": run_id, "suite": "profile", "model": cfg.model, "seed": 0,
            "train_data": "", "eval_data": "", "transform": "", "cell": cell,
            "batch_size": float(bs) if bs is not None else nan,
            "routing_iters": float(r) if r is not None else nan,
            "stage": "", "pass": "", "metric": metric, "value": float(value), "n": int(n),
            **prov, **extra,
        }

    out: list[dict[str, Any]] = []
    torch.manual_seed(0)
    kw: dict[str, Any] = {"input_size": input_size}
    if r is not None:
        kw["routing_iters"] = r
    model = create_model(cfg.model, **kw).to(dev)
    if hasattr(model, "routing_kernel"):
        model.routing_kernel = impl["routing"]
    if hasattr(model, "conv_impl"):
        model.conv_impl = impl["conv_impl"]
    channels_last = channels_last_for(model, dev)  # timed in the layout the runner trains it in
    meta["channels_last"][cfg.model] = channels_last
    model_cell = "model" + suffix
    out.append(row(model_cell, "params", count_parameters(model), 1))
    for train, metric in ((False, "flops_inference"), (True, "flops_train_step")):
        try:
            flops, by_op = count_flops(model, train=train)
            out.append(row(model_cell, metric, flops, 1))
            meta["flops_by_op"].setdefault(label, {})[metric] = by_op
        except (RuntimeError, ValueError) as e:
            out.append(row(model_cell, metric, nan, 0, error=f"{type(e).__name__}: {e}"))
            _free(dev)
    for train, metric in ((False, "routing_flops_inference"), (True, "routing_flops_train")):
        rf = routing_flops_for(model, train=train)
        if rf is not None:
            out.append(row(model_cell, metric, rf, 1))
    say(f"{label}: {count_parameters(model):,} params")

    if channels_last:  # after the FLOP counts, which do not depend on it
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for bs in cfg.batch_sizes:
        cell = f"bs{bs}{suffix}"
        x, y = _batch(model, bs, dev)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        rss0 = _maxrss_bytes()
        msg = [f"{label} bs{bs}:"]
        for mode, metrics in (("inference", INFER_METRICS), ("train", TRAIN_METRICS)):
            _free(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            try:
                if mode == "inference":
                    model.eval()
                    fn = make_inference(model, x)
                else:
                    model.train()
                    fn = make_train_step(model, opt, x, y)
                used = implementations(model, x, train=mode == "train")
                if used:
                    meta["implementations"].setdefault(label, {}).setdefault(cell, {})[mode] = used
                timing = time_fn(fn, dev, repeats=repeats, warmup=warmup, budget_s=budget_s)
            except (RuntimeError, ValueError) as e:
                err = "CUDA out of memory: " + first_line(e) if _is_oom(e) else describe(e)
                out += [row(cell, m, nan, 0, bs, error=err) for m in metrics]
                msg.append(f"{mode} failed ({err[:80]})")
                opt.zero_grad(set_to_none=True)
                _free(dev)
                continue
            n = len(timing.times)
            med = timing.median
            out.append(row(cell, metrics[0], med, n, bs))
            out.append(row(cell, metrics[1], timing.iqr, n, bs))
            out.append(row(cell, metrics[2], bs / med if med > 0 else nan, n, bs))
            meta["timing"][f"{label} {cell} {mode}"] = {
                "times_s": timing.times, "calls_per_repeat": timing.calls_per_repeat, "warmup": timing.warmup,
            }
            if dev.type == "cuda":
                out.append(row(cell, f"peak_cuda_alloc_{mode}_bytes", torch.cuda.max_memory_allocated(dev), 1, bs))
            ran = ", ".join(f"{k} {v}" for k, v in used.items())
            msg.append(f"{mode} {med * 1e3:.1f} ms ({bs / med:.0f} img/s, n={n}{', ' + ran if ran else ''})")

        if bs == cfg.stage_batch_size:
            try:
                sb = stage_breakdown(model, opt, x, y, steps=stage_steps)
                for extra in sb.rows():
                    base = row(cell, extra["metric"], extra["value"], extra["n"], bs)
                    base.update(stage=extra["stage"], **{"pass": extra["pass"]})
                    out.append(base)
                share = [e["value"] for e in sb.rows() if e["metric"] == "routing_share"]
                if share:
                    msg.append(f"routing share {share[0]:.0%}")
                if trace_dir is not None:
                    path = trace_dir / f"{cfg.model}{suffix}-bs{bs}.json"
                    trace_train_step(model, opt, x, y, path, sb.order)
                    meta["traces"].append(str(path))
            except (RuntimeError, ValueError) as e:
                err = "CUDA out of memory: " + first_line(e) if _is_oom(e) else describe(e)
                out.append(row(cell, "stage_time_s", nan, 0, bs, error=err))
                opt.zero_grad(set_to_none=True)
                _free(dev)

        rss1 = _maxrss_bytes()
        if dev.type != "cuda" and rss1 is not None:
            out.append(row(cell, "peak_rss_process_bytes", rss1, 1, bs))
            out.append(row(cell, "peak_rss_increase_bytes", rss1 - (rss0 or rss1), 1, bs))
        say(" ".join(msg))
        del x, y
    del model, opt
    _free(dev)
    return out


# --------------------------------------------------------------------------- output


def profile_dir(out_dir: str | Path, device: str | torch.device) -> Path:
    """``<out>/profile-<device type>``."""
    return Path(out_dir) / f"profile-{torch.device(device).type}"


def write_profile(rows: Sequence[dict], out_dir: str | Path, meta: dict | None = None) -> Path:
    """Write ``<out>/profile-<device type>/results.csv`` and ``run.json``; return that folder.

    Columns: identity (as suite results), batch_size, routing_iters, stage, pass, metric,
    value, n, then provenance (profile, device, git_sha, ..., error, device_name, versions,
    threads, dtype, compile, amp).
    """
    import pandas as pd

    from capsbench.store import (
        ID_COLUMNS,
        PROVENANCE_COLUMNS,
        VALUE_COLUMNS,
        atomic_write_text,
        ensure_writable_dir,
        write_json,
    )

    meta = {**getattr(rows, "meta", {}), **(meta or {})}
    device = rows[0]["device"] if rows else meta.get("environment", {}).get("device", "cpu")
    run_dir = ensure_writable_dir(profile_dir(out_dir, device))
    df = pd.DataFrame(list(rows))
    lead = ID_COLUMNS + GRID_COLUMNS + VALUE_COLUMNS + PROVENANCE_COLUMNS + EXTRA_PROVENANCE
    cols = [c for c in lead if c in df.columns] + [c for c in df.columns if c not in lead]
    atomic_write_text(run_dir / "results.csv", df[cols].to_csv(index=False) if len(df) else "")
    write_json(run_dir / "run.json", {**meta, "rows": len(rows), "results": "results.csv"})
    return run_dir


def format_table(rows: Sequence[dict]) -> str:
    """A compact table: model, batch, train and inference images/s, GFLOP/img (train), routing share."""
    values: dict[tuple, float] = {}
    configs: list[tuple] = []
    for rw in rows:
        r = rw["routing_iters"]
        r = None if r != r else int(r)  # NaN -> None
        key = (rw["model"], r)
        if rw["batch_size"] == rw["batch_size"]:  # not NaN
            cfg = (rw["model"], r, int(rw["batch_size"]))
            if cfg not in configs:
                configs.append(cfg)
            if rw["stage"] in ("", "u_hat+routing"):
                values[cfg + (rw["metric"],)] = rw["value"]
        else:
            values[key + (rw["metric"],)] = rw["value"]

    def fmt(v: float | None, spec: str) -> str:
        width = int(spec.split(".")[0])
        return f"{'-':>{width}}" if v is None or v != v else format(v, spec)

    lines = [f"{'model':<22} {'bs':>5} {'train img/s':>12} {'infer img/s':>12} {'GFLOP/img train':>16} {'routing share':>14}"]
    for model, r, bs in configs:
        name = model + (f" (r{r})" if r is not None else "")
        g = values.get((model, r, "flops_train_step"))
        lines.append(
            f"{name:<22} {bs:>5} {fmt(values.get((model, r, bs, 'images_per_s_train')), '12.1f')} "
            f"{fmt(values.get((model, r, bs, 'images_per_s_inference')), '12.1f')} "
            f"{fmt(g / 1e9 if g is not None else None, '16.4f')} "
            f"{fmt(values.get((model, r, bs, 'routing_share')), '14.1%')}"
        )
    return "\n".join(lines)
