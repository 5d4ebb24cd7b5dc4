"""Dynamic routing fused with the DigitCaps predictions, for CUDA (Triton kernels).

The plain path (:func:`capsbench.models.capsnet.dynamic_routing`) writes
u_hat_{j|i} = W_ij u_i once (B x 10 x 1152 x 16 floats, 737 kB per image) and reads it
back in every routing pass, forward and backward. On a GPU that traffic, not arithmetic,
is what routing costs once the convolutions run in bf16 (reports/gpu-h100). Here u_hat is
never stored: each kernel reads the 8-D primary capsules u (37 kB per image) and W and
recomputes its tile of u_hat in registers (2.9 MFLOP per image per pass, cheap on a GPU).

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

# Tile sizes: a program holds a (BB images, BI input capsules, d_out) tile of u_hat in
# registers and loops over the output capsules j, run by `warps` warps. Chosen on an H100
# (reports/gpu-h100); CAPSBENCH_ROUTING_TILES="BB,BI,warps" overrides them (powers of two).
DEFAULT_TILES = (16, 16, 4)
# wsum programs cover WSUM_TILES_PER_PROGRAM consecutive BI-tiles and write one partial sum each.
WSUM_TILES_PER_PROGRAM = 4


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(t: torch.Tensor) -> bool:
    """Whether the fused kernels can run on ``t``'s device."""
    if triton is None:
        return False
    return t.is_cuda or (_interpreting() and t.device.type == "cpu")


def _tiles() -> tuple[int, int, int]:
    spec = os.environ.get("CAPSBENCH_ROUTING_TILES")
    if not spec:
        return DEFAULT_TILES
    try:
        bb, bi, warps = (int(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"CAPSBENCH_ROUTING_TILES={spec!r}: expected three integers 'BB,BI,warps', "
                         "e.g. '16,16,4'") from None
    for name, n in (("BB", bb), ("BI", bi), ("warps", warps)):
        if n < 1 or n & (n - 1):
            raise ValueError(f"CAPSBENCH_ROUTING_TILES={spec!r}: {name} must be a power of two")
    return bb, bi, warps


def _p2(n: int) -> int:
    return 1 << (n - 1).bit_length()


if triton is not None:

    @triton.jit
    def _uhat_tile(u_ptr, w_ptr, offs_b, offs_i, j, B, NI, JD,
                   K8: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BB: tl.constexpr, BI: tl.constexpr):
        """(BB, BI, DP) tile of u_hat[b, j, i, :] = W[i, :, j*D:(j+1)*D]^T u[b, i, :]."""
        d = tl.arange(0, DP)
        mu = (offs_b[:, None] < B) & (offs_i[None, :] < NI)
        mw = (offs_i[:, None] < NI) & (d[None, :] < D)
        uh = tl.zeros((BB, BI, DP), dtype=w_ptr.dtype.element_ty)
        for k in tl.static_range(K8):  # K8 outer products: element-wise FMAs, no reduction
            uk = tl.load(u_ptr + offs_b[:, None] * (NI * K8) + offs_i[None, :] * K8 + k, mask=mu, other=0.0)
            wk = tl.load(w_ptr + offs_i[:, None] * (K8 * JD) + k * JD + j * D + d[None, :], mask=mw, other=0.0)
            uh += uk[:, :, None] * wk[None, :, :]
        return uh

    @triton.jit
    def _h_tile(alpha_ptr, beta_ptr, offs_b, offs_i, j, B, NI, J,
                T: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
        """(BB, BI, DP) tile of H[b, j, i, :] = sum_t alpha[t, b, j, i] beta[t, b, j, :]."""
        d = tl.arange(0, DP)
        ma = (offs_b[:, None] < B) & (offs_i[None, :] < NI)
        mb = (offs_b[:, None] < B) & (d[None, :] < D)
        a = tl.load(alpha_ptr + offs_b[:, None] * (J * NI) + j * NI + offs_i[None, :], mask=ma, other=0.0)
        bt = tl.load(beta_ptr + offs_b[:, None] * (J * D) + j * D + d[None, :], mask=mb, other=0.0)
        h = a[:, :, None] * bt[:, None, :]
        for t in tl.static_range(1, T):
            a = tl.load(alpha_ptr + t * (B * J * NI) + offs_b[:, None] * (J * NI) + j * NI + offs_i[None, :],
                        mask=ma, other=0.0)
            bt = tl.load(beta_ptr + t * (B * J * D) + offs_b[:, None] * (J * D) + j * D + d[None, :],
                         mask=mb, other=0.0)
            h += a[:, :, None] * bt[:, None, :]
        return h

    @triton.jit
    def _agree_kernel(u_ptr, w_ptr, x_ptr, out_ptr, B, NI, J,
                      K8: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BB: tl.constexpr, BI: tl.constexpr):
        offs_b = tl.program_id(0) * BB + tl.arange(0, BB)
        offs_i = tl.program_id(1) * BI + tl.arange(0, BI)
        d = tl.arange(0, DP)
        mx = (offs_b[:, None] < B) & (d[None, :] < D)
        mo = (offs_b[:, None] < B) & (offs_i[None, :] < NI)
        for j in range(0, J):
            uh = _uhat_tile(u_ptr, w_ptr, offs_b, offs_i, j, B, NI, J * D, K8, D, DP, BB, BI)
            x = tl.load(x_ptr + offs_b[:, None] * (J * D) + j * D + d[None, :], mask=mx, other=0.0)  # (BB, DP)
            a = tl.sum(uh * x[:, None, :], axis=2)  # (BB, BI)
            tl.store(out_ptr + offs_b[:, None] * (J * NI) + j * NI + offs_i[None, :], a, mask=mo)

    @triton.jit
    def _wsum_kernel(u_ptr, w_ptr, c_ptr, out_ptr, B, NI, J, scale,
                     UNIFORM: tl.constexpr, K8: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                     BB: tl.constexpr, BI: tl.constexpr, TILES: tl.constexpr):
        pid_i = tl.program_id(1)
        offs_b = tl.program_id(0) * BB + tl.arange(0, BB)
        d = tl.arange(0, DP)
        for j in range(0, J):
            s = tl.zeros((BB, DP), dtype=w_ptr.dtype.element_ty)
            for tile in range(0, TILES):
                offs_i = (pid_i * TILES + tile) * BI + tl.arange(0, BI)
                uh = _uhat_tile(u_ptr, w_ptr, offs_b, offs_i, j, B, NI, J * D, K8, D, DP, BB, BI)
                if UNIFORM:
                    s += tl.sum(uh, axis=1)
                else:
                    c = tl.load(c_ptr + offs_b[:, None] * (J * NI) + j * NI + offs_i[None, :],
                                mask=(offs_b[:, None] < B) & (offs_i[None, :] < NI), other=0.0)
                    s += tl.sum(uh * c[:, :, None], axis=1)
            if UNIFORM:
                s = s * scale
            tl.store(out_ptr + pid_i * (B * J * D) + offs_b[:, None] * (J * D) + j * D + d[None, :], s,
                     mask=(offs_b[:, None] < B) & (d[None, :] < D))

    @triton.jit
    def _grad_u_kernel(alpha_ptr, beta_ptr, w_ptr, out_ptr, B, NI, J,
                       T: tl.constexpr, K8: tl.constexpr, D: tl.constexpr, KP: tl.constexpr,
                       DP: tl.constexpr, BB: tl.constexpr, BI: tl.constexpr):
        offs_b = tl.program_id(0) * BB + tl.arange(0, BB)
        offs_i = tl.program_id(1) * BI + tl.arange(0, BI)
        kk = tl.arange(0, KP)
        d = tl.arange(0, DP)
        JD = J * D
        mw = (offs_i[:, None] < NI) & (d[None, :] < D)
        acc = tl.zeros((BB, BI, KP), dtype=w_ptr.dtype.element_ty)
        for j in range(0, J):
            h = _h_tile(alpha_ptr, beta_ptr, offs_b, offs_i, j, B, NI, J, T, D, DP)  # (BB, BI, DP)
            for k in tl.static_range(K8):
                wk = tl.load(w_ptr + offs_i[:, None] * (K8 * JD) + k * JD + j * D + d[None, :], mask=mw, other=0.0)
                g = tl.sum(h * wk[None, :, :], axis=2)  # (BB, BI): d u[b, i, k] from output j
                acc = tl.where(kk[None, None, :] == k, acc + g[:, :, None], acc)
        tl.store(out_ptr + offs_b[:, None, None] * (NI * K8) + offs_i[None, :, None] * K8 + kk[None, None, :], acc,
                 mask=(offs_b[:, None, None] < B) & (offs_i[None, :, None] < NI) & (kk[None, None, :] < K8))

    @triton.jit
    def _grad_w_kernel(alpha_ptr, beta_ptr, u_ptr, out_ptr, B, NI, J,
                       T: tl.constexpr, K8: tl.constexpr, D: tl.constexpr, KP: tl.constexpr,
                       DP: tl.constexpr, BB: tl.constexpr, BI: tl.constexpr):
        offs_i = tl.program_id(0) * BI + tl.arange(0, BI)
        j = tl.program_id(1)
        kk = tl.arange(0, KP)
        d = tl.arange(0, DP)
        acc = tl.zeros((BI, KP, DP), dtype=u_ptr.dtype.element_ty)
        for b0 in range(0, B, BB):
            offs_b = b0 + tl.arange(0, BB)
            h = _h_tile(alpha_ptr, beta_ptr, offs_b, offs_i, j, B, NI, J, T, D, DP)  # (BB, BI, DP)
            mu = (offs_b[:, None] < B) & (offs_i[None, :] < NI)
            for k in tl.static_range(K8):
                uk = tl.load(u_ptr + offs_b[:, None] * (NI * K8) + offs_i[None, :] * K8 + k, mask=mu, other=0.0)
                g = tl.sum(uk[:, :, None] * h, axis=0)  # (BI, DP): d W[i, k, j, :] from these images
                acc = tl.where(kk[None, :, None] == k, acc + g[:, None, :], acc)
        JD = J * D
        tl.store(out_ptr + offs_i[:, None, None] * (K8 * JD) + kk[None, :, None] * JD + j * D + d[None, None, :],
                 acc, mask=(offs_i[:, None, None] < NI) & (kk[None, :, None] < K8) & (d[None, None, :] < D))


class _Shapes:
    def __init__(self, u: torch.Tensor, W: torch.Tensor, n_out: int):
        self.B, self.NI, self.K8 = u.shape
        self.J = n_out
        if W.shape[0] != self.NI or W.shape[1] != self.K8 or W.shape[2] % n_out:
            raise ValueError(f"W of shape {tuple(W.shape)} does not fit u of shape {tuple(u.shape)} "
                             f"and {n_out} output capsules")
        self.D = W.shape[2] // n_out
        self.KP, self.DP = _p2(self.K8), _p2(self.D)
        self.BB, self.BI, self.warps = _tiles()

    def consts(self, kp: bool = False) -> dict:
        out = dict(K8=self.K8, D=self.D, DP=self.DP, BB=self.BB, BI=self.BI, num_warps=self.warps)
        if kp:
            out["KP"] = self.KP
        return out


def _agree(u, W, x, sh: _Shapes) -> torch.Tensor:
    """A[b, j, i] = u_hat[b, j, i, :] . x[b, j, :]."""
    out = u.new_empty(sh.B, sh.J, sh.NI)
    grid = (triton.cdiv(sh.B, sh.BB), triton.cdiv(sh.NI, sh.BI))
    _agree_kernel[grid](u, W, x.contiguous(), out, sh.B, sh.NI, sh.J, **sh.consts())
    return out


def _wsum(u, W, c, sh: _Shapes) -> torch.Tensor:
    """S[b, j, :] = sum_i c[b, j, i] u_hat[b, j, i, :]; ``c=None``: uniform 1 / J."""
    per = sh.BI * WSUM_TILES_PER_PROGRAM
    n = triton.cdiv(sh.NI, per)
    part = u.new_empty(n, sh.B, sh.J, sh.D)
    grid = (triton.cdiv(sh.B, sh.BB), n)
    _wsum_kernel[grid](u, W, u if c is None else c.contiguous(), part, sh.B, sh.NI, sh.J, 1.0 / sh.J,
                       UNIFORM=c is None, TILES=WSUM_TILES_PER_PROGRAM, **sh.consts())
    return part[0] if n == 1 else part.sum(dim=0)


def _grads(u, W, alpha, beta, sh: _Shapes) -> tuple[torch.Tensor, torch.Tensor]:
    T = alpha.shape[0]
    gu = torch.empty_like(u)
    gw = torch.empty_like(W)
    grid = (triton.cdiv(sh.B, sh.BB), triton.cdiv(sh.NI, sh.BI))
    _grad_u_kernel[grid](alpha, beta, W, gu, sh.B, sh.NI, sh.J, T=T, **sh.consts(kp=True))
    grid = (triton.cdiv(sh.NI, sh.BI), sh.J)
    _grad_w_kernel[grid](alpha, beta, u, gw, sh.B, sh.NI, sh.J, T=T, **sh.consts(kp=True))
    return gu, gw


class _FusedRouting(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, W: torch.Tensor, n_out: int, iterations: int):
        from capsbench.models.capsnet import squash

        u, W = u.contiguous(), W.contiguous()
        sh = _Shapes(u, W, n_out)
        s = _wsum(u, W, None, sh)  # iteration 0: every coupling is 1 / J
        v = squash(s)
        ss, vs, cs = [s], [v], [None]
        b = None
        for _ in range(1, iterations):
            agree = _agree(u, W, v, sh)  # (B, J, NI)
            b = agree if b is None else b + agree
            c = b.softmax(dim=1)
            s = _wsum(u, W, c, sh)
            v = squash(s)
            ss.append(s)
            vs.append(v)
            cs.append(c)
        ctx.iterations, ctx.sh = iterations, sh
        ctx.save_for_backward(u, W, *ss, *vs, *cs[1:])
        c_last = cs[-1] if cs[-1] is not None else u.new_full((sh.B, sh.J, sh.NI), 1.0 / sh.J)
        ctx.mark_non_differentiable(c_last)
        return v, c_last

    @staticmethod
    def backward(ctx, grad_v: torch.Tensor, _grad_c):
        # The same recursion as capsnet._DynamicRouting.backward, with every contraction
        # against u_hat done by a kernel that recomputes u_hat.
        from capsbench.models.capsnet import squash

        r, sh = ctx.iterations, ctx.sh
        saved = ctx.saved_tensors
        u, W = saved[0], saved[1]
        ss = saved[2 : 2 + r]
        vs = saved[2 + r : 2 + 2 * r]
        cs = (None,) + tuple(saved[2 + 2 * r :])
        alphas, betas = [], []  # d loss / d u_hat = sum_t alphas[t] (B,J,NI) (x) betas[t] (B,J,D)
        g_b = None
        for t in range(r - 1, -1, -1):
            if t == r - 1:
                g_v = grad_v
            else:
                g_v = _wsum(u, W, g_b, sh)
                alphas.append(g_b)
                betas.append(vs[t])
            with torch.enable_grad():
                s_t = ss[t].detach().requires_grad_()
                (g_s,) = torch.autograd.grad(squash(s_t), s_t, g_v)
            if t == 0:
                alphas.append(u.new_full((sh.B, sh.J, sh.NI), 1.0 / sh.J))
                betas.append(g_s)
                break
            c = cs[t]
            alphas.append(c)
            betas.append(g_s)
            g_c = _agree(u, W, g_s, sh)  # (B, J, NI)
            g_soft = c * (g_c - (g_c * c).sum(dim=1, keepdim=True))
            g_b = g_soft if g_b is None else g_b + g_soft
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
