"""Timing a call the same way everywhere: warm-up, blocks of calls of at least ~20 ms, the median
of repeats and its interquartile range, synchronised on CUDA."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_REPEATS = 5
DEFAULT_WARMUP = 2
MIN_REPEATS = 3
MIN_BLOCK_S = 0.02  # a timed repeat lasts at least this long (several calls for fast configs)
SLOW_CALL_S = 1.0  # one warm-up call is enough for configurations slower than this


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
