"""Counting FLOPs: measured by dispatch (FlopCounterMode, with the backward of convolutions
counted right) and, for routing, analytically with its element-wise work."""

from __future__ import annotations

import torch

FLOP_BATCH = 2  # FLOPs are counted at this batch size and divided by it


# --------------------------------------------------------------------------- FLOPs


def routing_flops(
    iterations: int,
    n_in: int = 1152,
    d_in: int = 8,
    n_out: int = 10,
    d_out: int = 16,
    train: bool = False,
) -> int:
    """Analytic FLOPs per image of CapsNet's u_hat and dynamic routing (r = ``iterations``).

    FlopCounterMode sees only the matrix products; this count adds the element-wise work::

        u_hat   = 2 * n_in * d_in * n_out * d_out      u_hat_j|i = W_ij u_i, once
        wsum    = 2 * n_in * n_out * d_out             s_j = sum_i c_ij u_hat_j|i, r times
        agree   = 2 * n_in * n_out * d_out             b_ij += u_hat_j|i . v_j, r - 1 times
        softmax = 5 * n_in * n_out                     c_i = softmax_j(b_ij), r - 1 times
        squash  = 6 * n_out * d_out + 4 * n_out        v_j = squash(s_j), r times
                  (6 per output element: the squared norm's multiply-add and the scaling;
                  4 per capsule: 1 + |s|^2, |s|^2 + eps, sqrt, divide)

        inference = u_hat + r * (wsum + squash) + (r - 1) * (agree + softmax)
        train     = inference + 2 * (u_hat + r * wsum + (r - 1) * agree)

    The backward of each matrix product computes two products of its size (the gradients of
    both operands), hence ``2 *`` the matrix parts; the element-wise backward is left out.
    At the paper's sizes and r = 3 this is 4,910,520 (inference) and 14,495,160 (train).

    Example:
        >>> routing_flops(1)
        3318760
        >>> routing_flops(3) > routing_flops(1)
        True
    """
    if iterations < 1:
        raise ValueError(f"routing iterations must be >= 1, got {iterations}")
    r = iterations
    u_hat = 2 * n_in * d_in * n_out * d_out
    wsum = 2 * n_in * n_out * d_out
    agree = 2 * n_in * n_out * d_out
    softmax = 5 * n_in * n_out
    squash = 6 * n_out * d_out + 4 * n_out
    inference = u_hat + r * (wsum + squash) + (r - 1) * (agree + softmax)
    if not train:
        return inference
    return inference + 2 * (u_hat + r * wsum + (r - 1) * agree)


def routing_flops_for(model: torch.nn.Module, train: bool = False) -> int | None:
    """:func:`routing_flops` at a capsule model's own sizes; None for models without routing."""
    need = ("num_primary", "primary_dim", "num_classes", "digit_dim", "routing_iters")
    if getattr(model, "family", "") != "capsule" or not all(hasattr(model, a) for a in need):
        return None
    return routing_flops(
        model.routing_iters, model.num_primary, model.primary_dim, model.num_classes, model.digit_dim, train=train
    )


def _batch(model: torch.nn.Module, batch_size: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = int(getattr(model, "input_size", 28))
    chans = int(getattr(model, "in_chans", 1))
    x = torch.rand(batch_size, chans, size, size, generator=g).to(device)
    y = torch.randint(0, int(getattr(model, "num_classes", 10)), (batch_size,), generator=g).to(device)
    return x, y


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten.convolution_backward``: grad_input and grad_weight each do the
    multiply-adds of the forward convolution.

    torch's own formula ignores ``groups`` for grad_weight and so counts a depthwise
    convolution's weight gradient C times over (C channels): EfficientNet-B0's training step
    came out at 0.65 GFLOP per image for a 16 MFLOP forward. Fixed upstream in
    pytorch/pytorch PR #183405; this formula equals torch's for ``groups == 1``.
    """
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


_FLOP_FIXES = {torch.ops.aten.convolution_backward: _conv_backward_flop}


def count_flops(model: torch.nn.Module, train: bool, batch_size: int = FLOP_BATCH) -> tuple[float, dict[str, float]]:
    """FLOPs per image of one inference pass or one training step, and the same split by op.

    Counted with ``FlopCounterMode(display=False)`` at ``batch_size`` and divided by it, with
    :func:`_conv_backward_flop` in place of torch's formula for convolution backward (grouped
    convolutions).
    ``train=True``: ``model.train()``, forward + ``model.loss`` + backward (the optimizer is not
    counted); ``train=False``: ``model.eval()`` under ``torch.no_grad``. Gradients are cleared
    afterwards and the model's train/eval mode is restored. The count is the architecture's:
    CapsNet and the pooling CNNs are counted with their direct convolutions
    (``conv_impl="direct"``), CapsNet with its plain
    routing (``routing_kernel="torch"``: u_hat and batched matmuls), whichever implementation its
    steps would take on this device (models/kernels/fft_conv.py does less; the fused routing kernels
    recompute u_hat and are invisible to the counter).
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    x, y = _batch(model, batch_size, device, seed=1)
    was_training = model.training
    conv_impl = getattr(model, "conv_impl", None)
    routing_kernel = getattr(model, "routing_kernel", None)
    if conv_impl is not None:
        model.conv_impl = "direct"
    if routing_kernel is not None:
        model.routing_kernel = "torch"
    try:
        if train:
            model.train()
            model.zero_grad(set_to_none=True)
            with FlopCounterMode(display=False, custom_mapping=_FLOP_FIXES) as counter:
                out = model(x, y)
                model.loss(out, x, y).backward()
            model.zero_grad(set_to_none=True)
        else:
            model.eval()
            with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_FLOP_FIXES) as counter:
                model(x)
    finally:
        model.train(was_training)
        if conv_impl is not None:
            model.conv_impl = conv_impl
        if routing_kernel is not None:
            model.routing_kernel = routing_kernel
    by_op = {str(op): n / batch_size for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops() / batch_size, by_op
