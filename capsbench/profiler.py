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
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from capsbench.errors import ConfigError, describe, first_line
from capsbench.models import count_parameters, create_model, model_info
from capsbench.models.capsnet import ROUTING_KERNELS
from capsbench.models.fft_conv import CONV_IMPLS
from capsbench.runner import channels_last_for

DEFAULT_MODELS = ("capsnet", "lenet5", "cnn_maxpool", "efficientnet_b0")
CUDA_BATCH_SIZES = (1, 32, 128, 512)
# 512 is left out on CPU: one training step of CapsNet or cnn_maxpool at 512 takes ~10-15 s on
# 2 cores (~1 s at 32 on one busy core), so warm-up, repeats and inference would cost about a
# minute per model and break the 5-minute budget of the default CPU profile.
CPU_BATCH_SIZES = (1, 32, 128)
DEFAULT_ROUTING_ITERS = (1, 2, 3, 5)
FLOP_BATCH = 2  # FLOPs are counted at this batch size and divided by it
DEFAULT_REPEATS = 5
DEFAULT_WARMUP = 2
MIN_REPEATS = 3
STAGE_STEPS = 3
MIN_BLOCK_S = 0.02  # a timed repeat lasts at least this long (several calls for fast configs)
SLOW_CALL_S = 1.0  # one warm-up call is enough for configurations slower than this
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


# --------------------------------------------------------------------------- FLOPs


def routing_flops(
    iterations: int,
    n_in: int = 1152,
    d_in: int = 8,
    n_out: int = 10,
    d_out: int = 16,
    train: bool = False,
) -> int:
    """Analytic FLOPs per image of CapsNet's u_hat and dynamic routing (r = ``iterations``).

    FlopCounterMode sees only the matrix products; this count adds the element-wise work::

        u_hat   = 2 * n_in * d_in * n_out * d_out      u_hat_j|i = W_ij u_i, once
        wsum    = 2 * n_in * n_out * d_out             s_j = sum_i c_ij u_hat_j|i, r times
        agree   = 2 * n_in * n_out * d_out             b_ij += u_hat_j|i . v_j, r - 1 times
        softmax = 5 * n_in * n_out                     c_i = softmax_j(b_ij), r - 1 times
        squash  = 6 * n_out * d_out + 4 * n_out        v_j = squash(s_j), r times
                  (6 per output element: the squared norm's multiply-add and the scaling;
                  4 per capsule: 1 + |s|^2, |s|^2 + eps, sqrt, divide)

        inference = u_hat + r * (wsum + squash) + (r - 1) * (agree + softmax)
        train     = inference + 2 * (u_hat + r * wsum + (r - 1) * agree)

    The backward of each matrix product computes two products of its size (the gradients of
    both operands), hence ``2 *`` the matrix parts; the element-wise backward is left out.
    At the paper's sizes and r = 3 this is 4,910,520 (inference) and 14,495,160 (train).

    Example:
        >>> routing_flops(1)
        3318760
        >>> routing_flops(3) > routing_flops(1)
        True
    """
    if iterations < 1:
        raise ValueError(f"routing iterations must be >= 1, got {iterations}")
    r = iterations
    u_hat = 2 * n_in * d_in * n_out * d_out
    wsum = 2 * n_in * n_out * d_out
    agree = 2 * n_in * n_out * d_out
    softmax = 5 * n_in * n_out
    squash = 6 * n_out * d_out + 4 * n_out
    inference = u_hat + r * (wsum + squash) + (r - 1) * (agree + softmax)
    if not train:
        return inference
    return inference + 2 * (u_hat + r * wsum + (r - 1) * agree)


def routing_flops_for(model: torch.nn.Module, train: bool = False) -> int | None:
    """:func:`routing_flops` at a capsule model's own sizes; None for models without routing."""
    need = ("num_primary", "primary_dim", "num_classes", "digit_dim", "routing_iters")
    if getattr(model, "family", "") != "capsule" or not all(hasattr(model, a) for a in need):
        return None
    return routing_flops(
        model.routing_iters, model.num_primary, model.primary_dim, model.num_classes, model.digit_dim, train=train
    )


def _batch(model: torch.nn.Module, batch_size: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = int(getattr(model, "input_size", 28))
    chans = int(getattr(model, "in_chans", 1))
    x = torch.rand(batch_size, chans, size, size, generator=g).to(device)
    y = torch.randint(0, int(getattr(model, "num_classes", 10)), (batch_size,), generator=g).to(device)
    return x, y


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten.convolution_backward``: grad_input and grad_weight each do the
    multiply-adds of the forward convolution.

    torch's own formula ignores ``groups`` for grad_weight and so counts a depthwise
    convolution's weight gradient C times over (C channels): EfficientNet-B0's training step
    came out at 0.65 GFLOP per image for a 16 MFLOP forward. Fixed upstream in
    pytorch/pytorch PR #183405; this formula equals torch's for ``groups == 1``.
    """
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


_FLOP_FIXES = {torch.ops.aten.convolution_backward: _conv_backward_flop}


def count_flops(model: torch.nn.Module, train: bool, batch_size: int = FLOP_BATCH) -> tuple[float, dict[str, float]]:
    """FLOPs per image of one inference pass or one training step, and the same split by op.

    Counted with ``FlopCounterMode(display=False)`` at ``batch_size`` and divided by it, with
    :func:`_conv_backward_flop` in place of torch's formula for convolution backward (grouped
    convolutions).
    ``train=True``: ``model.train()``, forward + ``model.loss`` + backward (the optimizer is not
    counted); ``train=False``: ``model.eval()`` under ``torch.no_grad``. Gradients are cleared
    afterwards and the model's train/eval mode is restored. The count is the architecture's:
    CapsNet and the pooling CNNs are counted with their direct convolutions
    (``conv_impl="direct"``), CapsNet with its plain
    routing (``routing_kernel="torch"``: u_hat and batched matmuls), whichever implementation its
    steps would take on this device (models/fft_conv.py does less; the fused routing kernels
    recompute u_hat and are invisible to the counter).
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    x, y = _batch(model, batch_size, device, seed=1)
    was_training = model.training
    conv_impl = getattr(model, "conv_impl", None)
    routing_kernel = getattr(model, "routing_kernel", None)
    if conv_impl is not None:
        model.conv_impl = "direct"
    if routing_kernel is not None:
        model.routing_kernel = "torch"
    try:
        if train:
            model.train()
            model.zero_grad(set_to_none=True)
            with FlopCounterMode(display=False, custom_mapping=_FLOP_FIXES) as counter:
                out = model(x, y)
                model.loss(out, x, y).backward()
            model.zero_grad(set_to_none=True)
        else:
            model.eval()
            with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_FLOP_FIXES) as counter:
                model(x)
    finally:
        model.train(was_training)
        if conv_impl is not None:
            model.conv_impl = conv_impl
        if routing_kernel is not None:
            model.routing_kernel = routing_kernel
    by_op = {str(op): n / batch_size for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops() / batch_size, by_op


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _clock(device: torch.device) -> float:
    _sync(device)
    return time.perf_counter()


@dataclass
class Timing:
    """Seconds per call, one sample per timed repeat (a block of ``calls_per_repeat`` calls)."""

    times: list[float]
    calls_per_repeat: int = 1
    warmup: int = 0

    @property
    def median(self) -> float:
        return _quantile(self.times, 0.5)

    @property
    def iqr(self) -> float:
        return _quantile(self.times, 0.75) - _quantile(self.times, 0.25)


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without numpy."""
    v = sorted(values)
    if not v:
        return float("nan")
    pos = (len(v) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _benchmark():
    """``torch.utils.benchmark``, imported without the warning its import of cpp_extension logs
    on a machine with a CUDA toolkit but no GPU ("No CUDA runtime is found, using CUDA_HOME=..."):
    the CPU timings need no CUDA, so the line only misleads."""
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        logger.setLevel(level)
    return benchmark


def _timed_block(fn: Callable[[], Any], device: torch.device, calls: int) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    if device.type == "cpu":
        # torch.utils.benchmark pins the thread count for the measurement and keeps the
        # Python-side overhead of the loop out of it.
        timer = _benchmark().Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return timer.timeit(calls).mean * calls
    t0 = _clock(device)
    for _ in range(calls):
        fn()
    return _clock(device) - t0


def time_fn(
    fn: Callable[[], Any],
    device: torch.device,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    budget_s: float = 5.0,
    min_repeats: int = MIN_REPEATS,
    min_block_s: float = MIN_BLOCK_S,
) -> Timing:
    """Time ``fn``: warm-up, then up to ``repeats`` timed repeats (see the module docstring)."""
    last = 0.0
    done_warmup = 0
    for _ in range(warmup):
        last = _timed_block(fn, device, 1)
        done_warmup += 1
        if last > SLOW_CALL_S:
            break
    calls = 1 if last <= 0 else max(1, min(1000, math.ceil(min_block_s / last)))
    floor = max(1, min(min_repeats, repeats))
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats:
        times.append(_timed_block(fn, device, calls) / calls)
        if len(times) >= floor and time.perf_counter() - start >= budget_s:
            break
    return Timing(times, calls, done_warmup)


def make_train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    """zero_grad + forward + ``model.loss`` + backward + optimizer step, as a closure."""

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        out = model(x, y)
        loss = model.loss(out, x, y)
        loss.backward()
        opt.step()
        return loss

    return step


def make_inference(model: torch.nn.Module, x: torch.Tensor):
    def infer():
        with torch.no_grad():
            return model(x)

    return infer


# --------------------------------------------------------------------------- stages


def split_stage_times(
    events: Sequence[tuple[str, str, float]], t_start: float, t_loss: float, t_backward_end: float
) -> dict[tuple[str, str], float]:
    """Turn stage-mark events of ONE training step into seconds per (stage, pass).

    Args:
        events: ("forward" | "backward", stage, time) from :func:`capsbench.models.base.record_stages`.
        t_start: when the forward pass started.
        t_loss: when the loss was computed (just before ``backward()``).
        t_backward_end: when ``backward()`` returned.

    A stage's forward runs from the previous forward mark (or ``t_start``) to its own mark;
    what follows the last mark up to ``t_loss`` is ("other", "forward"). A stage's backward
    starts at its own backward mark (the gradient reached its output) and ends at the next
    backward mark (the gradient reached its input, i.e. the previous stage's output); the last
    one ends at ``t_backward_end``. From ``t_loss`` to the first backward mark is
    ("other", "backward"). Stages that share a name (two "conv" stages) are summed.

    Example:
        >>> ev = [("forward", "conv", 1.0), ("forward", "fc", 2.0), ("backward", "fc", 4.0), ("backward", "conv", 5.0)]
        >>> sorted(split_stage_times(ev, 0.0, 3.0, 7.0).items())  # doctest: +NORMALIZE_WHITESPACE
        [(('conv', 'backward'), 2.0), (('conv', 'forward'), 1.0), (('fc', 'backward'), 1.0),
         (('fc', 'forward'), 1.0), (('other', 'backward'), 1.0), (('other', 'forward'), 1.0)]
    """
    out: dict[tuple[str, str], float] = {}

    def add(stage: str, pass_: str, dt: float) -> None:
        out[(stage, pass_)] = out.get((stage, pass_), 0.0) + dt

    fwd = [(t, name) for kind, name, t in events if kind == "forward"]
    bwd = sorted(((t, name) for kind, name, t in events if kind == "backward"), key=lambda e: e[0])
    prev = t_start
    for t, name in fwd:
        add(name, "forward", t - prev)
        prev = t
    add("other", "forward", t_loss - prev)
    prev_t, prev_name = t_loss, "other"
    for t, name in bwd:
        add(prev_name, "backward", t - prev_t)
        prev_t, prev_name = t, name
    add(prev_name, "backward", t_backward_end - prev_t)
    return out


@dataclass
class StageBreakdown:
    order: list[str]  # stage names in forward order (first appearance), then "other"
    steps: list[dict[tuple[str, str], float]] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)

    def total(self, stage: str, step: int) -> float:
        d = self.steps[step]
        return sum(v for (s, _), v in d.items() if s == stage)

    def rows(self) -> list[dict[str, Any]]:
        """stage_time_s / stage_share rows (no identity columns), and routing_share."""
        n = len(self.steps)
        all_steps = sum(self.step_times)
        out: list[dict[str, Any]] = []
        for stage in self.order:
            passes = ["forward", "backward"] + (["optimizer"] if stage == "other" else [])
            for p in passes + ["total"]:
                if p == "total":
                    vals = [self.total(stage, i) for i in range(n)]
                else:
                    vals = [self.steps[i].get((stage, p), 0.0) for i in range(n)]
                out.append({"stage": stage, "pass": p, "metric": "stage_time_s", "value": _quantile(vals, 0.5), "n": n})
                out.append({"stage": stage, "pass": p, "metric": "stage_share", "value": sum(vals) / all_steps, "n": n})
        out.append({"stage": "", "pass": "total", "metric": "instrumented_step_time_s",
                    "value": _quantile(self.step_times, 0.5), "n": n})
        if "routing" in self.order:
            routing = sum(self.total("u_hat", i) + self.total("routing", i) for i in range(n))
            out.append({"stage": "u_hat+routing", "pass": "total", "metric": "routing_share",
                        "value": routing / all_steps, "n": n})
        return out


def stage_breakdown(
    model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int = STAGE_STEPS
) -> StageBreakdown:
    """Run ``steps`` training steps inside ``record_stages()`` and split each into stages."""
    from capsbench.models.base import record_stages

    device = x.device
    model.train()
    result = StageBreakdown(order=[])
    for _ in range(steps):
        t0 = _clock(device)
        opt.zero_grad(set_to_none=True)
        t1 = _clock(device)
        with record_stages() as events:
            out = model(x, y)
            loss = model.loss(out, x, y)
            t_loss = _clock(device)
            loss.backward()
            t_bwd = _clock(device)
        opt.step()
        t_end = _clock(device)
        d = split_stage_times(events, t1, t_loss, t_bwd)
        d[("other", "optimizer")] = (t1 - t0) + (t_end - t_bwd)
        result.steps.append(d)
        result.step_times.append(t_end - t0)
        if not result.order:
            names = [name for kind, name, _ in events if kind == "forward"]
            result.order = list(dict.fromkeys(names)) + ["other"]
    return result


class _RangeRecorder(list):
    """A stage recorder that also opens a ``torch.profiler.record_function`` range per stage.

    Installed in place of ``record_stages``' list: every ``mark()`` appends an event, which
    closes the running range and opens the next one, so a torch.profiler trace shows
    "capsbench.forward:<stage>", "capsbench.backward:<stage>", "capsbench.optimizer".
    ``forward_order`` (from an earlier recorded step) names each forward range when it opens.
    """

    def __init__(self, forward_order: Sequence[str]) -> None:
        super().__init__()
        self._order = [s for s in forward_order if s != "other"]
        self._i = 0
        self._open: Any = None

    def switch(self, label: str | None) -> None:
        if self._open is not None:
            self._open.__exit__(None, None, None)
            self._open = None
        if label:
            self._open = torch.profiler.record_function(label)
            self._open.__enter__()

    def start_forward(self) -> None:
        self._i = 0
        self.switch("capsbench.forward:" + (self._order[0] if self._order else "other"))

    def append(self, event) -> None:  # called by capsbench.models.base.mark
        super().append(event)
        kind, name, _ = event
        if kind == "forward":
            self._i += 1
            nxt = self._order[self._i] if self._i < len(self._order) else "other"
            self.switch("capsbench.forward:" + nxt)
        else:
            self.switch("capsbench.backward:" + name)


def trace_train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    path: str | Path,
    forward_order: Sequence[str] = (),
) -> Path:
    """Run one training step under ``torch.profiler.profile`` with a ``record_function`` range
    per stage, and write a chrome trace (open it in chrome://tracing or Perfetto)."""
    from capsbench.models import base

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if x.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    rec = _RangeRecorder(forward_order)
    model.train()
    with torch.profiler.profile(activities=activities) as prof:
        prev = base._RECORDER
        base._RECORDER = rec  # what record_stages() does, with our list
        try:
            rec.switch("capsbench.optimizer")
            opt.zero_grad(set_to_none=True)
            rec.start_forward()
            out = model(x, y)
            loss = model.loss(out, x, y)
            rec.switch("capsbench.backward:other")
            loss.backward()
            rec.switch("capsbench.optimizer")
            opt.step()
            _sync(x.device)
        finally:
            rec.switch(None)
            base._RECORDER = prev
    prof.export_chrome_trace(str(path))
    return path


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
    from capsbench.runner import resolve_device

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
            "routing_flops": "analytic, see capsbench.profiler.routing_flops: "
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
            "(capsbench.runner.channels_last_for)",
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
