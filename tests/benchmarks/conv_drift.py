"""How far a model's training drifts from its direct-convolution run after a few Adam steps.

Trains ``--model`` (default cnn_maxpool) for ``--steps`` Adam steps on one fixed batch of
sparse random images three times from the same initialisation: with F.conv2d on two threads
(the reference), with F.conv2d on one thread (a change in summation order only), and with the
DFT convolution (conv_impl="fft"). Prints, per weight tensor, the largest difference from
the reference over the reference's largest entry. docs/performance.md quotes it for cnn_maxpool.

    python tests/benchmarks/conv_drift.py --model cnn_maxpool --steps 12
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from capsbench.models import create_model


def train(name: str, conv_impl: str, threads: int, steps: int, x: torch.Tensor, y: torch.Tensor) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(1)
        model = create_model(name, conv_impl=conv_impl)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        for s in range(steps):
            idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(s))
            opt.zero_grad()
            F.cross_entropy(model(x[idx]).scores, y[idx]).backward()
            opt.step()
        return model.state_dict()
    finally:
        torch.set_num_threads(before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn_maxpool")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.rand(args.batch, 1, 28, 28)
    x[x < 0.6] = 0  # mostly empty background, like a digit
    y = torch.randint(0, 10, (args.batch,))
    ref = train(args.model, "direct", 2, args.steps, x, y)
    for label, impl, threads in (("direct, 1 thread", "direct", 1), ("DFT, 2 threads", "fft", 2)):
        sd = train(args.model, impl, threads, args.steps, x, y)
        drift = {k: f"{((sd[k] - ref[k]).abs().max() / ref[k].abs().max()).item():.1e}"
                 for k in ref if k.endswith("weight")}
        print(f"{args.model}, {args.steps} steps, {label}: {drift}")


if __name__ == "__main__":
    main()
