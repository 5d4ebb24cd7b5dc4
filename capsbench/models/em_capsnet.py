"""Matrix capsules with EM routing (Hinton, Sabour & Frosst 2018, "Matrix Capsules with EM
Routing", ICLR; openreview.net/forum?id=HJWLfGWRb): the paper's smallNORB network in its
smaller configuration (A=64, B=8, C=D=16), adapted to MNIST's 28x28 digits.

    x (B, 1, 28, 28)
    ReLU Conv1   A=64 kernels 5x5, stride 2, padding 2, ReLU     -> (B, 64, 14, 14)
    PrimaryCaps  B=8 capsule types, 1x1: a 4x4 pose (16 linear
                 units) and a logistic activation each          -> 14x14x8 capsules
    ConvCaps1    C=16 types, K=3, stride 2, EM routing          -> 6x6x16
    ConvCaps2    D=16 types, K=3, stride 1, EM routing          -> 4x4x16
    Class caps   10 types, one 4x4 transformation per (type, class) shared over positions, with
                 coordinate addition, EM routing                -> 10 poses and activations

The class scores are the class capsules' activations (in (0, 1)); the loss is the paper's spread
loss. The adaptation to 28x28 is the padding of Conv1 only: unpadded, Conv1 turns the paper's 32x32
crops of smallNORB into a 14x14 map (the paper gives no padding; Gritzman's implementation pads
to 16x16), and 2 pixels of padding give a 28x28 digit the same 14x14 map, so every later layer has
the unpadded sizes (14 -> 6 -> 4).

EM routing (the paper's Procedure 1), for the votes V_ij of every child capsule i for every parent
j it connects to, with the children's activations a_i:

* R_ij starts at 1 / (the number of parents of i); then, for each of the iterations,
* M-step, for each parent j: R_ij <- R_ij a_i; mu_j = sum_i R_ij V_ij / sum_i R_ij;
  sigma_j^2 = sum_i R_ij (V_ij - mu_j)^2 / sum_i R_ij (per pose entry h);
  cost_j^h = (beta_u + log sigma_j^h) sum_i R_ij; a_j = logistic(lambda (beta_a - sum_h cost_j^h));
* E-step, for each child i (skipped after the last M-step, whose R nobody reads):
  p_ij = N(V_ij; mu_j, sigma_j^2) (diagonal), R_ij = a_j p_ij / sum_k a_k p_ik over *all* parents k
  of i: in a convolutional capsule layer a child belongs to up to K x K patches, and parents at
  different positions compete for it (Gritzman 2019, "Avoiding Implementation Pitfalls of Matrix
  Capsules with EM Routing", arXiv:1907.00652, pitfall 3; many re-implementations normalise within
  each patch only).

Choices the paper leaves open, and what we do (with their source):

* Routing iterations: 2, not the paper's 3 (its Table 1: 2.2% smallNORB test error at 2, 1.8% at
  3). In the quick profile 3 did not learn: 300 steps stayed at chance on validation (12-15% at
  Adam rates 1e-3 and 3e-3), and in 120 steps on training digits (seed 0, rates 3e-3 and 1e-2) the
  batch accuracy stayed at 9-21% where 2 iterations reached 61-70%. Both public re-implementations
  that report it found 2 better than 3: 99.1% vs 97.5% on MNIST (github.com/yl-1993/
  Matrix-Capsules-EM-PyTorch), 95.4% vs 93.7% on smallNORB (Gritzman's). ``routing_iters=3``
  builds the paper's.
* Inverse temperature lambda: the paper fixes a schedule without giving it; here lambda = 0.01
  (1 - 0.95^t) at iteration t = 1..3 (0.0005, 0.00098, 0.0014), the authors' answer on OpenReview as
  quoted in Gritzman's implementation (github.com/IBM/matrix-capsules-with-em-routing, em_routing.py).
* beta_u and beta_a: learned, one pair per parent capsule type of each layer, shared over
  positions (as in Gritzman's implementation).
* The amount of data a parent gets, sum_i R_ij, is multiplied by 100 J / N in the cost (N the
  children in the parent's patch, K x K x input types; J the parent types), as in Gritzman's
  implementation (his pitfall 2): 100 for a parent that gets an even share of fully active
  children, whatever the layer's fan-in, so that one lambda suits every layer. sigma^2 gets 1e-4
  added, so that a parent with a single child (his pitfall 1) has a finite log.
* Coordinate addition: the class layer adds the centre of each child's position on the 4x4 grid,
  (row + 0.5) / 4 and (column + 0.5) / 4, to the first two entries of the right-hand column of its
  votes (entries 3 and 7 of the row-major 4x4 pose).
* Spread loss, L = sum_{i != t} max(0, m - (a_t - a_i))^2, averaged over the batch, with the margin
  m rising linearly from 0.2 to 0.9 over the first half of the training budget (the paper: "start
  with a small margin of 0.2 and linearly increase it during training to 0.9"; the trainer tells
  the model its budget through ``set_training_steps``).
* Initialisation: the transformation matrices normal with standard deviation 2, beta_u and
  beta_a zero, the convolutions PyTorch's default. The authors' advice (quoted in Gritzman's
  implementation) is to "set the std so that at the start of training half of the capsules in
  each layer are active": on MNIST digits (64 training images, seed 0) a standard deviation of 2
  gives mean activations 0.72, 0.62 and 0.54 in ConvCaps1, ConvCaps2 and the class capsules, where
  0.5 gave 0.83, 0.76 and 0.98 (every class capsule saturated, and at lambda near 0.001 the spread
  loss could not move beta_a: with 3 iterations, 300 steps at 1e-3 stayed at chance).
* No reconstruction decoder (the paper has none).

Parameters: 68,444 at 10 classes: Conv1 1,664; PrimaryCaps 8,840; ConvCaps1 9 x 8 x 16 x 16 =
18,432 + 32 betas; ConvCaps2 9 x 16 x 16 x 16 = 36,864 + 32; class capsules 16 x 10 x 16 = 2,560 +
20 (tests/test_em_capsnet.py). The paper: "A smaller capsule network of A = 64, B = 8, C = D = 16
with only 68K trainable parameters achieves 2.2% test error rate" on smallNORB (5 classes: 67,154
here); its MNIST figure is 0.44% test error for the larger network (A = B = C = D = 32).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from capsbench.errors import ConfigError
from capsbench.models.base import Classifier, ModelOutput, mark
from capsbench.models.registry import register_model

VAR_EPS = 1e-4
W_STD = 2.0  # at initialisation about half the class capsules are active on MNIST digits (module docstring)
LOG_2PI = math.log(2.0 * math.pi)


def patch_index(h: int, w: int, k: int, stride: int) -> torch.Tensor:
    """(L, k*k) flat input positions of each k x k patch of an h x w grid, patches row-major."""
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    oy = torch.arange(ho).repeat_interleave(wo) * stride  # (L,)
    ox = torch.arange(wo).repeat(ho) * stride
    dy = torch.arange(k).repeat_interleave(k)  # (k*k,)
    dx = torch.arange(k).repeat(k)
    return (oy[:, None] + dy[None, :]) * w + (ox[:, None] + dx[None, :])


def inverse_temperatures(iters: int, final: float = 0.01) -> list[float]:
    """lambda at each routing iteration: final * (1 - 0.95^t), t = 1..iters."""
    return [final * (1.0 - 0.95 ** t) for t in range(1, iters + 1)]


class _Outer:
    """The gradient of the stacked votes, kept as a list of outer products (a, b): every use of
    the votes in routing is a product with a vector, so its gradient is a (.., 2H) x b (.., N)."""

    def __init__(self) -> None:
        self.terms: list[tuple[torch.Tensor, torch.Tensor]] = []

    def take(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The recorded products, once: the record is emptied."""
        terms, self.terms = self.terms, []
        return terms


class _StackedVotes(torch.autograd.Function):
    """The votes stacked on their squares, (..., 2H, N) from (..., H, N). Its backward turns the
    outer products that the products below recorded into the votes' gradient in one matrix product
    (instead of one votes-sized gradient per use), then adds the squares' part: g_V + 2 V g_V2."""

    @staticmethod
    def forward(ctx, votes: torch.Tensor, outer: _Outer) -> torch.Tensor:
        ctx.save_for_backward(votes)
        ctx.outer = outer
        ctx.set_materialize_grads(False)  # its own gradient is None: the products keep theirs
        return torch.cat([votes, votes.square()], dim=-2)

    @staticmethod
    def backward(ctx, _grad: torch.Tensor):
        (votes,) = ctx.saved_tensors
        terms = ctx.outer.take()
        return (_gather(terms, votes) if terms else None), None


def _gather(terms: list[tuple[torch.Tensor, torch.Tensor]], votes: torch.Tensor,
            rows: slice = slice(None)) -> torch.Tensor:
    """sum_k a_k b_k over the recorded outer products, for the images ``rows`` of the batch
    (``votes`` is those images' votes, (b, ..., H, N)): the part for V and 2 V times the part for V^2."""
    shape = votes.shape[:-2] + (2 * votes.shape[-2], votes.shape[-1])

    def piece(t: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        if t.dim() == len(size) and t.shape[0] != 1:  # one row per image (else broadcast over them)
            t = t[rows]
        return t.expand(size)

    a = torch.stack([piece(t[0], shape[:-1]) for t in terms], dim=-1)  # (..., 2H, K)
    b = torch.stack([piece(t[1], shape[:-2] + shape[-1:]) for t in terms], dim=-2)  # (..., K, N)
    h = votes.shape[-2]
    return (a[..., :h, :] @ b).addcmul_(votes, a[..., h:, :] @ b, value=2.0)


# stacked votes per piece, about 8 MB: one image of either ConvCaps layer (5.3 and 4.7 MB); 6 or 25
# images a piece were no faster (2-core AMD EPYC, 2026-12-07)
_PIECE_FLOATS = 1 << 21


class _ConvVotes(torch.autograd.Function):
    """A convolutional capsule layer's votes, stacked on their squares as :class:`_StackedVotes`
    does, (B, L, J, 32, N) from the patches' poses p (B, L, P, C, 4, 4) and the transformations
    W (P, C, J, 4, 4), with N = P * C children in patch-slot-major order. The votes are the batched
    product A (N, b L 4, 4) @ W (N, 4, J 4), made a few images at a time and written straight into
    the stacked tensor, their squares taken while that piece is still in cache; the backward
    gathers the votes' gradient and turns it back into the product's layout piece by piece too.
    No votes-sized tensor besides the stacked one is made: the einsum's layout change, the
    squares and the concatenation were three passes over all of them (docs/performance.md)."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, W: torch.Tensor, outer: _Outer) -> torch.Tensor:
        B, L, P, C = p.shape[:4]
        J, N = W.shape[2], P * C
        out = p.new_empty(B, L, J, 32, N)
        Wm = W.permute(0, 1, 3, 2, 4).reshape(N, 4, J * 4)
        for rows in _pieces(B, L * J * 32 * N):
            b = rows.stop - rows.start
            A = p[rows].permute(2, 3, 0, 1, 4, 5).reshape(N, b * L * 4, 4)
            votes = out[rows, :, :, :16]  # (b, L, J, 16, N), written as (N, b, L, 4, J, 4)
            votes.unflatten(3, (4, 4)).permute(5, 0, 1, 3, 2, 4).copy_(torch.bmm(A, Wm).view(N, b, L, 4, J, 4))
            torch.mul(votes, votes, out=out[rows, :, :, 16:])
        ctx.save_for_backward(p, Wm, out)
        ctx.outer = outer
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, _grad: torch.Tensor):
        p, Wm, stacked = ctx.saved_tensors
        terms = ctx.outer.take()
        if not terms:
            return None, None, None
        B, L, P, C = p.shape[:4]
        N, J = P * C, Wm.shape[2] // 4
        gp = torch.empty_like(p) if ctx.needs_input_grad[0] else None
        gWm = torch.zeros_like(Wm) if ctx.needs_input_grad[1] else None
        for rows in _pieces(B, L * J * 32 * N):
            b = rows.stop - rows.start
            g = _gather(terms, stacked[rows, :, :, :16], rows)  # (b, L, J, 16, N)
            gout = g.view(b, L, J, 4, 4, N).permute(5, 0, 1, 3, 2, 4).reshape(N, b * L * 4, J * 4)
            if gp is not None:
                gp[rows] = torch.bmm(gout, Wm.transpose(1, 2)).view(P, C, b, L, 4, 4).permute(2, 3, 0, 1, 4, 5)
            if gWm is not None:
                gWm.baddbmm_(p[rows].permute(2, 3, 5, 0, 1, 4).reshape(N, 4, b * L * 4), gout)
        gW = gWm.view(P, C, 4, J, 4).permute(0, 1, 3, 2, 4) if gWm is not None else None
        return gp, gW, None


def _pieces(batch: int, floats_per_image: int) -> list[slice]:
    step = max(1, _PIECE_FLOATS // floats_per_image)
    return [slice(i, min(i + step, batch)) for i in range(0, batch, step)]


class _VotesTimesVector(torch.autograd.Function):
    """(vv @ w[..., None])[..., 0] for vv (..., 2H, N) and w (..., N) (broadcast over parents)."""

    @staticmethod
    def forward(ctx, vv: torch.Tensor, w: torch.Tensor, outer: _Outer) -> torch.Tensor:
        ctx.save_for_backward(vv, w)
        ctx.outer = outer
        return (vv @ w.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        vv, w = ctx.saved_tensors
        ctx.outer.terms.append((g, w))
        gw = (g.unsqueeze(-2) @ vv).squeeze(-2)
        return None, gw.sum_to_size(w.shape), None


class _VectorTimesVotes(torch.autograd.Function):
    """(u[..., None, :] @ vv)[..., 0, :] for u (..., 2H) and vv (..., 2H, N)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, vv: torch.Tensor, outer: _Outer) -> torch.Tensor:
        ctx.save_for_backward(u, vv)
        ctx.outer = outer
        return (u.unsqueeze(-2) @ vv).squeeze(-2)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        u, vv = ctx.saved_tensors
        ctx.outer.terms.append((u, g))
        return (vv @ g.unsqueeze(-1)).squeeze(-1), None, None


def em_routing(votes: torch.Tensor, a_in: torch.Tensor, beta_u: torch.Tensor, beta_a: torch.Tensor,
               index: torch.Tensor, n_positions: int, n_types: int, iters: int = 3,
               lambdas: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """EM routing of a capsule layer whose parents sit at L positions.

    Args:
        votes: (B, L, J, 16, N): the vote of child n = p * n_types + c (patch slot p, type c) for
            parent type j at position l.
        a_in: (B, L, N): the children's activations, as seen from each patch.
        beta_u, beta_a: (J,) per parent type.
        index: (L, P) long: the input position of each patch slot, in [0, n_positions); a child is
            (position, type), and its R sums to one over every (l, j) whose patch holds it.
        n_positions: the number of input positions; n_types: the number of child types.
        iters: routing iterations.
        lambdas: the inverse temperature at each iteration (default :func:`inverse_temperatures`).

    Returns:
        poses (B, L, J, 16) and activations (B, L, J) of the parents.

    Every sum over children or pose entries is a product of a vector with the votes stacked on
    their squares, so no iteration writes a tensor of the votes' size: the variance is
    E[V^2] - mu^2, and the Gaussian's exponent sum_h (V - mu)^2 / sigma^2 is expanded the same
    way. The votes' gradient is gathered from those products in one matrix product at the end
    (_StackedVotes); the function can be differentiated once (no double backward).
    """
    outer = _Outer()
    return _route_stacked(_StackedVotes.apply(votes, outer), outer, a_in, beta_u, beta_a, index, n_positions,
                          n_types, iters, lambdas)


def _route_stacked(stacked: torch.Tensor, outer: _Outer, a_in: torch.Tensor, beta_u: torch.Tensor,
                   beta_a: torch.Tensor, index: torch.Tensor, n_positions: int, n_types: int, iters: int,
                   lambdas: list[float] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`em_routing` on the votes stacked on their squares, (B, L, J, 2H, N), with the
    record of products their gradient is gathered from."""
    B, L, J, H2, N = stacked.shape
    H = H2 // 2
    lambdas = lambdas if lambdas is not None else inverse_temperatures(iters)
    flat = index.reshape(-1).to(stacked.device)
    # R starts at 1 / (number of parents of the child): J types at every position whose patch holds it
    count = torch.zeros(n_positions, dtype=stacked.dtype, device=stacked.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=stacked.dtype))
    R = (1.0 / (J * count[index])).repeat_interleave(n_types, dim=1).view(1, L, 1, N)
    # the amount of data a parent gets, rescaled as in Gritzman's implementation: 100 at a
    # parent that gets an even share of fully active children (N children for J parent types)
    scale = 100.0 * J / N
    a_child = a_in.unsqueeze(2)  # (B, L, 1, N)
    for t in range(iters):
        # M-step
        Ra = R * a_child  # (B, L, J, N)
        r_sum = Ra.sum(dim=-1)  # (B, L, J)
        moments = _VotesTimesVector.apply(stacked, Ra / (r_sum.unsqueeze(-1) + 1e-12), outer)
        mu = moments[..., :H]  # (B, L, J, H)
        var = (moments[..., H:] - mu.square()).clamp_min(0.0) + VAR_EPS
        log_sigma = 0.5 * var.log()
        cost = ((beta_u.view(1, 1, J, 1) + log_sigma) * (scale * r_sum).unsqueeze(-1)).sum(-1)
        a_out = torch.sigmoid(lambdas[t] * (beta_a.view(1, 1, J) - cost))  # (B, L, J)
        if t == iters - 1:
            break
        # E-step: log(a_j p_ij), normalised over every parent (l, j) of each child;
        # sum_h (V - mu)^2 / sigma^2 = sum_h (V^2 - 2 mu V) / sigma^2 + sum_h mu^2 / sigma^2
        inv = var.reciprocal()
        quad = _VectorTimesVotes.apply(torch.cat([-2.0 * mu * inv, inv], dim=-1), stacked, outer) + (
            mu.square() * inv).sum(-1, keepdim=True)  # (B, L, J, N)
        log_ap = (a_out.clamp_min(1e-30).log() - log_sigma.sum(-1) - 0.5 * H * LOG_2PI).unsqueeze(-1) - 0.5 * quad
        R = _normalise_over_parents(log_ap.view(B, L, J, -1, n_types), index, flat, n_positions).view(B, L, J, N)
    return mu, a_out


def _normalise_over_parents(log_ap: torch.Tensor, index: torch.Tensor, flat: torch.Tensor,
                            n_positions: int) -> torch.Tensor:
    """exp(log_ap) / (its sum over every parent of the child), computed stably: each child's
    largest log_ap over its parents is subtracted first. log_ap: (B, L, J, P, C)."""
    B, L, J, P, C = log_ap.shape
    with torch.no_grad():
        peak = log_ap.amax(dim=2).reshape(B, L * P, C)
        child_peak = torch.full((B, n_positions, C), -torch.inf, dtype=log_ap.dtype, device=log_ap.device)
        child_peak.scatter_reduce_(1, flat.view(1, -1, 1).expand(B, -1, C), peak, "amax")
        shift = child_peak[:, index]  # (B, L, P, C)
    e = torch.exp(log_ap - shift.unsqueeze(2))
    total = torch.zeros(B, n_positions, C, dtype=e.dtype, device=e.device).index_add(
        1, flat, e.sum(2).reshape(B, L * P, C))
    return e / total[:, index].unsqueeze(2)


class ConvCaps(nn.Module):
    """A convolutional capsule layer: K x K patches of ``cin`` capsule types vote, through one 4x4
    matrix per (patch slot, input type, output type), for ``cout`` types at each output position."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, iters: int) -> None:
        super().__init__()
        self.cin, self.cout, self.k, self.stride, self.iters = cin, cout, k, stride, iters
        self.W = nn.Parameter(torch.randn(k * k, cin, cout, 4, 4) * W_STD)
        self.beta_u = nn.Parameter(torch.zeros(cout))
        self.beta_a = nn.Parameter(torch.zeros(cout))
        self._index: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def forward(self, pose: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pose (B, H, W, cin, 16), a (B, H, W, cin) -> (B, Ho, Wo, cout, 16), (B, Ho, Wo, cout)."""
        B, h, w = pose.shape[:3]
        index = self._index.get((h, w, pose.device))
        if index is None:
            index = self._index[(h, w, pose.device)] = patch_index(h, w, self.k, self.stride).to(pose.device)
        ho, wo = (h - self.k) // self.stride + 1, (w - self.k) // self.stride + 1
        p = pose.reshape(B, h * w, self.cin, 4, 4)[:, index]  # (B, L, P, cin, 4, 4)
        outer = _Outer()
        stacked = _ConvVotes.apply(p, self.W, outer)  # (B, L, cout, 32, P * cin)
        mu, a_out = _route_stacked(stacked, outer, a.reshape(B, h * w, self.cin)[:, index].flatten(2), self.beta_u,
                                   self.beta_a, index, h * w, self.cin, self.iters, None)
        return mu.view(B, ho, wo, self.cout, 16), a_out.view(B, ho, wo, self.cout)


class ClassCaps(nn.Module):
    """Class capsules: every child (position, type) votes for every class through one 4x4 matrix
    per (type, class) shared over positions, plus its position (coordinate addition)."""

    def __init__(self, cin: int, classes: int, iters: int) -> None:
        super().__init__()
        self.cin, self.classes, self.iters = cin, classes, iters
        self.W = nn.Parameter(torch.randn(cin, classes, 4, 4) * W_STD)
        self.beta_u = nn.Parameter(torch.zeros(classes))
        self.beta_a = nn.Parameter(torch.zeros(classes))

    def forward(self, pose: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pose (B, H, W, cin, 16), a (B, H, W, cin) -> (B, classes, 16), (B, classes)."""
        B, h, w = pose.shape[:3]
        votes = torch.einsum("bpcxy,cjyz->bjxzpc", pose.reshape(B, h * w, self.cin, 4, 4), self.W)
        votes = (votes.flatten(2, 3) + coordinate_offsets(h, w, votes.dtype, votes.device)).flatten(-2)
        index = torch.arange(h * w, device=pose.device).view(1, -1)
        mu, a_out = em_routing(votes.unsqueeze(1), a.reshape(B, 1, h * w * self.cin), self.beta_u, self.beta_a,
                               index, h * w, self.cin, self.iters)
        return mu[:, 0], a_out[:, 0]


def coordinate_offsets(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(16, h*w, 1): the scaled centre (row, column) of each position, in vote entries 3 and 7
    (the first two entries of the right-hand column of a row-major 4x4 pose)."""
    off = torch.zeros(16, h * w, 1, dtype=dtype, device=device)
    off[3, :, 0] = (torch.arange(h, dtype=dtype, device=device).repeat_interleave(w) + 0.5) / h
    off[7, :, 0] = (torch.arange(w, dtype=dtype, device=device).repeat(h) + 0.5) / w
    return off


class EMCapsNet(Classifier):
    """Matrix capsules with EM routing for 28x28 single-channel digits (see the module docstring).

    Args:
        num_classes: class capsules (10).
        input_size: must be 28.
        in_chans: input channels (1).
        A, B, C, D: Conv1 channels and the capsule types of PrimaryCaps, ConvCaps1 and ConvCaps2
            (the paper's smaller network: 64, 8, 16, 16; its larger one: 32 each).
        routing_iters: EM iterations in every capsule layer (2; the paper's 3 did not learn in the
            quick budget: see the module docstring).
    """

    family = "capsule"
    # scored 64 images at a time: the routing's tensors outgrow the caches above that (2-core AMD
    # EPYC, 2026-12-07: 6.6 ms per image at 64, 13 ms at 500, the batch test sets are scored in)
    inference_batch = 64

    def __init__(self, num_classes: int = 10, input_size: int = 28, in_chans: int = 1, A: int = 64, B: int = 8,
                 C: int = 16, D: int = 16, routing_iters: int = 2) -> None:
        super().__init__(num_classes=num_classes, input_size=input_size)
        if input_size != 28:
            raise ConfigError(f"em_capsnet takes 28x28 inputs only (its layers keep the paper's 14 -> 6 -> 4 "
                             f"capsule grids), got {input_size}x{input_size}; use capsnet for this suite")
        self.B_types = B
        self.conv1 = nn.Conv2d(in_chans, A, 5, stride=2, padding=2)
        self.primary_pose = nn.Conv2d(A, B * 16, 1)
        self.primary_act = nn.Conv2d(A, B, 1)
        self.conv_caps1 = ConvCaps(B, C, 3, 2, routing_iters)
        self.conv_caps2 = ConvCaps(C, D, 3, 1, routing_iters)
        self.class_caps = ClassCaps(D, num_classes, routing_iters)
        self.margin_low, self.margin_high = 0.2, 0.9
        self.register_buffer("margin_ramp", torch.tensor(1.0))  # steps over which the margin rises
        self.register_buffer("steps_seen", torch.tensor(0.0))

    def set_training_steps(self, total: int) -> None:
        """The trainer's budget: the margin reaches 0.9 halfway through it."""
        self.margin_ramp.fill_(max(1.0, total / 2))

    def primary_capsules(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = mark(torch.relu(self.conv1(x)), "conv")
        Bn, _, hh, ww = h.shape
        pose = self.primary_pose(h).view(Bn, self.B_types, 16, hh, ww).permute(0, 3, 4, 1, 2)
        a = torch.sigmoid(self.primary_act(h)).permute(0, 2, 3, 1)
        return mark(pose, "primary_caps"), a

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> ModelOutput:
        pose, a = self.primary_capsules(x)
        pose, a = self.conv_caps1(pose, a)
        pose, a = self.conv_caps2(pose, a)
        pose, a = self.class_caps(pose, a)
        return ModelOutput(scores=mark(a, "routing"), poses=pose)

    def margin(self) -> torch.Tensor:
        frac = (self.steps_seen / self.margin_ramp).clamp(0.0, 1.0)
        return self.margin_low + (self.margin_high - self.margin_low) * frac

    def loss(self, out: ModelOutput, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Spread loss; each call while training counts one step of the margin's schedule."""
        a = out.scores.float()
        target = a.gather(1, y.view(-1, 1))
        spread = torch.relu(self.margin() - (target - a)).square()
        spread = spread.scatter(1, y.view(-1, 1), 0.0)
        if self.training and torch.is_grad_enabled():
            self.steps_seen.add_(1.0)
        return spread.sum(dim=1).mean()

    def confidence(self, out: ModelOutput) -> torch.Tensor:
        return out.scores.float().clamp(0.0, 1.0)


@register_model("em_capsnet", family="capsule", paper="Hinton et al. 2018", input_sizes=(28,))
def em_capsnet(**kw) -> EMCapsNet:
    """Matrix capsules with EM routing, the paper's smaller smallNORB network (A=64, B=8, C=D=16)."""
    return EMCapsNet(**kw)
