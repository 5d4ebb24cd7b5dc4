"""What bounds CapsNet training on a CPU: the PrimaryCaps convolution alone, forward + backward.

Times, at batch 100 in float32 with the process's torch threads: the 9x9 stride-2 256 -> 256
PrimaryCaps convolution forward, its forward + backward (input and weight gradients, as in
training), the same as unfold + matmul, a large sgemm of the same inner size, and the same
convolution through the DFT (capsbench/models/kernels/fft_conv.py, what CapsNet's CPU training steps use),
and prints the images/s ceiling each puts on a training step. Like the CLI, it first applies
capsbench/malloc.py's settings (``--system-malloc`` leaves glibc's defaults), and it gives the
DFT convolution its input in the (H, W, B, C) memory layout that CapsNet's Conv1 GEMM writes.
Usage: python tests/benchmarks/cpu_conv_bound.py [--batch 100] [--threads 2] [--system-malloc]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from capsbench.malloc import keep_freed_memory
from capsbench.models.kernels.fft_conv import fft_conv2d


def best(fn, n: int = 5) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--system-malloc", action="store_true", help="leave glibc's malloc settings alone")
    args = ap.parse_args()
    if not args.system_malloc:
        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    B = args.batch
    x = torch.randn(B, 256, 20, 20, requires_grad=True)
    x_hwbc = torch.randn(20, 20, B, 256).permute(2, 3, 0, 1).requires_grad_()  # gemm_conv2d's layout
    w = torch.randn(256, 256, 9, 9, requires_grad=True)
    flop_fwd = 2 * B * 6 * 6 * 256 * 256 * 81  # output positions x out channels x (in channels x 81)

    def conv_fwd():
        with torch.no_grad():
            F.conv2d(x, w, stride=2)

    def conv_train():
        x.grad = w.grad = None
        y = F.conv2d(x, w, stride=2)
        y.backward(torch.ones_like(y))

    def unfold_train():
        x.grad = w.grad = None
        y = w.view(256, -1) @ F.unfold(x, 9, stride=2)
        y.backward(torch.ones_like(y))

    def fft_train():
        x_hwbc.grad = w.grad = None
        y = fft_conv2d(x_hwbc, w, stride=2)
        y.backward(torch.ones_like(y))

    a, b = torch.randn(B * 36, 256 * 81), torch.randn(256 * 81, 256)
    t_f, t_t, t_u, t_g = best(conv_fwd), best(conv_train), best(unfold_train), best(lambda: a @ b)
    t_fft = best(fft_train)
    print(f"threads {torch.get_num_threads()}, batch {B}, malloc {'system' if args.system_malloc else 'keep'}")
    print(f"PrimaryCaps conv forward          {t_f:.3f} s  {flop_fwd / t_f / 1e9:6.1f} GFLOP/s")
    print(f"PrimaryCaps conv forward+backward {t_t:.3f} s  {3 * flop_fwd / t_t / 1e9:6.1f} GFLOP/s"
          f"  -> at most {B / t_t:.0f} training images/s from this layer alone")
    print(f"same via unfold + matmul          {t_u:.3f} s")
    print(f"sgemm ({B * 36} x {256 * 81} x 256)   {t_g:.3f} s  {flop_fwd / t_g / 1e9:6.1f} GFLOP/s"
          f"  -> even at this rate: at most {B / (3 * t_g):.0f} images/s")
    print(f"FFT convolution forward+backward  {t_fft:.3f} s  "
          f"-> at most {B / t_fft:.0f} training images/s from this layer (a third of the arithmetic)")


if __name__ == "__main__":
    main()
