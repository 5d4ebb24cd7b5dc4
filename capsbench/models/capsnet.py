"""CapsNet with dynamic routing (Sabour, Frosst & Hinton 2017, "Dynamic Routing Between
Capsules", NIPS; arXiv:1710.09829).

Architecture (paper Section 4 and Figure 1/2), at a 28x28 input:

    x (B, 1, 28, 28)
    Conv1       256 kernels 9x9, stride 1, ReLU          -> (B, 256, 20, 20)
    PrimaryCaps 32 channels x 8-D capsules, 9x9 stride 2 -> (B, 32*8, 6, 6)
                a capsule is 8 consecutive channels at one grid position -> (B, 1152, 8)
                squashed
    DigitCaps   10 x 16-D, W_ij in R^{8x16} for every (input capsule i, class j),
                dynamic routing, r iterations          -> v (B, 10, 16)
    Decoder     FC 512 ReLU, FC 1024 ReLU, FC H*W sigmoid on the masked (B, 160) poses

Parameters: 8,215,568 at 28x28 (6,804,224 without the decoder). The paper does not give
DigitCaps biases and the count above has none.

Choices the paper leaves open, and what we do:

* Gradient through routing: gradients flow through every routing iteration (the coupling
  coefficients are a differentiable function of u_hat), as in the authors' released code
  (github.com/Sarasra/models, research/capsules/models/layers/layers.py, which has no
  stop_gradient in ``_update_routing``). Some re-implementations detach u_hat in the
  agreement updates; that is not done here.
* W initialisation: normal with std 0.01 (the paper gives none; small weights keep the
  first squashes in their near-linear regime, as in the common re-implementations).
  Convolutions and decoder use PyTorch's default (Kaiming-uniform) initialisation.
* Squash: v = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps), eps = 1e-7, so that a zero
  vector maps to zero with finite gradients.
* Losses: margin loss with m+ = 0.9, m- = 0.1, lambda = 0.5, summed over classes and
  averaged over the batch (paper eq. 4); reconstruction loss is the sum of squared errors
  over pixels times 0.0005, averaged over the batch (paper Section 4.1).
* Decoder mask: the true label while training, the predicted label otherwise (and
  whenever no label is given).
* Routing logits b_ij are per example and start at 0 for every forward pass; the softmax
  is over the output capsules j, so the coupling coefficients of each input capsule sum
  to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capsbench.models.base import Classifier, ModelOutput, env_choice, mark
from capsbench.models.kernels import cpu_routing
from capsbench.models.kernels import fused_routing as fused_routing_module
from capsbench.models.kernels.fft_conv import check_conv_impl, fft_conv2d, gemm_conv2d, wants_fft
from capsbench.models.registry import register_model
from capsbench.models.routing import SQUASH_EPS, route_backward_terms, route_passes, squash

# How DigitCaps routes: "torch" writes u_hat and routes with batched matmuls (any device);
# "triton" and "cpp" never write u_hat: fused kernels that recompute it, Triton ones for CUDA
# (models/kernels/fused_routing.py) and C++ ones for CPUs (models/kernels/cpu_routing.py, compiled on first use).
# "auto" is "cpp" on CPUs in float32/float64 where the C++ library builds, faster at every batch
# size measured on the 2-core build machine (u_hat + routing forward and backward: batch 1
# 2.2 vs 4.3 ms, batch 8 5.9 vs 10.3, batch 32 16-17 vs 33-36, batch 100 49-56 vs 89-101 ms),
# "torch" otherwise: on an H100 the Triton kernels made routing 7-19% and inference 28% faster
# but the whole training step no faster (reports/gpu-h100/README.md). The environment variable
# CAPSBENCH_ROUTING overrides "auto".
ROUTING_KERNELS = ("auto", "torch", "triton", "cpp")
# How the two convolutions run: "direct" is F.conv2d (oneDNN / cuDNN); "fft" runs PrimaryCaps
# as per-frequency matrix products (a third of the arithmetic) and Conv1 as one im2col GEMM
# (models/kernels/fft_conv.py), the same convolutions to float32 rounding. "auto" takes "fft" on CPUs in
# float32 without autocast, on inputs up to FFT_CONV_MAX_INPUT pixels a side (MNIST's 28x28),
# from batch FFT_CONV_MIN_BATCH in training steps and FFT_CONV_MIN_INFER_BATCH in inference,
# where it measured faster (docs/performance.md). Its weight transform costs the same at any batch
# size; on the 2-core build machine: training at batch 16 both paths ran at 55 images/s, at 32
# fft 87 vs direct 56, at 100 143 vs 64; inference at batch 48-64 they tie (~310 images/s), at
# 100 fft 372-397 vs 283-319, at 500 (train.device.predict) 414-457 vs 308-321. "direct" everywhere
# else (GPUs, autocast, small batches, affNIST's 40x40). The environment variable
# CAPSBENCH_CONV overrides "auto" (CONV_IMPLS, fft_conv.wants_fft).
FFT_CONV_MAX_INPUT = 28
FFT_CONV_MIN_BATCH = 32
FFT_CONV_MIN_INFER_BATCH = 100


def _plain_contractions(u_hat: torch.Tensor):
    """wsum and agree of :func:`route_passes` for u_hat stored as (B, n_out, n_in, d_out).

    In this layout both are batched matrix-vector products over contiguous (n_in, d_out)
    blocks: no broadcast product of u_hat's size is ever materialised, forward or backward.
    """
    J = u_hat.shape[1]

    def wsum(c):
        if c is None:
            return u_hat.sum(dim=2) / J
        return torch.matmul(c.unsqueeze(2), u_hat).squeeze(2)

    return wsum, lambda x: _agreement(u_hat, x)


def _agreement(u_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """u_hat (B, J, n_in, D) . x (B, J, D) over D -> (B, J, n_in)."""
    if u_hat.is_cuda:
        return torch.matmul(u_hat, x.unsqueeze(-1)).squeeze(-1)
    # On a CPU, BLAS runs the same products as (1 x D) @ (D x n_in) about 3.5x faster than as
    # matrix-vector products (11 -> 3 ms at batch 100 on the 2-core build machine).
    return torch.matmul(x.unsqueeze(2), u_hat.transpose(-1, -2)).squeeze(2)


def _one_hot(labels: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    # A comparison, not F.one_hot: no range check that reads the labels back to the host,
    # so a training step has no host synchronisation and can be captured in a CUDA graph.
    return (labels.unsqueeze(1) == torch.arange(n, device=labels.device)).to(dtype)


class _DynamicRouting(torch.autograd.Function):
    """Routing with a hand-written backward.

    Autograd's own backward for the loop of route_passes writes one u_hat-sized outer product per
    use of u_hat and adds them up; here the gradient of u_hat is gathered as
    sum_t c_t (x) g_s_t + sum_t g_a_t (x) v_t and written once, by one batched matmul with
    an inner dimension of 2r - 1. The small per-iteration tensors (squash, softmax) are
    differentiated exactly. Double backward is not supported.
    """

    @staticmethod
    def forward(ctx, u_hat: torch.Tensor, iterations: int):
        v, ss, vs, cs = route_passes(*_plain_contractions(u_hat), iterations)
        ctx.iterations = iterations
        ctx.save_for_backward(u_hat, *ss, *vs, *cs[1:])
        c_last = cs[-1] if cs[-1] is not None else torch.full_like(u_hat[..., 0], 1.0 / u_hat.shape[1])
        ctx.mark_non_differentiable(c_last)
        return v, c_last

    @staticmethod
    def backward(ctx, grad_v: torch.Tensor, _grad_c):
        r = ctx.iterations
        saved = ctx.saved_tensors
        u_hat = saved[0]
        ss = saved[1 : 1 + r]
        vs = saved[1 + r : 1 + 2 * r]
        cs = (None,) + tuple(saved[1 + 2 * r :])
        uniform = u_hat.new_full(u_hat.shape[:3], 1.0 / u_hat.shape[1])
        coefs, vecs = route_backward_terms(grad_v, ss, vs, cs, *_plain_contractions(u_hat), uniform)
        A = torch.stack(coefs, dim=-1)  # (B, J, n_in, K)
        G = torch.stack(vecs, dim=-2)  # (B, J, K, D)
        return torch.matmul(A, G), None  # (B, J, n_in, D)


def dynamic_routing(
    u_hat: torch.Tensor, iterations: int, keep_coupling: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Routing-by-agreement (paper Procedure 1), batched.

    Args:
        u_hat: (B, n_out, n_in, d_out) predictions of every input capsule for every output
            (note the layout: outputs before inputs).
        iterations: r >= 1. With r = 1 the coupling is uniform (softmax of zeros).
        keep_coupling: also return the last coupling coefficients, (B, n_in, n_out).

    Returns:
        v (B, n_out, d_out) and the coupling coefficients or None.
    """
    if iterations < 1:
        raise ValueError(f"routing iterations must be >= 1, got {iterations}")
    v, c = _DynamicRouting.apply(u_hat, iterations)
    return v, (c.transpose(1, 2) if keep_coupling else None)


class CapsNet(Classifier):
    """The paper's three-layer CapsNet with optional reconstruction decoder.

    Args:
        num_classes: output capsules (10 for MNIST).
        input_size: side of the square input (28 for MNIST, 40 for affNIST).
        in_chans: input channels.
        routing_iters: r; the paper uses 3.
        reconstruction: attach the decoder and add its loss (weight 0.0005).
        uniform_coupling: fix every coupling coefficient to 1/num_classes (no routing).
        recon_weight: scale of the reconstruction loss.
        routing_kernel: "auto" ($CAPSBENCH_ROUTING overrides it), "torch" (u_hat and batched
            matmuls), "triton" (fused kernels, CUDA) or "cpp" (fused kernels, CPU); see
            ROUTING_KERNELS. Same results to float32 rounding.
        conv_impl: "auto" ($CAPSBENCH_CONV overrides it), "direct" or "fft" (Conv1 by GEMM,
            PrimaryCaps by FFT); see CONV_IMPLS. Same results to float32 rounding.

    Example:
        >>> m = CapsNet()
        >>> out = m(torch.rand(2, 1, 28, 28))
        >>> tuple(out.scores.shape), tuple(out.poses.shape)
        ((2, 10), (2, 10, 16))
    """

    family = "capsule"

    def __init__(
        self,
        num_classes: int = 10,
        input_size: int = 28,
        in_chans: int = 1,
        routing_iters: int = 3,
        reconstruction: bool = True,
        uniform_coupling: bool = False,
        recon_weight: float = 0.0005,
        conv1_channels: int = 256,
        primary_caps: int = 32,
        primary_dim: int = 8,
        digit_dim: int = 16,
        m_plus: float = 0.9,
        m_minus: float = 0.1,
        lambda_: float = 0.5,
        routing_kernel: str = "auto",
        conv_impl: str = "auto",
    ) -> None:
        super().__init__(num_classes=num_classes, input_size=input_size)
        if routing_iters < 1:
            raise ValueError(f"routing_iters must be >= 1, got {routing_iters}")
        if routing_kernel not in ROUTING_KERNELS:
            raise ValueError(f"routing_kernel must be one of {', '.join(ROUTING_KERNELS)}, got {routing_kernel!r}")
        self.routing_kernel = routing_kernel
        self.conv_impl = check_conv_impl(conv_impl)
        self.routing_iters = 1 if uniform_coupling else routing_iters
        self.uniform_coupling = uniform_coupling
        self.recon_weight = recon_weight
        self.m_plus, self.m_minus, self.lambda_ = m_plus, m_minus, lambda_
        self.primary_caps, self.primary_dim, self.digit_dim = primary_caps, primary_dim, digit_dim

        self.conv1 = nn.Conv2d(in_chans, conv1_channels, kernel_size=9, stride=1)
        self.primary = nn.Conv2d(conv1_channels, primary_caps * primary_dim, kernel_size=9, stride=2)
        grid = ((input_size - 8) - 9) // 2 + 1  # 28 -> 20 -> 6; 40 -> 32 -> 12
        if grid < 1:
            raise ValueError(f"input_size {input_size} is too small for CapsNet (needs >= 25)")
        self.grid = grid
        self.num_primary = primary_caps * grid * grid  # 1152 at 28x28, 4608 at 40x40
        # W_ij stored as (n_in, d_in, n_out * d_out): u_hat for all classes is one batched
        # matmul over the input capsules, (n_in, B, d_in) @ (n_in, d_in, n_out*d_out).
        self.W = nn.Parameter(torch.randn(self.num_primary, primary_dim, num_classes * digit_dim) * 0.01)
        self.decoder = None
        if reconstruction:
            self.decoder = nn.Sequential(
                nn.Linear(num_classes * digit_dim, 512),
                nn.ReLU(inplace=True),
                nn.Linear(512, 1024),
                nn.ReLU(inplace=True),
                nn.Linear(1024, in_chans * input_size * input_size),
                nn.Sigmoid(),
            )

    # The stages are separate methods so the profiler can time each one.
    def primary_capsules(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_fft_conv(x):
            with torch.autocast(device_type=x.device.type, enabled=False):
                w1, w = self.conv1.weight, self.primary.weight
                h = mark(gemm_conv2d(x.to(w1.dtype), w1, self.conv1.bias, relu=True), "conv1")
                p = fft_conv2d(h.to(w.dtype), w, self.primary.bias, stride=self.primary.stride[0])
        else:
            h = mark(F.relu(self.conv1(x), inplace=True), "conv1")  # (B, 256, H1, W1)
            p = self.primary(h)  # (B, 32*8, G, G), NCHW or channels_last
        B = p.shape[0]
        # channel c*8 + k at (gy, gx) is component k of capsule (c, gy, gx); unflatten is a
        # view in either memory layout
        p = p.unflatten(1, (self.primary_caps, self.primary_dim))
        u = p.permute(0, 1, 3, 4, 2).reshape(B, self.num_primary, self.primary_dim)  # (B, n_in, 8)
        # capsules are squashed and routed in float32 even under bf16 autocast (see forward)
        return mark(squash(u.to(self.W.dtype)), "primary_caps")

    def predictions(self, u: torch.Tensor) -> torch.Tensor:
        B = u.shape[0]
        u_t = u.transpose(0, 1)  # (n_in, B, 8)
        u_hat = torch.bmm(u_t, self.W)  # (n_in, B, n_out*16)
        u_hat = u_hat.view(self.num_primary, B, self.num_classes, self.digit_dim)
        # routing wants (B, n_out, n_in, 16) contiguous: one copy here saves many later
        return mark(u_hat.permute(1, 2, 0, 3).contiguous(), "u_hat")

    def uses_fft_conv(self, x: torch.Tensor) -> bool:
        """Whether the convolutions run as GEMM (Conv1) and FFT (PrimaryCaps) on input ``x`` (CONV_IMPLS)."""
        return wants_fft(self.conv_impl, x, self.primary.weight, FFT_CONV_MIN_BATCH, FFT_CONV_MIN_INFER_BATCH,
                         FFT_CONV_MAX_INPUT)

    def routing_impl(self, u: torch.Tensor) -> str:
        """Which routing :meth:`route` runs for capsules ``u``: "torch", "triton" or "cpp" (ROUTING_KERNELS)."""
        kernel = self.routing_kernel
        if kernel == "auto":
            kernel = env_choice("CAPSBENCH_ROUTING", ROUTING_KERNELS)
        if kernel == "auto":
            return "cpp" if u.device.type == "cpu" and cpu_routing.available(u, self.W, self.num_classes) else "torch"
        if kernel == "triton" and not fused_routing_module.available(u):
            raise RuntimeError(
                f"routing_kernel 'triton' needs Triton and a CUDA tensor (got a {u.device.type} tensor"
                f"{'' if fused_routing_module.triton is not None else ', Triton not installed'}); "
                "use routing_kernel='auto' or 'torch'")
        if kernel == "cpp" and not cpu_routing.available(u, self.W, self.num_classes):
            raise RuntimeError(f"routing_kernel 'cpp' cannot run: {cpu_routing.why_not(u, self.W, self.num_classes)}; "
                               "use routing_kernel='auto' or 'torch'")
        return kernel

    def uses_fused_routing(self, u: torch.Tensor) -> bool:
        """Whether :meth:`route` takes fused kernels (Triton or C++) that never write u_hat."""
        return self.routing_impl(u) != "torch"

    def route(self, u: torch.Tensor, keep_coupling: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """u_hat and dynamic routing of primary capsules u (B, n_in, 8): v and, if asked, c."""
        impl = self.routing_impl(u)
        if impl != "torch":
            u = mark(u, "u_hat")  # no u_hat is written: the stage is empty, routing holds the time
            fused = cpu_routing.routing if impl == "cpp" else fused_routing_module.fused_routing
            v, c = fused(u, self.W, self.num_classes, self.routing_iters)
            return v, (c.transpose(1, 2) if keep_coupling else None)
        return dynamic_routing(self.predictions(u), self.routing_iters, keep_coupling=keep_coupling)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None, keep_coupling: bool = False
    ) -> ModelOutput:
        u = self.primary_capsules(x)
        # u_hat and routing run in float32 with autocast off: they are a few MFLOP per image,
        # and agreements summed over 1152 inputs for three iterations are where bf16's 8-bit
        # mantissa would hurt. On a GPU this float32 tensor traffic is then the largest part of
        # the step (reports/gpu-h100); routing_kernel="triton" never writes u_hat at all.
        with torch.autocast(device_type=x.device.type, enabled=False):
            v, c = self.route(u, keep_coupling=keep_coupling)
        v = mark(v, "routing")
        lengths = torch.sqrt((v * v).sum(dim=-1) + SQUASH_EPS)  # (B, n_out)
        recon = None
        if self.decoder is not None:
            recon = mark(self.decode(v, y if (self.training and y is not None) else lengths.argmax(dim=1)), "decoder")
        return ModelOutput(scores=lengths, poses=v, reconstruction=recon, coupling=c)

    def decode(self, poses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Reconstruct from the capsule of ``labels`` only (the others are masked to zero)."""
        if self.decoder is None:
            raise RuntimeError("this CapsNet has no decoder (reconstruction=False)")
        mask = _one_hot(labels, self.num_classes, poses.dtype)  # (B, n_out)
        return self.decoder((poses * mask.unsqueeze(-1)).flatten(1))  # (B, H*W)

    def margin_loss(self, lengths: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = _one_hot(y, self.num_classes, lengths.dtype)
        present = F.relu(self.m_plus - lengths).pow(2)
        absent = F.relu(lengths - self.m_minus).pow(2)
        per_class = t * present + self.lambda_ * (1.0 - t) * absent
        return per_class.sum(dim=1).mean()

    def loss(self, out: ModelOutput, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.margin_loss(out.scores.float(), y)
        if out.reconstruction is not None and self.recon_weight > 0:
            err = (out.reconstruction.float() - x.flatten(1).float()).pow(2).sum(dim=1).mean()
            loss = loss + self.recon_weight * err
        return loss

    def confidence(self, out: ModelOutput) -> torch.Tensor:
        return out.scores.float().clamp(0.0, 1.0)


# Named variants: each passes different arguments to the one class above.
@register_model("capsnet", family="capsule", paper="Sabour et al. 2017")
def capsnet(**kw) -> CapsNet:
    """The paper's CapsNet: 3 routing iterations, reconstruction decoder."""
    return CapsNet(**kw)


@register_model("capsnet_r1", family="capsule", paper="Sabour et al. 2017, Table 1")
def capsnet_r1(**kw) -> CapsNet:
    """One routing iteration (Table 1's "routing 1")."""
    return CapsNet(**{"routing_iters": 1, **kw})


@register_model("capsnet_norecon", family="capsule", paper="Sabour et al. 2017, Table 1")
def capsnet_norecon(**kw) -> CapsNet:
    """No decoder and no reconstruction loss."""
    return CapsNet(**{"reconstruction": False, **kw})


@register_model("capsnet_uniform", family="capsule", paper="ablation")
def capsnet_uniform(**kw) -> CapsNet:
    """Coupling coefficients fixed to uniform: capsules without routing."""
    return CapsNet(**{"uniform_coupling": True, **kw})
