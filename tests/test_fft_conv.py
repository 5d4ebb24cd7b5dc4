"""The CPU convolutions of models/kernels/fft_conv.py against F.conv2d, and CapsNet's choice between them.

The FFT convolution is exact in exact arithmetic (no approximation, no wrap-around at the
valid positions); these tests hold it to float64 gradcheck and, in float32 at CapsNet's real
shapes, to a float64 reference, where it must be at least as close as oneDNN's F.conv2d.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from capsbench.models import create_model
from capsbench.models.kernels.fft_conv import fft_conv2d, gemm_conv2d


@pytest.mark.parametrize("H, W, K, stride", [(20, 20, 9, 2), (21, 20, 9, 2), (20, 17, 9, 1), (17, 16, 5, 3),
                                             (9, 9, 9, 2), (12, 12, 3, 2),
                                             # maps with only self-conjugate columns (W <= 2) or rows
                                             (10, 2, 2, 1), (2, 5, 2, 1), (9, 1, 1, 1)])
def test_fft_conv_gradcheck_and_matches_conv2d_in_float64(H, W, K, stride):
    g = torch.Generator().manual_seed(H * 100 + W)
    x = torch.randn(3, 5, H, W, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 5, K, K, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    y = fft_conv2d(x, w, b, stride=stride)
    ref = F.conv2d(x, w, b, stride=stride)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, c, d: fft_conv2d(a, c, d, stride=stride), (x, w, b), fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, c: fft_conv2d(a, c, None, stride=stride), (x, w), fast_mode=True)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fft_conv_at_the_primarycaps_shape_is_within_float32_rounding(channels_last):
    """256 -> 256 channels, 9x9 stride 2 on 20x20: output and all three gradients within 1e-5
    (relative to the largest entry) of float64, and no further off than F.conv2d itself."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, 20, 20, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 9, 9, generator=g) * 0.01
    b = torch.randn(256, generator=g)
    dy = torch.randn(4, 256, 6, 6, generator=g)

    def run(fn, dtype):
        args = [t.detach().to(dtype).requires_grad_() for t in (x, w, b)]
        y = fn(*args)
        grads = torch.autograd.grad(y, args, dy.to(dtype))
        return [y.double(), *(t.double() for t in grads)]

    ref = run(lambda a, c, d: F.conv2d(a, c, d, stride=2), torch.float64)
    fft = run(lambda a, c, d: fft_conv2d(a, c, d, stride=2), torch.float32)
    direct = run(lambda a, c, d: F.conv2d(a, c, d, stride=2), torch.float32)
    for name, r, f, d in zip(("y", "dx", "dw", "db"), ref, fft, direct, strict=True):
        err_fft = ((f - r).abs().max() / r.abs().max()).item()
        err_direct = ((d - r).abs().max() / r.abs().max()).item()
        assert err_fft < 1e-5, (name, err_fft)
        assert err_fft <= 2 * err_direct + 1e-7, (name, err_fft, err_direct)
    if channels_last:  # the input gradient comes back in the input's layout
        xx = x.detach().requires_grad_()
        fft_conv2d(xx, w, b, stride=2).backward(dy)
        assert xx.grad.is_contiguous(memory_format=torch.channels_last)


def test_gemm_conv_matches_conv2d_with_and_without_relu():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 14, 13, dtype=torch.float64, generator=g)
    w = torch.randn(4, 2, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    torch.testing.assert_close(gemm_conv2d(x, w, b), F.conv2d(x, w, b), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gemm_conv2d(x, w, None, relu=True), F.relu(F.conv2d(x, w)), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda c, d: gemm_conv2d(x, c, d, relu=True), (w, b), fast_mode=True)


def test_fft_conv_rejects_what_it_cannot_compute():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        fft_conv2d(x, torch.randn(4, 3, 9, 9))
    with pytest.raises(ValueError, match=r"expected x \(B, C, H, W\) and weight \(O, C, K, L\)"):
        fft_conv2d(x, torch.randn(4, 2, 3, 3))
    with pytest.raises(TypeError, match="float32 or float64"):
        fft_conv2d(x.bfloat16(), torch.randn(4, 3, 3, 3).bfloat16())


def _loss_and_grads(model, x, y):
    out = model(x, y)
    loss = model.loss(out, x, y)
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return loss.detach(), grads


def test_capsnet_trains_the_same_with_either_convolution():
    """A training step's loss and every parameter gradient agree between conv_impl='fft' and
    'direct' (same weights) to float32 rounding."""
    torch.manual_seed(0)
    direct = create_model("capsnet", conv_impl="direct").train()
    fft = create_model("capsnet", conv_impl="fft").train()
    fft.load_state_dict(direct.state_dict())
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    l_d, g_d = _loss_and_grads(direct, x, y)
    l_f, g_f = _loss_and_grads(fft, x, y)
    torch.testing.assert_close(l_f, l_d, rtol=1e-5, atol=1e-6)
    names = [n for n, _ in direct.named_parameters()]
    for name, a, b in zip(names, g_f, g_d, strict=True):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 1e-4 * scale + 1e-9, name


def test_auto_takes_the_fft_convolutions_on_cpus_in_float32_from_batch_32_training_100_inference(monkeypatch):
    monkeypatch.delenv("CAPSBENCH_CONV", raising=False)
    m = create_model("capsnet").train()
    x = torch.zeros(100, 1, 28, 28)
    assert m.uses_fft_conv(x) and m.uses_fft_conv(x[:32])
    assert not m.uses_fft_conv(x[:31])  # small batches: the weight transform does not pay
    with torch.no_grad():  # inference amortises the weight transform over one forward only
        assert m.uses_fft_conv(x) and not m.uses_fft_conv(x[:99])
    with torch.inference_mode():
        assert m.uses_fft_conv(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not m.uses_fft_conv(x)
    assert not m.uses_fft_conv(x.double())
    assert not create_model("capsnet", input_size=40).train().uses_fft_conv(torch.zeros(64, 1, 40, 40))
    monkeypatch.setenv("CAPSBENCH_CONV", "direct")
    assert not m.uses_fft_conv(x)
    monkeypatch.setenv("CAPSBENCH_CONV", "fft")
    with torch.no_grad():
        assert m.uses_fft_conv(x)
    monkeypatch.setenv("CAPSBENCH_CONV", "fast")
    with pytest.raises(ValueError, match="CAPSBENCH_CONV must be one of auto, direct, fft, got 'fast'"):
        m.uses_fft_conv(x)
    with pytest.raises(ValueError, match="conv_impl must be one of auto, direct, fft"):
        create_model("capsnet", conv_impl="winograd")


def test_bad_capsbench_conv_is_one_error_line_before_a_command_starts(monkeypatch, capsys, tmp_path):
    from capsbench.cli.main import main

    monkeypatch.setenv("CAPSBENCH_CONV", "fast")
    rc = main(["train", "--model", "capsnet", "--device", "cpu", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("capsbench: error: "), err
    assert "CAPSBENCH_CONV must be one of auto, direct, fft" in err[0] and "'fast'" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_fft_conv_on_cuda_matches_the_cpu():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tier needs a CUDA device")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 20, 20, dtype=torch.float64, generator=g)
    w = torch.randn(4, 5, 9, 9, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g)
    outs = []
    for dev in ("cpu", "cuda"):
        args = [t.to(dev).requires_grad_() for t in (x, w, b)]
        y = fft_conv2d(*args, stride=2)
        outs.append([t.cpu() for t in (y, *torch.autograd.grad(y.square().sum(), args))])
    for a, c in zip(*outs, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["cnn_maxpool", "cnn_strided"])
@pytest.mark.parametrize("size", [28, 40])
def test_pooling_cnns_compute_the_same_with_either_convolution(name, size):
    """The second convolution by the DFT: output and every gradient as F.conv2d's, in float64
    (in float32 a max-pooling window can pick another of two near-equal values)."""
    torch.manual_seed(0)
    a = create_model(name, input_size=size, conv_impl="fft").double()
    b = create_model(name, input_size=size, conv_impl="direct").double()
    b.load_state_dict(a.state_dict())
    x = torch.rand(6, 1, size, size, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    assert a.uses_fft_conv(x) and not b.uses_fft_conv(x)
    oa, ob = a(x), b(x)
    torch.testing.assert_close(oa.scores, ob.scores, rtol=1e-12, atol=1e-12)
    F.cross_entropy(oa.scores, y).backward()
    F.cross_entropy(ob.scores, y).backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=n)


def test_pooling_cnns_take_the_dft_where_auto_says(monkeypatch):
    """"auto": the DFT in float32 CPU training from batch 32 and inference from batch 100, on
    28x28 inputs; direct for small batches, float64 and affNIST's 40x40; CAPSBENCH_CONV wins."""
    monkeypatch.delenv("CAPSBENCH_CONV", raising=False)
    m = create_model("cnn_maxpool").train()
    x = torch.zeros(32, 1, 28, 28)
    assert m.uses_fft_conv(x) and create_model("cnn_strided").uses_fft_conv(x)
    assert not m.uses_fft_conv(x[:16])
    assert not create_model("cnn_maxpool", input_size=40).uses_fft_conv(torch.zeros(32, 1, 40, 40))
    assert not create_model("cnn_maxpool").double().uses_fft_conv(x.double())
    with torch.no_grad():
        assert not m.uses_fft_conv(x) and m.uses_fft_conv(torch.zeros(100, 1, 28, 28))
    assert create_model("cnn_maxpool", conv_impl="fft").uses_fft_conv(x[:2])
    assert not create_model("cnn_maxpool", conv_impl="direct").uses_fft_conv(x)
    monkeypatch.setenv("CAPSBENCH_CONV", "direct")
    assert not m.uses_fft_conv(x)
    monkeypatch.setenv("CAPSBENCH_CONV", "fft")
    assert m.uses_fft_conv(x[:2])
    monkeypatch.setenv("CAPSBENCH_CONV", "fast")
    with pytest.raises(ValueError, match="CAPSBENCH_CONV must be one of auto, direct, fft, got 'fast'"):
        m(x)
    with pytest.raises(ValueError, match="conv_impl must be one of auto, direct, fft"):
        create_model("cnn_maxpool", conv_impl="winograd")


@pytest.mark.parametrize("conv_impl", ["fft", "direct"])
@pytest.mark.parametrize("size", [28, 40])
def test_max_pooling_cnn_fast_first_block_is_the_plain_one(conv_impl, size):
    """conv1 by GEMM, pooled before the ReLU in the DFT's layout (training) and a few images at a
    time (inference): the values and every parameter gradient of pool(relu(conv1(x))), in
    float64, with blank rows whose patches tie (conv1 gives them its bias)."""
    from capsbench.models.base import record_stages
    from capsbench.models.baselines import cnn

    torch.manual_seed(0)
    m = create_model("cnn_maxpool", input_size=size, conv_impl=conv_impl).double()
    B = cnn.INFER_CHUNK * 2 + 7
    x = torch.rand(B, 1, size, size, dtype=torch.float64)
    x[:, :, :8] = 0
    y = torch.randint(0, 10, (B,))
    runs = []
    for plain in (False, True):  # the stage recorder switches the fast paths off
        m.zero_grad()
        with record_stages() if plain else contextlib.nullcontext():
            out = m(x).scores
            F.cross_entropy(out, y).backward()
            with torch.inference_mode():
                inf = m(x).scores
        runs.append((out.detach(), inf, [p.grad.clone() for p in m.parameters()]))
    (oa, ia, ga), (ob, ib, gb) = runs
    torch.testing.assert_close(oa, ob, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ia, ib, rtol=1e-12, atol=1e-12)
    for p, q in zip(ga, gb, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
