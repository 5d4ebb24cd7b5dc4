"""Dynamic routing fused with the DigitCaps predictions, for CUDA (Triton kernels).

The plain path (:func:`capsbench.models.capsnet.dynamic_routing`) writes
u_hat_{j|i} = W_ij u_i once (B x 10 x 1152 x 16 floats, 737 kB per image) and reads it
back in every routing pass, forward and backward. On a GPU that traffic, not arithmetic,
is what routing costs once the convolutions run in bf16 (reports/gpu-h100). Here u_hat is
never stored: each kernel reads the 8-D primary capsules u (37 kB per image) and W and
does its contraction with u_hat as products of tiles of u and W (tl.dot), 2.9 MFLOP per
image per pass. Status (reports/gpu-h100, 2026-11-26): correct, but on an H100 routing only
7-19% faster than the plain path and the training step no faster, so it is opt-in
(CapsNet(routing_kernel="triton") or CAPSBENCH_ROUTING=triton).

Every pass of routing, and of its backward, is one of four tile operations:

    agree  A[b,j,i] = u_hat[b,j,i,:] . X[b,j,:]          agreements, and d loss / d c
    wsum   S[b,j,:] = sum_i C[b,j,i] u_hat[b,j,i,:]      s_j, and d loss / d v
    grad_u  d u[b,i,:]   = sum_j W_ij^T H[b,j,i,:]
    grad_W  d W_ij       = sum_b H[b,j,i,:] (x) u[b,i,:]

where H = d loss / d u_hat = sum_t alpha_t[b,j,i] beta_t[b,j,:] is the same low-rank sum
(2r - 1 terms) that :class:`capsbench.models.capsnet._DynamicRouting` forms, built here per
tile and never stored. The small tensors (s, v, logits, couplings: at most B x 10 x 1152)
stay in PyTorch, so the routing algebra and its backward mirror the plain path line by line.
The results agree with the literal Procedure 1 (tests/test_models.py) to float32 rounding.

Kernels accumulate in the dtype of their inputs (float32 in the model; float64 in tests).
They run on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1,
slow; used by the tests on machines without a GPU).
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of PyTorch; without it the plain path is used
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

# Tile sizes: a program takes BB images x BK columns of u (BK / 8 input capsules), run by
# `warps` warps with `stages` software-pipeline stages. The fastest of six on an H100 for the
# previous version of the kernels (reports/gpu-h100); CAPSBENCH_ROUTING_TILES="BB,BK,warps[,stages]"
# overrides them (powers of two, BB and BK >= 16).
DEFAULT_TILES = (16, 64, 4, 1)
# wsum programs cover WSUM_TILES_PER_PROGRAM consecutive BK-tiles and write one partial sum each;
# the W gradient is split over the batch into about GRAD_W_PROGRAMS programs.
GRAD_W_PROGRAMS = 8192
WSUM_TILES_PER_PROGRAM = 4


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(t: torch.Tensor) -> bool:
    """Whether the fused kernels can run on ``t``'s device."""
    if triton is None:
        return False
    return t.is_cuda or (_interpreting() and t.device.type == "cpu")


def _tiles() -> tuple[int, int, int, int]:
    spec = os.environ.get("CAPSBENCH_ROUTING_TILES")
    if not spec:
        return DEFAULT_TILES
    try:
        vals = [int(x) for x in spec.split(",")]
        if len(vals) not in (3, 4):
            raise ValueError
    except ValueError:
        raise ValueError(f"CAPSBENCH_ROUTING_TILES={spec!r}: expected 'BB,BK,warps[,stages]', "
                         "e.g. '16,64,4,2'") from None
    bb, bk, warps = vals[:3]
    stages = vals[3] if len(vals) == 4 else DEFAULT_TILES[3]
    for name, n, low in (("BB", bb, 16), ("BK", bk, 16), ("warps", warps, 1)):
        if n < low or n & (n - 1):
            raise ValueError(f"CAPSBENCH_ROUTING_TILES={spec!r}: {name} must be a power of two >= {low}")
    if stages < 1:
        raise ValueError(f"CAPSBENCH_ROUTING_TILES={spec!r}: stages must be >= 1")
    return bb, bk, warps, stages


def _p2(n: int) -> int:
    return 1 << (n - 1).bit_length()


if triton is not None:
    # Layout: u is a (B, NI*K8) matrix and W a (NI*K8, J*D) one; column c of u (row c of W)
    # is input capsule i = c // K8, component k = c % K8. A program takes BK such columns.
    # Every contraction is a tl.dot: in float32 with input_precision "tf32x3" (three TF32
    # tensor-core products, float32 accuracy), in float64 "ieee".

    @triton.jit
    def _agree_kernel(u_ptr, w_ptr, x_ptr, out_ptr, B, NI, J,
                      K8: tl.constexpr, KP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                      BB: tl.constexpr, BK: tl.constexpr, BI: tl.constexpr, PREC: tl.constexpr):
        # Columns are laid out as (BI capsules) x (KP >= K8 components) so the sum over k is a reshape.
        offs_b = tl.program_id(0) * BB + tl.arange(0, BB)
        i = tl.program_id(1) * BI + tl.arange(0, BK) // KP
        k = tl.arange(0, BK) % KP
        col = i * K8 + k
        mcol = (i < NI) & (k < K8)
        d = tl.arange(0, DP)
        mb = offs_b < B
        JD = J * D
        u = tl.load(u_ptr + offs_b[:, None] * (NI * K8) + col[None, :], mask=mb[:, None] & mcol[None, :], other=0.0)
        offs_i = tl.program_id(1) * BI + tl.arange(0, BI)
        for j in range(0, J):
            x = tl.load(x_ptr + offs_b[:, None] * JD + j * D + d[None, :], mask=mb[:, None] & (d[None, :] < D),
                        other=0.0)  # (BB, DP)
            wt = tl.load(w_ptr + col[None, :] * JD + j * D + d[:, None], mask=mcol[None, :] & (d[:, None] < D),
                         other=0.0)  # (DP, BK), loaded transposed
            y = tl.dot(x, wt, input_precision=PREC)  # (BB, BK): (W_ij^T x_j)[k] per column
            a = tl.sum(tl.reshape(y * u, (BB, BI, KP)), axis=2)  # (BB, BI)
            tl.store(out_ptr + offs_b[:, None] * (J * NI) + j * NI + offs_i[None, :], a,
                     mask=mb[:, None] & (offs_i[None, :] < NI))

    @triton.jit
    def _wsum_kernel(u_ptr, w_ptr, c_ptr, out_ptr, B, NI, J,
                     UNIFORM: tl.constexpr, K8: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                     BB: tl.constexpr, BK: tl.constexpr, TILES: tl.constexpr, PREC: tl.constexpr):
        pid_c = tl.program_id(1)
        j = tl.program_id(2)
        offs_b = tl.program_id(0) * BB + tl.arange(0, BB)
        mb = offs_b < B
        d = tl.arange(0, DP)
        JD = J * D
        acc = tl.zeros((BB, DP), dtype=w_ptr.dtype.element_ty)
        for t in range(0, TILES):
            col = (pid_c * TILES + t) * BK + tl.arange(0, BK)
            mcol = col < NI * K8
            m = mb[:, None] & mcol[None, :]
            z = tl.load(u_ptr + offs_b[:, None] * (NI * K8) + col[None, :], mask=m, other=0.0)  # (BB, BK)
            if not UNIFORM:
                z = z * tl.load(c_ptr + offs_b[:, None] * (J * NI) + j * NI + (col // K8)[None, :], mask=m,
                                other=0.0)
            w = tl.load(w_ptr + col[:, None] * JD + j * D + d[None, :], mask=mcol[:, None] & (d[None, :] < D),
                        other=0.0)  # (BK, DP)
            acc = tl.dot(z, w, acc, input_precision=PREC)
        if UNIFORM:  # divide by the integer J: a float argument would arrive as float32
            acc = acc / J
        tl.store(out_ptr + pid_c * (B * JD) + offs_b[:, None] * JD + j * D + d[None, :], acc,
                 mask=mb[:, None] & (d[None, :] < D))

    @triton.jit
    def _grad_u_kernel(alpha_ptr, beta_ptr, w_ptr, out_ptr, B, NI, J,
                       T: tl.constexpr, K8: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                       BB: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
        # d u[b, c] = sum_j sum_t alpha_t[b, j, i(c)] (beta_t[b, j, :] . W[c, j, :])
        offs_b = tl.program_id(0) * BB + tl.arange(0, BB)
        col = tl.program_id(1) * BK + tl.arange(0, BK)
        mb = offs_b < B
        mcol = col < NI * K8
        m = mb[:, None] & mcol[None, :]
        d = tl.arange(0, DP)
        JD = J * D
        acc = tl.zeros((BB, BK), dtype=w_ptr.dtype.element_ty)
        for j in range(0, J):
            wt = tl.load(w_ptr + col[None, :] * JD + j * D + d[:, None], mask=mcol[None, :] & (d[:, None] < D),
                         other=0.0)  # (DP, BK), loaded transposed
            for t in range(0, T):
                bt = tl.load(beta_ptr + t * (B * JD) + offs_b[:, None] * JD + j * D + d[None, :],
                             mask=mb[:, None] & (d[None, :] < D), other=0.0)  # (BB, DP)
                a = tl.load(alpha_ptr + t * (B * J * NI) + offs_b[:, None] * (J * NI) + j * NI + (col // K8)[None, :],
                            mask=m, other=0.0)  # (BB, BK)
                acc += a * tl.dot(bt, wt, input_precision=PREC)
        tl.store(out_ptr + offs_b[:, None] * (NI * K8) + col[None, :], acc, mask=m)

    @triton.jit
    def _grad_w_kernel(alpha_ptr, beta_ptr, u_ptr, out_ptr, B, NI, J,
                       T: tl.constexpr, K8: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                       BB: tl.constexpr, BK: tl.constexpr, BTILES: tl.constexpr, PREC: tl.constexpr):
        # d W[c, j, :] = sum_b u[b, c] sum_t alpha_t[b, j, i(c)] beta_t[b, j, :], over the
        # BTILES batch tiles of split program_id(2); out holds one partial sum per split.
        col = tl.program_id(0) * BK + tl.arange(0, BK)
        j = tl.program_id(1)
        split = tl.program_id(2)
        mcol = col < NI * K8
        d = tl.arange(0, DP)
        JD = J * D
        acc = tl.zeros((DP, BK), dtype=u_ptr.dtype.element_ty)  # transposed: (d, column)
        for bt_i in range(0, BTILES):
            offs_b = (split * BTILES + bt_i) * BB + tl.arange(0, BB)
            mb = offs_b < B
            m = mb[:, None] & mcol[None, :]
            u = tl.load(u_ptr + offs_b[:, None] * (NI * K8) + col[None, :], mask=m, other=0.0)  # (BB, BK)
            for t in range(0, T):
                a = tl.load(alpha_ptr + t * (B * J * NI) + offs_b[:, None] * (J * NI) + j * NI + (col // K8)[None, :],
                            mask=m, other=0.0)
                btt = tl.load(beta_ptr + t * (B * JD) + offs_b[None, :] * JD + j * D + d[:, None],
                              mask=mb[None, :] & (d[:, None] < D), other=0.0)  # (DP, BB), loaded transposed
                acc = tl.dot(btt, u * a, acc, input_precision=PREC)
        tl.store(out_ptr + split * (NI * K8 * JD) + col[None, :] * JD + j * D + d[:, None], acc,
                 mask=mcol[None, :] & (d[:, None] < D))


def routing_shapes(u: torch.Tensor, W: torch.Tensor, n_out: int) -> tuple[int, int, int, int, int]:
    """(B, n_in, d_in, n_out, d_out) of capsules ``u`` (B, n_in, d_in) and ``W`` (n_in, d_in, n_out*d_out);
    shared with the CPU kernels (cpu_routing.py)."""
    B, NI, K8 = u.shape
    if W.shape[0] != NI or W.shape[1] != K8 or W.shape[2] % n_out:
        raise ValueError(f"W of shape {tuple(W.shape)} does not fit u of shape {tuple(u.shape)} "
                         f"and {n_out} output capsules")
    return B, NI, K8, n_out, W.shape[2] // n_out


class _Shapes:
    def __init__(self, u: torch.Tensor, W: torch.Tensor, n_out: int):
        self.B, self.NI, self.K8, self.J, self.D = routing_shapes(u, W, n_out)
        self.KP, self.DP = _p2(self.K8), max(16, _p2(self.D))  # tl.dot needs every side >= 16
        self.BB, self.BK, self.warps, self.stages = _tiles()
        self.BK = max(self.BK, self.KP)
        self.prec = "tf32x3" if u.dtype == torch.float32 else "ieee"

    def consts(self) -> dict:
        return dict(K8=self.K8, D=self.D, DP=self.DP, BB=self.BB, BK=self.BK, PREC=self.prec,
                    num_warps=self.warps, num_stages=self.stages)


def _agree(u, W, x, sh: _Shapes) -> torch.Tensor:
    """A[b, j, i] = u_hat[b, j, i, :] . x[b, j, :]."""
    out = u.new_empty(sh.B, sh.J, sh.NI)
    bi = sh.BK // sh.KP
    grid = (triton.cdiv(sh.B, sh.BB), triton.cdiv(sh.NI, bi))
    _agree_kernel[grid](u, W, x.contiguous(), out, sh.B, sh.NI, sh.J, KP=sh.KP, BI=bi, **sh.consts())
    return out


def _wsum(u, W, c, sh: _Shapes) -> torch.Tensor:
    """S[b, j, :] = sum_i c[b, j, i] u_hat[b, j, i, :]; ``c=None``: uniform 1 / J."""
    per = sh.BK * WSUM_TILES_PER_PROGRAM
    n = triton.cdiv(sh.NI * sh.K8, per)
    part = u.new_empty(n, sh.B, sh.J, sh.D)
    grid = (triton.cdiv(sh.B, sh.BB), n, sh.J)
    _wsum_kernel[grid](u, W, u if c is None else c.contiguous(), part, sh.B, sh.NI, sh.J,
                       UNIFORM=c is None, TILES=WSUM_TILES_PER_PROGRAM, **sh.consts())
    return part[0] if n == 1 else part.sum(dim=0)


def _contractions(u, W, sh: _Shapes):
    """wsum and agree of routing.route_passes, as kernels."""
    return (lambda c: _wsum(u, W, c, sh)), (lambda x: _agree(u, W, x, sh))


def _grads(u, W, alpha, beta, sh: _Shapes) -> tuple[torch.Tensor, torch.Tensor]:
    T = alpha.shape[0]
    gu = torch.empty_like(u)
    n_cols = triton.cdiv(sh.NI * sh.K8, sh.BK)
    n_btiles = triton.cdiv(sh.B, sh.BB)
    _grad_u_kernel[(n_btiles, n_cols)](alpha, beta, W, gu, sh.B, sh.NI, sh.J, T=T, **sh.consts())
    # the W gradient sums over the batch: split it so that there are enough programs
    splits = max(1, min(n_btiles, GRAD_W_PROGRAMS // (n_cols * sh.J)))
    per = triton.cdiv(n_btiles, splits)
    splits = triton.cdiv(n_btiles, per)
    gw = W.new_empty((splits,) + tuple(W.shape))
    _grad_w_kernel[(n_cols, sh.J, splits)](alpha, beta, u, gw, sh.B, sh.NI, sh.J, T=T, BTILES=per, **sh.consts())
    return gu, (gw[0] if splits == 1 else gw.sum(dim=0))


class _FusedRouting(torch.autograd.Function):
    # routing.route_passes / route_backward_terms with every contraction against u_hat done
    # by a kernel that recomputes u_hat.
    @staticmethod
    def forward(ctx, u: torch.Tensor, W: torch.Tensor, n_out: int, iterations: int):
        from capsbench.models.routing import route_passes

        u, W = u.contiguous(), W.contiguous()
        sh = _Shapes(u, W, n_out)
        v, ss, vs, cs = route_passes(*_contractions(u, W, sh), iterations)
        ctx.iterations, ctx.sh = iterations, sh
        ctx.save_for_backward(u, W, *ss, *vs, *cs[1:])
        c_last = cs[-1] if cs[-1] is not None else u.new_full((sh.B, sh.J, sh.NI), 1.0 / sh.J)
        ctx.mark_non_differentiable(c_last)
        return v, c_last

    @staticmethod
    def backward(ctx, grad_v: torch.Tensor, _grad_c):
        from capsbench.models.routing import route_backward_terms

        r, sh = ctx.iterations, ctx.sh
        saved = ctx.saved_tensors
        u, W = saved[0], saved[1]
        ss = saved[2 : 2 + r]
        vs = saved[2 + r : 2 + 2 * r]
        cs = (None,) + tuple(saved[2 + 2 * r :])
        uniform = u.new_full((sh.B, sh.J, sh.NI), 1.0 / sh.J)
        alphas, betas = route_backward_terms(grad_v, ss, vs, cs, *_contractions(u, W, sh), uniform)
        alpha = torch.stack(alphas).contiguous()  # (T, B, J, NI)
        beta = torch.stack([b.contiguous() for b in betas]).contiguous()  # (T, B, J, D)
        gu, gw = _grads(u, W, alpha, beta, sh)
        return gu, gw, None, None


@torch.compiler.disable  # Dynamo does not trace into the kernels: a graph break, same result
def fused_routing(
    u: torch.Tensor, W: torch.Tensor, n_out: int, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing of primary capsules ``u`` (B, n_in, d_in) through ``W`` (n_in, d_in, n_out*d_out).

    Returns v (B, n_out, d_out) and the last coupling coefficients (B, n_out, n_in), as
    :func:`capsbench.models.capsnet.dynamic_routing` does for u_hat = W^T u.
    """
    if triton is None:
        raise RuntimeError("fused routing needs Triton (it ships with CUDA builds of PyTorch); "
                           "use the plain routing (CapsNet(routing_kernel='torch')) instead")
    if iterations < 1:
        raise ValueError(f"routing iterations must be >= 1, got {iterations}")
    if u.dtype != W.dtype:
        raise ValueError(f"u ({u.dtype}) and W ({W.dtype}) must have the same dtype")
    return _FusedRouting.apply(u, W, n_out, iterations)
