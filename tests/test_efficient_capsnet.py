"""Efficient-CapsNet (Mazzia et al. 2021): the paper's parameter count, its routing against a
literal per-capsule implementation, its squash, and its input-size rule."""

from __future__ import annotations

import math

import pytest
import torch

from capsbench import ConfigError, create_model
from capsbench.cli.main import main
from capsbench.models.efficient_capsnet import self_attention_routing, squash_exp


def test_the_papers_161k_trainable_parameters_without_the_decoder():
    m = create_model("efficient_capsnet")
    n = sum(p.numel() for name, p in m.named_parameters() if not name.startswith("decoder"))
    assert n == 832 + 18_496 + 36_928 + 73_856 + 576 + 10_496 + 20_480 + 160 == 161_824
    assert create_model("efficient_capsnet", reconstruction=False).decoder is None


def _literal_routing(u, W, b):
    """The paper's Eqs. 4-7, one sample, class and capsule at a time, from plain sums."""
    B, n_in, _ = u.shape
    n_out, _, _, D = W.shape
    v = torch.zeros(B, n_out, D, dtype=u.dtype)
    coupling = torch.zeros(B, n_in, n_out, dtype=u.dtype)
    for s in range(B):
        u_hat = [[u[s, i] @ W[k, i] for i in range(n_in)] for k in range(n_out)]
        a = [[sum(float(u_hat[k][i] @ u_hat[k][j]) for j in range(n_in)) / math.sqrt(D) for i in range(n_in)]
             for k in range(n_out)]
        for i in range(n_in):
            z = sum(math.exp(a[k][i]) for k in range(n_out))
            for k in range(n_out):
                coupling[s, i, k] = math.exp(a[k][i]) / z + b[k, i]
        for k in range(n_out):
            sk = sum(coupling[s, i, k] * u_hat[k][i] for i in range(n_in))
            norm = float(sk.norm())
            v[s, k] = (1 - 1 / math.exp(norm)) * sk / norm
    return v, coupling


def test_self_attention_routing_is_the_literal_procedure():
    torch.manual_seed(0)
    u = squash_exp(torch.randn(3, 16, 8, dtype=torch.float64))
    W = torch.randn(10, 16, 8, 16, dtype=torch.float64) * 0.3
    b = torch.randn(10, 16, dtype=torch.float64) * 0.1
    v, c = self_attention_routing(u, W, b, keep_coupling=True)
    v_ref, c_ref = _literal_routing(u, W, b)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c, c_ref, rtol=1e-10, atol=1e-12)


def test_the_model_routes_its_own_primary_capsules():
    torch.manual_seed(0)
    m = create_model("efficient_capsnet").double().eval()
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    out = m(x, keep_coupling=True)
    v_ref, c_ref = _literal_routing(m.primary_capsules(x), m.W.detach(), m.b.detach())
    torch.testing.assert_close(out.poses, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.coupling, c_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.scores, (v_ref.square().sum(-1) + 1e-7).sqrt())


def test_squash_keeps_direction_and_maps_lengths_below_one():
    s = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]], dtype=torch.float64, requires_grad=True)
    v = squash_exp(s)
    torch.testing.assert_close(v[0], torch.tensor([3.0, 4.0], dtype=torch.float64) / 5 * (1 - math.exp(-5)))
    assert v[1].abs().sum() == 0
    v.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_only_28x28_inputs_with_one_clear_line(tmp_path, capsys, data_root):
    with pytest.raises(ConfigError, match="takes 28x28 inputs only"):
        create_model("efficient_capsnet", input_size=40)
    rc = main(["run", "--suite", "affnist", "--models", "efficient_capsnet", "--profile", "smoke",
               "--out", str(tmp_path), "--data-root", str(data_root)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "'efficient_capsnet' takes 28x28 inputs, but protocol 'canvas40_random' trains on 40x40" in err[0]
