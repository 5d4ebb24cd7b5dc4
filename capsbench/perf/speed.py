"""``capsbench speed``: images/s of a model's real training step, data resident on the device.

Where ``capsbench profile`` compares models on random inputs in float32, this measures what a
training run gets on one device, with the speed options a GPU user would turn on:

* The whole MNIST training set sits on the device as uint8 (47 MB); each step takes a slice of
  a per-epoch permutation, converts it and applies the paper's augmentation (random shifts of
  up to 2 px, drawn on the device) in batched tensor ops: no DataLoader, no per-sample work.
* The step is the runner's (:func:`capsbench.train.trainer.build_step`): forward, ``model.loss``
  (margin + reconstruction for CapsNet), backward and Adam (fused on CUDA). The runner itself
  draws the shifts from seeded CPU generators (the same on every device) and sends them up in
  one pinned, asynchronous copy per step; ``capsbench train --curve`` reports what that path
  achieves over a whole run.

Variants (``--variants``, comma-separated):

``fp32``            eager float32.
``fp32_cl``         float32 with channels_last weights and inputs (helps oneDNN on CPUs too).
``bf16``            eager under bf16 autocast (CapsNet keeps u_hat and routing in float32).
``bf16_cl``         bf16 with channels_last weights and inputs.
``bf16_cl_graph``   bf16_cl with the whole step (forward, loss, backward, Adam with a capturable
                    state) captured once as a CUDA graph and replayed: no launch overhead and
                    no host synchronisation inside the step (CUDA only).
``bf16_cl_compile`` bf16_cl with ``torch.compile(model)`` (CUDA only; compiling takes a while).

``--routing`` picks CapsNet's routing (``auto``: the C++ kernels of models/kernels/cpu_routing.py on
CPUs where they build, u_hat and batched matmuls otherwise, unless $CAPSBENCH_ROUTING says
otherwise; ``torch``; ``triton``: the fused kernels of models/kernels/fused_routing.py, CUDA only;
``cpp``); the ``routing`` column says which ran. ``--conv``
likewise picks CapsNet's convolutions (``auto``: Conv1 as one GEMM and PrimaryCaps through the
DFT, models/kernels/fft_conv.py, in float32 on CPUs on 28x28 inputs, training at batch >= 32 and inference
at batch >= 100, F.conv2d otherwise; ``direct``; ``fft``) and those of the pooling CNNs (their
second convolution through the DFT with ``fft`` only, capsbench/models/baselines/cnn.py); the ``conv_impl`` and
``conv_impl_inference`` columns say which the training step and the inference ran.

Rows per (variant, batch size): ``images_per_s_train`` (batch / median step time),
``time_train_step_s``, ``images_per_s_inference`` (eval mode, same precision and layout,
batch ``--infer-batch``), ``epoch_s`` (a timed pass over all 60,000 images at that batch,
augmentation and permutation included; only with ``--epoch``) and, for capsule models,
``routing_share``: the time of u_hat + dynamic routing (forward and backward, float32, at the
same batch) over the time of the whole step. Routing is timed eagerly, so for the graph
variants, whose step has no launch overhead, the share is overstated (it can exceed 1 at
small batches); read it from the eager variants.

Example:
    capsbench speed --device cuda --variants fp32,bf16_cl,bf16_cl_graph --batch-sizes 128,512
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from capsbench.errors import ConfigError, describe
from capsbench.malloc import keep_freed_memory
from capsbench.models import create_model
from capsbench.perf.isa import isa_label
from capsbench.perf.timing import _sync, time_fn
from capsbench.train.device import SpeedOptions, inference_batch, to_float
from capsbench.train.trainer import build_step, make_optimizer

VARIANTS = ("fp32", "fp32_cl", "bf16", "bf16_cl", "bf16_cl_graph", "bf16_cl_compile")
CUDA_ONLY = {"bf16_cl_graph", "bf16_cl_compile"}
MAX_SHIFT = 2  # the paper's training augmentation


def parse_variant(name: str) -> dict[str, bool]:
    if name not in VARIANTS:
        raise ConfigError(f"unknown speed variant {name!r}; use one of {', '.join(VARIANTS)}")
    return {"bf16": name.startswith("bf16"), "channels_last": "_cl" in name,
            "graph": name.endswith("_graph"), "compile": name.endswith("_compile")}


class ResidentData:
    """MNIST training images (uint8) and labels on the device, batches built there."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device, seed: int = 0):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.n = self.images.shape[0]
        self.device = device
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed)
        self.perm = torch.randperm(self.n, device=device, generator=self.gen)
        self.pos = 0

    def batch(self, bs: int, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        from capsbench.data.transforms import _translate_into

        if self.pos + bs > self.n:  # a new epoch: a new permutation, drawn on the device
            self.perm = torch.randperm(self.n, device=self.device, generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + bs]
        self.pos += bs
        x = to_float(self.images[idx])
        d = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (bs, 2), device=self.device, generator=self.gen)
        x = _translate_into(x, x.shape[2], x.shape[3], d[:, 0], d[:, 1])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.labels[idx]


def routing_time(model, bs: int, device: torch.device, budget_s: float) -> float | None:
    """Median seconds of u_hat + routing, forward and backward, float32, at batch ``bs``.

    Timed through ``model.route``, so it measures the routing the model's step runs (the fused
    kernels or u_hat + batched matmuls, see ``CapsNet.routing_kernel``).
    """
    from capsbench.models.routing import squash

    if not hasattr(model, "route"):
        return None
    g = torch.Generator(device=device).manual_seed(3)
    u = squash(torch.randn(bs, model.num_primary, model.primary_dim, device=device, generator=g))
    u.requires_grad_()
    w = torch.randn(bs, model.num_classes, model.digit_dim, device=device, generator=g)

    def fn():
        u.grad = None
        v, _ = model.route(u)
        (v * w).sum().backward()

    return time_fn(fn, device, repeats=10, warmup=2, budget_s=budget_s).median


def measure(
    model_name: str,
    variant: str,
    batch_size: int,
    data: ResidentData,
    device: torch.device,
    budget_s: float = 2.0,
    infer_batch: int = 1024,
    epoch: bool = False,
    log: Callable[[str], None] = print,
    routing: str = "auto",
    conv_impl: str = "auto",
) -> dict[str, Any]:
    """One (variant, batch size): the row of numbers described in the module docstring."""
    opts = parse_variant(variant)
    if device.type != "cuda" and variant in CUDA_ONLY:
        raise ConfigError(f"variant {variant} needs a CUDA device")
    torch.manual_seed(0)
    model = create_model(model_name).to(device)
    if hasattr(model, "routing_kernel"):
        model.routing_kernel = routing
    if hasattr(model, "conv_impl"):
        model.conv_impl = conv_impl
    if opts["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = make_optimizer(model, 1e-3, device, capturable=opts["graph"])
    x0, y0 = data.batch(batch_size, opts["channels_last"])
    row: dict[str, Any] = {"model": model_name, "variant": variant, "batch_size": batch_size}
    if hasattr(model, "routing_impl"):
        u = torch.zeros(1, 1, 1, device=device)
        row["routing"] = model.routing_impl(u)
    if hasattr(model, "uses_fft_conv"):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts["bf16"]):
            row["conv_impl"] = "fft" if model.uses_fft_conv(x0) else "direct"
    t0 = time.perf_counter()
    # the runner's own step: graph capture happens here, compilation in the first call
    step = build_step(model, opt, device, opts["bf16"],
                      SpeedOptions(cuda_graph=opts["graph"], compile=opts["compile"]), x0, y0)
    step(x0, y0)
    _sync(device)
    row["build_s"] = time.perf_counter() - t0
    batches = [data.batch(batch_size, opts["channels_last"]) for _ in range(8)]  # rotate inputs
    k = [0]

    def one():
        xb, yb = batches[k[0] % len(batches)]
        k[0] += 1
        return step(xb, yb)[0]

    t = time_fn(one, device, repeats=10, warmup=3, budget_s=budget_s)
    loss = float(one().detach())
    if not math.isfinite(loss):
        raise RuntimeError(f"{model_name} {variant} at batch {batch_size}: loss became {loss}")
    row.update(time_train_step_s=t.median, images_per_s_train=batch_size / t.median, loss=loss)

    if epoch:  # one real pass over the data: batches built inside the timed region
        steps = math.ceil(data.n / batch_size)
        data.pos = data.n  # start a fresh permutation
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(steps):
            step(*data.batch(batch_size, opts["channels_last"]))
        _sync(device)
        row["epoch_s"] = time.perf_counter() - t1

    model.eval()  # inference is eager in every variant (same precision and layout)
    xi = data.batch(inference_batch(model, min(infer_batch, data.n)), opts["channels_last"])[0]  # as predict() batches

    def infer():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts["bf16"]):
            return model(xi).scores

    if "conv_impl" in row:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts["bf16"]):
            row["conv_impl_inference"] = "fft" if model.uses_fft_conv(xi) else "direct"
    ti = time_fn(infer, device, repeats=10, warmup=2, budget_s=budget_s)
    row.update(infer_batch=xi.shape[0], time_inference_s=ti.median, images_per_s_inference=xi.shape[0] / ti.median)
    model.train()
    rt = routing_time(model, batch_size, device, budget_s)
    if rt is not None:
        row.update(time_routing_s=rt, routing_share=rt / t.median)
    log("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return row


def run_speed(
    model_name: str,
    variants: Sequence[str],
    batch_sizes: Sequence[int],
    device: torch.device,
    data_root: str | os.PathLike | None = None,
    budget_s: float = 2.0,
    infer_batch: int = 1024,
    epoch: bool = False,
    deadline_s: float | None = None,
    log: Callable[[str], None] = print,
    routing: str = "auto",
    conv_impl: str = "auto",
) -> list[dict[str, Any]]:
    """Every (variant, batch size); a failing one gives a row with its error and the rest go on.

    ``deadline_s``: seconds from now after which the remaining configurations are skipped
    (recorded as such), so a leased GPU's time is never overrun.
    """
    from capsbench.data.fetch import ensure_dataset

    for v in variants:
        parse_variant(v)
    keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    train = ensure_dataset("mnist", root=data_root, split="train")
    data = ResidentData(train.images, train.labels, device)
    start = time.perf_counter()
    rows = []
    isa = isa_label() if device.type == "cpu" else ""  # the instruction set each CPU row ran with
    for variant in variants:
        for bs in batch_sizes:
            if deadline_s is not None and time.perf_counter() - start > deadline_s:
                rows.append({"model": model_name, "variant": variant, "batch_size": bs,
                             "error": "skipped: --deadline reached"})
                continue
            try:
                rows.append({**measure(model_name, variant, bs, data, device, budget_s, infer_batch, epoch, log,
                                       routing=routing, conv_impl=conv_impl), "isa": isa})
                if device.type == "cuda":  # the last configuration's graph and buffers are gone now
                    torch.cuda.empty_cache()
            except Exception as e:  # one variant failing (a capture, a compiler) must not lose the rest
                msg = describe(e)
                log(f"{variant} batch {bs}: {msg}")
                rows.append({"model": model_name, "variant": variant, "batch_size": bs, "error": msg})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    cols = ["variant", "routing", "conv_impl", "conv_impl_inference", "batch_size", "images_per_s_train", "epoch_s", "images_per_s_inference",
            "routing_share", "build_s"]
    lines = [" | ".join(cols)]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['variant']} | {r['batch_size']} | error: {r['error']}")
            continue
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("" if v is None else (f"{v:,.3g}" if c in ("routing_share", "epoch_s", "build_s")
                                                else f"{v:,.0f}" if isinstance(v, float) else str(v)))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def write_rows(rows: Sequence[dict[str, Any]], out: Path, meta: dict[str, Any]) -> Path:
    import pandas as pd

    from capsbench.store import atomic_write_text, write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.csv", pd.DataFrame(list(rows)).to_csv(index=False))
    write_json(out / "run.json", meta)
    return out
