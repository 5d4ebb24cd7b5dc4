"""The routing maths of CapsNet (Sabour et al. 2017, Procedure 1 and eq. 1), given the two
contractions with the prediction vectors u_hat that every implementation supplies: the plain
one (models/capsnet.py) over a stored u_hat, the fused kernels (models/kernels/) that recompute
it. One definition, so that every path routes the same way."""

from __future__ import annotations

import torch

SQUASH_EPS = 1e-7


def squash(s: torch.Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> torch.Tensor:
    """Paper eq. 1: shrink short vectors towards 0 and long ones to just below unit length.

    Example:
        >>> squash(torch.zeros(2, 16)).abs().sum().item()
        0.0
    """
    sq = (s * s).sum(dim=dim, keepdim=True)
    # sq / (1 + sq) / sqrt(sq + eps) as one factor: one broadcast multiply over s.
    return s * (sq / ((1.0 + sq) * torch.sqrt(sq + eps)))


def route_passes(wsum, agree, iterations: int):
    """Forward recursion of routing, given its two contractions with u_hat (B, J, n_in, D).

    ``wsum(c)``: sum_i c[b, j, i] u_hat[b, j, i, :] -> (B, J, D), with c = None for the uniform
    couplings 1/J; ``agree(x)``: u_hat[b, j, i, :] . x[b, j, :] -> (B, J, n_in). The plain path
    passes batched matmuls over a stored u_hat, the fused one kernels that recompute it.
    Returns v and what :func:`route_backward_terms` needs (every s, v and coupling c).
    """
    s = wsum(None)  # iteration 0: b = 0, so every coupling is 1/J
    v = squash(s)
    ss, vs, cs = [s], [v], [None]
    b = None
    for _ in range(1, iterations):
        a = agree(v)  # (B, J, n_in)
        b = a if b is None else b + a
        c = b.softmax(dim=1)  # over the outputs j: each input's couplings sum to 1
        s = wsum(c)
        v = squash(s)
        ss.append(s)
        vs.append(v)
        cs.append(c)
    return v, ss, vs, cs


def route_backward_terms(grad_v, ss, vs, cs, wsum, agree, uniform: torch.Tensor):
    """Backward of :func:`route_passes`: d loss / d u_hat = sum_t alphas[t] (x) betas[t].

    alphas[t] (B, J, n_in) and betas[t] (B, J, D), 2r - 1 terms; ``uniform`` is the (B, J, n_in)
    tensor of 1/J (the first iteration's couplings). The small per-iteration tensors (squash,
    softmax) are differentiated exactly; the contractions with u_hat go through wsum / agree.
    """
    r = len(ss)
    alphas, betas = [], []
    g_b = None  # gradient w.r.t. b_{t+1} (equal to that w.r.t. the agreement a_t)
    for t in range(r - 1, -1, -1):
        if t == r - 1:
            g_v = grad_v
        else:
            g_v = wsum(g_b)  # (B, J, D)
            alphas.append(g_b)
            betas.append(vs[t])
        with torch.enable_grad():
            s_t = ss[t].detach().requires_grad_()
            (g_s,) = torch.autograd.grad(squash(s_t), s_t, g_v)
        if t == 0:
            alphas.append(uniform)
            betas.append(g_s)
            break
        c = cs[t]
        alphas.append(c)
        betas.append(g_s)
        g_c = agree(g_s)  # (B, J, n_in)
        g_soft = c * (g_c - (g_c * c).sum(dim=1, keepdim=True))  # softmax over J
        g_b = g_soft if g_b is None else g_b + g_soft
    return alphas, betas
