"""A/B timing of the DFT convolution: this checkout's fft_conv2d against another commit's.

Loads ``capsbench/models/kernels/fft_conv.py`` as it was at ``--rev`` (``git show``), then alternates
forward and forward + backward of both at CapsNet's PrimaryCaps shapes (256 -> 256 channels,
9x9, stride 2, 20x20 map; input in the (H, W, B, C) layout Conv1 writes) in one process, so
both see the same machine state, and prints median and lower-quartile times. Run it from the
repository root (it needs git); docs/performance.md quotes it.

    python tests/benchmarks/fft_conv_ab.py --rev 9fb8ad1 --batch 100 --reps 30
"""

from __future__ import annotations

import argparse
import time

import torch
from at_commit import module_at  # tests/benchmarks/at_commit.py, beside this script

from capsbench.malloc import keep_freed_memory
from capsbench.models.kernels.fft_conv import fft_conv2d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="the commit to compare with, e.g. HEAD~1")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    keep_freed_memory()
    other = module_at(args.rev, "capsbench/models/kernels/fft_conv.py").fft_conv2d
    B = args.batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 20, B, 256, generator=g).permute(2, 3, 0, 1).requires_grad_()
    w = (torch.randn(256, 256, 9, 9, generator=g) * 0.01).requires_grad_()
    b = torch.randn(256, generator=g).requires_grad_()
    dy = torch.randn(B, 256, 6, 6, generator=g)
    fns = {"this checkout": fft_conv2d, args.rev: other}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for rep in range(args.reps + 2):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            y = fn(x, w, b, stride=2)
            t1 = time.perf_counter()
            y.backward(dy)
            t2 = time.perf_counter()
            x.grad = w.grad = b.grad = None
            if rep >= 2:  # warm-up
                times[name].append((t1 - t0, t2 - t1))
    print(f"fft_conv2d at PrimaryCaps shapes, batch {B}, {torch.get_num_threads()} threads, {args.reps} alternating reps")
    for name, ts in times.items():
        fwd = sorted(t for t, _ in ts)
        bwd = sorted(t for _, t in ts)
        q = len(ts) // 4
        print(f"{name:>14}: forward median {fwd[len(ts) // 2] * 1e3:.1f} ms (q1 {fwd[q] * 1e3:.1f}), "
              f"backward median {bwd[len(ts) // 2] * 1e3:.1f} ms (q1 {bwd[q] * 1e3:.1f})")


if __name__ == "__main__":
    main()
