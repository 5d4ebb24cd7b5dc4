"""Valid (unpadded), strided 2-D convolution through the discrete Fourier transform, for CPUs.

CapsNet's PrimaryCaps layer is a 9x9, stride-2 convolution from 256 to 256 channels on a
20x20 map: 382 MFLOP per image forward and 1.2 GFLOP with its backward, most of a CPU
training step (tests/benchmarks/cpu_conv_bound.py). By the convolution theorem the same
layer is, for every spatial frequency f of the 20x20 map, one product of complex matrices
(batch x 256) @ (256 x 256): 220 frequencies x 256 x 256 complex multiply-adds = 115 MFLOP
per image, and the backward is two more such products. The result is the same convolution
(the circular correlation of a map of side N with a kernel of side K has no wrap-around at
the N - K + 1 valid positions), not an approximation; it differs from a direct convolution
only by float32 rounding, and is closer to a float64 reference than oneDNN's direct one
(tests/test_fft_conv.py).

The transforms of the activations are real FFTs (torch.fft); everything else, the weight
transform (81 taps -> 220 frequencies), the output (220 frequencies -> the 36 strided output
positions only) and the weight gradient (220 frequencies -> the 81 taps only), is evaluated
as small dense DFT matrices applied one axis at a time, which is cheaper than full FFTs of
mostly-zero or mostly-unused grids and writes each result in the layout the next product
wants. Conventions (N = H x W the map, F = H x (W // 2 + 1) half-spectrum frequencies):

    X[f, b, c]  = sum_n x[b, c, n] e^{-2 pi i f.n / N}          rfft2 of the input
    Wc[f, c, o] = sum_k w[o, c, k] e^{+2 pi i f.k / N}          conj(DFT(w)), zero-padded to N
    Z  = X @ Wc  (per f)                                        DFT of the stride-1 correlation
    y[b, o, m]  = Re sum_f a_f Z[f, b, o] e^{+2 pi i f.(s m)} / N   at the strided outputs only
    G  = conj(DFT(dy upsampled by s))                           (F, B, O)
    dx = irfft2(conj(G @ Wc^T)),   dw[o, c, k] = Re sum_f a_f (G^T @ X)[f, o, c] e^{+2 pi i f.k} / N

where a_f = 1 for the columns a real inverse FFT counts once (f_w = 0 and, for even W, W / 2)
and 2 for the others. CapsNet uses this for PrimaryCaps in float32 CPU training steps (models/capsnet.py,
``conv_impl``); on a GPU cuDNN's convolutions are the faster choice.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_TWIDDLES: dict[tuple, torch.Tensor] = {}


def _twiddle(rows: int, row_step: int, cols: int, col_step: int, n: int, dtype: torch.dtype,
             device: torch.device, half_weights: bool = False, scale: float = 1.0) -> torch.Tensor:
    """E[a, b] = w_b * scale * exp(+2 pi i (a row_step)(b col_step) / n), complex ``dtype``.

    ``half_weights``: the columns are half-spectrum frequencies b of a real signal of length n,
    weighted 1 (b = 0, and b = n / 2 for even n) or 2 (the others) so that Re(E @ X) is the
    inverse of a real FFT. Cached: the products are computed once per shape, exactly (in
    integers modulo n, then float64).
    """
    key = (rows, row_step, cols, col_step, n, dtype, device, half_weights, scale)
    cached = _TWIDDLES.get(key)
    if cached is not None:
        return cached
    a = torch.arange(rows, dtype=torch.int64)[:, None] * row_step
    b = torch.arange(cols, dtype=torch.int64)[None, :] * col_step
    angle = (a * b % n).to(torch.float64) * (2.0 * math.pi / n)
    weight = torch.full((cols,), scale, dtype=torch.float64)
    if half_weights:
        weight[1:] *= 2.0
        if n % 2 == 0 and cols > n // 2:
            weight[n // 2] = scale
    table = torch.polar(weight.expand_as(angle), angle).to(dtype=dtype, device=device)
    _TWIDDLES[key] = table
    return table


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


class _FFTConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, stride: int):
        B, C, H, W = x.shape
        Co, _, K, L = w.shape
        Ho, Wo = (H - K) // stride + 1, (W - L) // stride + 1
        Fw = W // 2 + 1
        cdt, dev = _complex(x.dtype), x.device
        # X (H, Fw, B, C): frequencies outermost, so that X[f] is one (B, C) matrix
        # rfft2 returns the transformed axes innermost whatever the input layout: one copy here
        X = torch.fft.rfft2(x.permute(2, 3, 0, 1), dim=(0, 1)).contiguous()
        # Wc = conj(DFT(w)) (H, Fw, C, Co): taps k -> rows f_h, then taps l -> columns f_w
        wt = w.permute(2, 3, 1, 0).to(cdt)  # (K, L, C, Co)
        Q = _twiddle(H, 1, K, 1, H, cdt, dev) @ wt.reshape(K, L * C * Co)  # (H, L * C * Co)
        Wc = _twiddle(Fw, 1, L, 1, W, cdt, dev) @ Q.view(H, L, C * Co)  # (H, Fw, C * Co)
        Z = torch.bmm(X.view(H * Fw, B, C), Wc.view(H * Fw, C, Co))  # (F, B, Co)
        # y at the strided positions only: columns f_w -> w_o, then rows f_h -> h_o, real part
        T = _twiddle(Wo, stride, Fw, 1, W, cdt, dev, half_weights=True, scale=1.0 / W) @ Z.view(H, Fw, B * Co)
        y = (_twiddle(Ho, stride, H, 1, H, cdt, dev, scale=1.0 / H) @ T.view(H, Wo * B * Co)).real
        y = y.view(Ho, Wo, B, Co).permute(2, 3, 0, 1).contiguous()
        if bias is not None:
            y += bias.view(1, Co, 1, 1)
        ctx.save_for_backward(X, Wc)
        ctx.channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        ctx.shape = (B, C, H, W, Co, K, L, Ho, Wo, stride, bias is not None)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        X, Wc = ctx.saved_tensors
        B, C, H, W, Co, K, L, Ho, Wo, s, has_bias = ctx.shape
        Fw = W // 2 + 1
        cdt, dev = X.dtype, X.device
        # G = conj(DFT of dy placed at the strided positions) (H, Fw, B, Co): h_o -> f_h, w_o -> f_w
        d = dy.permute(2, 3, 0, 1).to(cdt)  # (Ho, Wo, B, Co)
        P = _twiddle(H, 1, Ho, s, H, cdt, dev) @ d.reshape(Ho, Wo * B * Co)  # (H, Wo * B * Co)
        G = _twiddle(Fw, 1, Wo, s, W, cdt, dev) @ P.view(H, Wo, B * Co)  # (H, Fw, B * Co)
        G = G.view(H * Fw, B, Co)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dX = torch.bmm(G, Wc.view(H * Fw, C, Co).transpose(1, 2)).view(H, Fw, B, C)
            dx = torch.fft.irfft2(dX.conj(), s=(H, W), dim=(0, 1))  # (H, W, B, C), NCHW in memory
            if ctx.channels_last:  # the gradient in the memory layout of x
                dx = dx.permute(2, 0, 1, 3).contiguous().permute(0, 3, 1, 2)
            else:
                dx = dx.permute(2, 3, 0, 1).contiguous()
        if ctx.needs_input_grad[1]:
            S = G.new_empty(H * Fw, Co, C)
            Xf = X.view(H * Fw, B, C)
            if G.is_cuda:
                torch.bmm(G.transpose(1, 2), Xf, out=S)
            else:  # CPUs: one gemm per frequency is 1.6x faster than bmm at this (contraction = batch) shape
                for f in range(H * Fw):
                    torch.mm(G[f].T, Xf[f], out=S[f])
            # only the K x L taps of the inverse transform: f_w -> l, then f_h -> k, real part
            R = _twiddle(L, 1, Fw, 1, W, cdt, dev, half_weights=True, scale=1.0 / W) @ S.view(H, Fw, Co * C)
            dw = (_twiddle(K, 1, H, 1, H, cdt, dev, scale=1.0 / H) @ R.view(H, L * Co * C)).real
            dw = dw.view(K, L, Co, C).permute(2, 3, 0, 1).contiguous()
        if has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, dw, db, None


def gemm_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                relu: bool = False) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` (stride 1, no padding) as one matrix product over im2col patches,
    followed by a ReLU if ``relu``.

    For CapsNet's Conv1 on CPUs: with a single input channel oneDNN's weight gradient runs at a
    tenth of the machine's GEMM rate; here forward and weight gradient are one GEMM each
    (1.7 GFLOP at batch 100). The result is channels_last in memory.
    """
    B, C, H, W = x.shape
    Co, _, K, L = weight.shape
    Ho, Wo = H - K + 1, W - L + 1
    cols = F.unfold(x, (K, L)).transpose(1, 2).reshape(B * Ho * Wo, C * K * L)
    w = weight.reshape(Co, C * K * L).t()
    y = cols @ w if bias is None else torch.addmm(bias, cols, w)
    if relu:
        y = F.relu(y)  # on the matrix, before the view: an in-place ReLU on the view costs copies
    return y.view(B, Ho, Wo, Co).permute(0, 3, 1, 2)


def fft_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               stride: int = 1) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=stride)`` (no padding, dilation or groups) by the DFT.

    Real float32 or float64 tensors on any device; gradients for all three. Meant for large
    kernels on small maps (CapsNet's PrimaryCaps), where it does about a third of the
    arithmetic of a direct convolution.
    """
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"fft_conv2d: expected x (B, C, H, W) and weight (O, C, K, L), got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[-2] < weight.shape[-2] or x.shape[-1] < weight.shape[-1]:
        raise ValueError(f"fft_conv2d: the map {tuple(x.shape[-2:])} is smaller than the kernel "
                         f"{tuple(weight.shape[-2:])}")
    if x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype:
        raise TypeError(f"fft_conv2d: float32 or float64 tensors of one dtype, got {x.dtype} and {weight.dtype}")
    return _FFTConv2d.apply(x, weight, bias, int(stride))


__all__ = ["fft_conv2d", "gemm_conv2d"]
