"""Routing cost on one GPU: u_hat + routing forward and backward, float32, plain vs fused.

Times the plain path (u_hat written, batched matmuls) and the fused Triton kernels for each
tile configuration (CAPSBENCH_ROUTING_TILES = "BB,BK,warps,stages"), at the paper CapsNet's sizes
(1152 inputs x 8-D, 10 outputs x 16-D, r = 3), and prints the fastest configuration last.
Usage (device machine): python tests/benchmarks/routing_tiles.py [--batch-sizes 128,512] [--out f.csv]
"""

from __future__ import annotations

import argparse
import os

import torch

from capsbench.models.capsnet import dynamic_routing
from capsbench.models.kernels.fused_routing import fused_routing
from capsbench.models.routing import squash
from capsbench.perf.timing import time_fn

CONFIGS = ["16,64,4,1", "16,64,4,2", "32,64,8,2", "32,32,4,2", "32,128,8,2", "16,32,4,2"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", default="128,512")
    ap.add_argument("--configs", default=",".join(c.replace(",", ":") for c in CONFIGS),
                    help="BB:BK:warps:stages, comma-separated")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="print the kernel table of the best config")
    args = ap.parse_args()
    dev = torch.device("cuda")
    configs = [c.replace(":", ",") for c in args.configs.split(",")]
    rows = []
    for B in (int(b) for b in args.batch_sizes.split(",")):
        g = torch.Generator(device=dev).manual_seed(0)
        u = squash(torch.randn(B, 1152, 8, device=dev, generator=g)).requires_grad_()
        W = (0.05 * torch.randn(1152, 8, 160, device=dev, generator=g)).requires_grad_()
        w = torch.randn(B, 10, 16, device=dev, generator=g)

        def plain(u=u, W=W, w=w, B=B):
            u_hat = torch.bmm(u.transpose(0, 1), W).view(1152, B, 10, 16).permute(1, 2, 0, 3).contiguous()
            v, _ = dynamic_routing(u_hat, 3)
            torch.autograd.grad((v * w).sum(), (u, W))

        def fused(u=u, W=W, w=w):
            v, _ = fused_routing(u, W, 10, 3)
            torch.autograd.grad((v * w).sum(), (u, W))

        t = time_fn(plain, dev, repeats=20, warmup=3, budget_s=1.0).median
        rows.append({"batch_size": B, "path": "plain", "tiles": "", "ms": 1e3 * t})
        print(f"B={B} plain {1e3 * t:.3f} ms", flush=True)
        for cfg in configs:
            os.environ["CAPSBENCH_ROUTING_TILES"] = cfg
            try:
                t = time_fn(fused, dev, repeats=20, warmup=3, budget_s=1.0).median
            except Exception as e:  # a tile that does not compile (registers, shared memory)
                print(f"B={B} fused {cfg}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                continue
            rows.append({"batch_size": B, "path": "fused", "tiles": cfg, "ms": 1e3 * t})
            print(f"B={B} fused {cfg} {1e3 * t:.3f} ms", flush=True)
    fused_rows = [r for r in rows if r["path"] == "fused"]
    totals: dict[str, float] = {}
    for r in fused_rows:
        totals[r["tiles"]] = totals.get(r["tiles"], 0.0) + r["ms"] / r["batch_size"]
    n_b = len(args.batch_sizes.split(","))
    complete = {k: v for k, v in totals.items() if sum(r["tiles"] == k for r in fused_rows) == n_b}
    best = min(complete, key=complete.get)
    if args.out:
        import pandas as pd

        pd.DataFrame(rows).to_csv(args.out, index=False)
    if args.profile:
        os.environ["CAPSBENCH_ROUTING_TILES"] = best
        B = int(args.batch_sizes.split(",")[-1])
        u = squash(torch.randn(B, 1152, 8, device=dev)).requires_grad_()
        W = (0.05 * torch.randn(1152, 8, 160, device=dev)).requires_grad_()
        for _ in range(3):
            v, _ = fused_routing(u, W, 10, 3)
            v.sum().backward()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                v, _ = fused_routing(u, W, 10, 3)
                v.sum().backward()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))
    print(f"BEST {best}")


if __name__ == "__main__":
    main()
