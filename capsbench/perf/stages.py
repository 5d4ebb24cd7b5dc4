"""Where a training step spends its time: stage marks (models.base.record_stages) turned into
per-stage forward and backward times."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from capsbench.perf.timing import _clock, _quantile, _sync

STAGE_STEPS = 3


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
