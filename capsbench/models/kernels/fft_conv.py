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

Everything is real matrix products (BLAS sgemm), with complex numbers kept as separate real
and imaginary planes ("split" form, the plane axis outermost):

    X  (3, F, B, C)   the half spectrum of the input, F frequencies (below), planes Xr, Xi and
                      Xr + Xi
    Wc (3, F, Co, C)  the conjugate spectrum of the zero-padded kernel, planes Wr, Wi, Wr + Wi,
                      each frequency's (C x Co) matrix stored transposed as the kernel is
    M  (3, F, B, Co)  M = X @ Wc plane by plane: one real batched product
    y  (Ho, Wo, B, Co) = Dout @ M: the real part of the inverse transform, at the strided
                      output positions only (one small dense matrix, 36 x 606 for CapsNet)

The complex product Z = X @ Wc takes three real products instead of four (Gauss's trick):
with M1 = Xr Wr, M2 = Xi Wi and M3 = (Xr + Xi)(Wr + Wi), Zr = M1 - M2 and Zi = M3 - M1 - M2.
Z is only ever multiplied by the (real, linear) inverse transform, so those sums are folded
into its matrix (Dout acts on the planes M1, M2, M3 directly) and cost nothing. The backward
does the same with the gradient dZ (planes dZr, dZi and their difference D = dZr - dZi, all
three straight from Dout's transpose):

    dX  = dZ @ Wc^H: Q1 = dZr Wr^T, Q2 = dZi Wi^T, Q3 = D (Wr + Wi)^T,
                     dXr = Q1 + Q2, dXi = Q1 - Q2 - Q3
    dWc = X^H @ dZ:  R1 = Xr^T dZr, R2 = Xi^T dZi, R3 = (Xr + Xi)^T D,
                     dWr = R1 + R2, dWi = R1 - R2 - R3

and the sums are folded into the transposed transforms that carry dX and dWc back. The
products are three quarters of the layer's arithmetic, so this saves a quarter of it, less
the extra sum planes: forward and backward at CapsNet's shapes, batch 100, on the 2-core build
machine took 123 + 184 ms against 123 + 207 ms with four real products (commit 9fb8ad1;
batch 32: 66 + 98 against 63 + 110; tests/benchmarks/fft_conv_ab.py). float32 errors stay below the direct
convolution's (tests/test_fft_conv.py).

The half spectrum of a real H x W map has H x (W // 2 + 1) frequencies, but in its columns
fw = 0 and (W even) fw = W / 2 it is Hermitian in fh (X[H - fh] = conj X[fh]), and so are Z
and the kernel's spectrum: those columns are computed for fh = 0 .. H // 2 only and the
output map counts each of them twice. For CapsNet's 20 x 20 map that is 202 frequencies
instead of 220, in two groups (general columns, self-conjugate columns) with a product each.

The transforms are small dense DFT matrices applied one axis at a time (w, then h; for the
kernel l, then k), each a real matrix product that writes its result in the layout the next
one reads, so no transposing copies are needed when the input is stored (H, W, B, C), as
:func:`gemm_conv2d` writes it. Every transform is linear and real, so the backward applies
the transposed matrices to the gradients (with the sums above folded in): no complex
conjugation rules to get wrong, and a float64 gradcheck holds it to the same maths
(tests/test_fft_conv.py). Conventions:

    X[fh, fw]  = sum_{h,w} x[h, w] e^{-2 pi i (fh h / H + fw w / W)}
    Wc[fh, fw] = sum_{k,l} w[k, l] e^{+2 pi i (fh k / H + fw l / W)}
    y[mh, mw]  = Re sum_f a_fw Z[f] e^{+2 pi i (fh s mh / H + fw s mw / W)} / (H W)

where a_fw = 1 for the columns a real inverse FFT counts once (fw = 0 and, for even W, W / 2)
and 2 for the others. CapsNet uses this for PrimaryCaps in float32 CPU training steps and
batched inference (models/capsnet.py, ``conv_impl``), the pooling CNNs for their second
convolution in the same cases (capsbench/models/baselines/cnn.py); on a GPU cuDNN's convolutions are the faster choice.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from capsbench.models.base import env_choice

# How a model's large convolutions run: "direct" is F.conv2d (oneDNN / cuDNN); "fft" runs them
# through this module (the same convolutions to float32 rounding); "auto" decides per call
# (:func:`wants_fft`). The environment variable CAPSBENCH_CONV overrides "auto".
CONV_IMPLS = ("auto", "direct", "fft")

_MAPS: dict[tuple, tuple] = {}


def check_conv_impl(conv_impl: str) -> str:
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {', '.join(CONV_IMPLS)}, got {conv_impl!r}")
    return conv_impl


def wants_fft(conv_impl: str, x: torch.Tensor, weight: torch.Tensor, min_batch: int | None = None,
              min_infer_batch: int | None = None, max_input: int | None = None) -> bool:
    """Whether a model with ``conv_impl`` runs its convolutions by the DFT on its input ``x``.

    "fft" and "direct" (from the model or, for "auto", from CAPSBENCH_CONV) are obeyed; "auto"
    takes the DFT where it measured faster: on CPUs, in float32 without autocast, on inputs up
    to ``max_input`` pixels a side, from batch ``min_batch`` in training steps (``weight``
    requires grad) and ``min_infer_batch`` in inference. The weight transform costs the same at
    any batch size, so small batches stay direct. Without thresholds "auto" is "direct".
    """
    kind = conv_impl if conv_impl != "auto" else env_choice("CAPSBENCH_CONV", CONV_IMPLS)
    if kind != "auto":
        return kind == "fft" and weight.dtype in (torch.float32, torch.float64)
    if min_batch is None or min_infer_batch is None or max_input is None:
        return False
    training = torch.is_grad_enabled() and weight.requires_grad
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and max(x.shape[-2:]) <= max_input
            and x.shape[0] >= (min_batch if training else min_infer_batch))


def _cis(rows: int, row_step: int, cols: int, col_step: int, n: int, sign: int) -> torch.Tensor:
    """E[a, b] = exp(sign 2 pi i (a row_step)(b col_step) / n), complex128; the products are
    reduced modulo n in integers first, so every entry is exact to float64."""
    a = torch.arange(rows, dtype=torch.int64)[:, None] * row_step
    b = torch.arange(cols, dtype=torch.int64)[None, :] * col_step
    angle = (a * b % n).to(torch.float64) * (sign * 2.0 * math.pi / n)
    return torch.polar(torch.ones_like(angle), angle)


def _of_real(E: torch.Tensor) -> torch.Tensor:
    """The complex map E (m x n) on a real input, as a real (2m x n) matrix: rows (plane, i)."""
    return torch.cat([E.real, E.imag])


def _of_complex(E: torch.Tensor) -> torch.Tensor:
    """The complex map E (m x n) as a real (2m x 2n) matrix from inputs ordered (j, plane)
    (the output of an :func:`_of_real` stage read row-pair-wise) to outputs (plane, i)."""
    m, n = E.shape
    R = torch.empty(2, m, n, 2, dtype=torch.float64)
    R[0, :, :, 0], R[0, :, :, 1] = E.real, -E.imag
    R[1, :, :, 0], R[1, :, :, 1] = E.imag, E.real
    return R.reshape(2 * m, 2 * n)


def _maps(H: int, W: int, K: int, L: int, s: int, dtype: torch.dtype, device: torch.device) -> tuple:
    """The real DFT matrices of one geometry (cached): input w -> fw and kernel l -> fw, with the
    columns fw ordered "general" first and then the self-conjugate ones (0 and, for even W, W/2);
    and per frequency group the matrices (in_h, k_k, out, out_t, in_h_t, k_k_t) and the range
    (lo, hi) of fw columns it covers:

        in_h    (h, plane) -> (plane, fh): the input's transform along h, planes (r, i)
        k_k     (k, plane) -> (plane, fh): the kernel's along k
        out     (M1, M2, M3) -> the strided outputs (the three-product sums folded in)
        out_t   the output gradient -> (dZr, dZi, dZr - dZi)
        in_h_t  (Q1, Q2, Q3) -> the gradient of the input's transform along w
        k_k_t   (R1, R2, R3) -> the gradient of the kernel's transform along l

    In the self-conjugate columns the spectrum of real data is Hermitian in fh, so only
    fh = 0 .. H // 2 are computed and the others counted twice in the output map."""
    key = (H, W, K, L, s, dtype, device)
    cached = _MAPS.get(key)
    if cached is not None:
        return cached
    Fw, Ho, Wo = W // 2 + 1, (H - K) // s + 1, (W - L) // s + 1
    special = [0] + ([W // 2] if W % 2 == 0 and W // 2 > 0 else [])
    order = [f for f in range(Fw) if f not in special] + special
    n1 = Fw - len(special)
    in_w = _of_real(_cis(Fw, 1, W, 1, W, -1)[order])  # (2Fw, W): rows (plane, fw')
    k_l = _of_real(_cis(Fw, 1, L, 1, W, +1)[order])  # (2Fw, L)
    in_h = _of_complex(_cis(H, 1, H, 1, H, -1))  # (2H, 2H)
    k_k = _of_complex(_cis(H, 1, K, 1, H, +1))  # (2H, 2K)
    a = torch.full((Fw,), 2.0, dtype=torch.float64)
    a[special] = 1.0
    out_h = _cis(Ho, s, H, 1, H, +1)  # (mh, fh)
    out_w = (_cis(Wo, s, Fw, 1, W, +1) * (a / (H * W)))[:, order]  # (mw, fw')
    H2 = H // 2 + 1
    twice = torch.full((H2,), 2.0, dtype=torch.float64)  # fh and H - fh, conjugates
    twice[0] = 1.0
    if H % 2 == 0:
        twice[H // 2] = 1.0
    groups = []
    for lo, hi, rows, weight in ((0, n1, H, 1.0), (n1, Fw, H2, twice)):
        if hi == lo:
            continue
        oh = out_h[:, :rows] * weight
        out = (oh[:, None, :, None] * out_w[None, :, None, lo:hi]).reshape(Ho * Wo, rows * (hi - lo))
        Or, Oi = out.real, -out.imag  # y = Or Zr + Oi Zi
        ih = in_h.view(2, H, 2 * H)[:, :rows]  # (plane, fh, (h, plane'))
        kk = k_k.view(2, H, 2 * K)[:, :rows]
        groups.append((ih.reshape(2 * rows, 2 * H), kk.reshape(2 * rows, 2 * K),
                       torch.cat([Or - Oi, -Or - Oi, Oi], dim=1),
                       torch.cat([Or, Oi, Or - Oi], dim=1).t(),
                       torch.cat([ih[0] + ih[1], ih[0] - ih[1], -ih[1]]).t(),
                       torch.cat([kk[0] + kk[1], kk[0] - kk[1], -kk[1]]).t(), lo, hi))

    def conv(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype=dtype, device=device).contiguous()

    cached = (conv(in_w), conv(k_l), [(*(conv(m) for m in g[:6]), *g[6:]) for g in groups])
    _MAPS[key] = cached
    return cached


class _FFTConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, stride: int):
        B, C, H, W = x.shape
        Co, _, K, L = w.shape
        Ho, Wo = (H - K) // stride + 1, (W - L) // stride + 1
        Fw = W // 2 + 1
        in_w, k_l, groups = _maps(H, W, K, L, stride, x.dtype, x.device)
        xt = x.permute(2, 3, 0, 1).contiguous()  # (H, W, B, C); no copy for gemm_conv2d's output
        T = torch.matmul(in_w, xt.view(H, W, B * C)).view(2 * H, Fw * B * C)  # rows (h, plane), cols (fw', b, c)
        wt = w.view(Co * C, K * L).t().contiguous()  # (K, L, Co, C): one plain transpose
        P = torch.matmul(k_l, wt.view(K, L, Co * C)).view(2 * K, Fw * Co * C)
        y = None
        saved = []
        for in_h, k_k, out, _, _, _, lo, hi in groups:
            rows = in_h.shape[0] // 2
            nf = rows * (hi - lo)
            X = x.new_empty(3, nf, B, C)  # planes Xr, Xi, Xr + Xi
            torch.mm(in_h, T[:, lo * B * C:hi * B * C], out=X[:2].view(2 * rows, -1))
            torch.add(X[0], X[1], out=X[2])
            Wc = x.new_empty(3, nf, Co, C)  # each frequency's matrix stored transposed, as w is
            torch.mm(k_k, P[:, lo * C * Co:hi * C * Co], out=Wc[:2].view(2 * rows, -1))
            torch.add(Wc[0], Wc[1], out=Wc[2])
            M = torch.bmm(X.view(3 * nf, B, C), Wc.view(3 * nf, Co, C).transpose(1, 2)).view(3 * nf, B * Co)
            y = torch.mm(out, M) if y is None else y.addmm_(out, M)
            saved += [X, Wc]
        y = y.view(Ho, Wo, B, Co).permute(2, 3, 0, 1)
        if bias is not None:
            y += bias.view(1, Co, 1, 1)
        ctx.save_for_backward(*saved)
        # the input gradient comes back in x's memory layout when that is a dense one
        dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) or xt.data_ptr() == x.data_ptr()
        ctx.x_stride = x.stride() if dense else None
        ctx.shape = (B, C, H, W, Co, K, L, Ho, Wo, stride, bias is not None)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        saved = ctx.saved_tensors
        B, C, H, W, Co, K, L, Ho, Wo, s, has_bias = ctx.shape
        Fw = W // 2 + 1
        in_w, k_l, groups = _maps(H, W, K, L, s, dy.dtype, dy.device)
        # every stage of the forward is a real linear map: its transpose carries the gradient back
        g = dy.permute(2, 3, 0, 1).reshape(Ho * Wo, B * Co)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dT = g.new_empty(2 * H, Fw * B * C) if need_x else None
        dP = g.new_empty(2 * K, Fw * C * Co) if need_w else None
        for i, (_, _, _, out_t, in_h_t, k_k_t, lo, hi) in enumerate(groups):
            X, Wc = saved[2 * i], saved[2 * i + 1]
            nf = X.shape[1]
            dZ = torch.mm(out_t, g).view(3 * nf, B, Co)  # planes dZr, dZi, dZr - dZi
            if need_x:  # Q = dZ @ Wc^T plane by plane (Wc is stored transposed)
                Q = torch.bmm(dZ, Wc.view(3 * nf, Co, C))
                torch.mm(in_h_t, Q.view(in_h_t.shape[1], -1), out=dT[:, lo * B * C:hi * B * C])
            if need_w:  # R^T = dZ^T @ X plane by plane, in Wc's (Co, C) layout
                R = torch.bmm(dZ.transpose(1, 2), X.view(3 * nf, B, C))
                torch.mm(k_k_t, R.view(k_k_t.shape[1], -1), out=dP[:, lo * C * Co:hi * C * Co])
        dx = dw = db = None
        if need_x:
            dx = torch.matmul(in_w.t(), dT.view(H, 2 * Fw, B * C)).view(H, W, B, C).permute(2, 3, 0, 1)
            if ctx.x_stride is not None and dx.stride() != ctx.x_stride:
                dx = dx.new_empty_strided(dx.shape, ctx.x_stride).copy_(dx)
        if need_w:
            dwt = torch.matmul(k_l.t(), dP.view(K, 2 * Fw, Co * C))  # (K, L, Co C)
            dw = dwt.view(K * L, Co * C).t().contiguous().view(Co, C, K, L)  # one plain transpose
        if has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, dw, db, None


def gemm_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                relu: bool = False) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` (stride 1, no padding) as one matrix product over im2col patches,
    followed by a ReLU if ``relu``.

    For CapsNet's Conv1 on CPUs: with a single input channel oneDNN's weight gradient runs at a
    tenth of the machine's GEMM rate; here forward and weight gradient are one GEMM each
    (1.7 GFLOP at batch 100). The result is stored (H, W, B, C) in memory (a permuted view),
    the layout :func:`fft_conv2d` reads without a copy.
    """
    B, C, H, W = x.shape
    Co, _, K, L = weight.shape
    Ho, Wo = H - K + 1, W - L + 1
    cols = F.unfold(x, (K, L)).permute(2, 0, 1).reshape(Ho * Wo * B, C * K * L)  # rows (h, w, b)
    w = weight.reshape(Co, C * K * L).t()
    y = cols @ w if bias is None else torch.addmm(bias, cols, w)
    if relu:
        y = torch.relu_(y)  # in place on the matrix: on the permuted view it would cost copies
    return y.view(Ho, Wo, B, Co).permute(2, 3, 0, 1)


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


__all__ = ["CONV_IMPLS", "check_conv_impl", "fft_conv2d", "gemm_conv2d", "wants_fft"]
