"""Micro-benchmarks (pytest-benchmark): CapsNet's hot spots and two small training steps.

Timed:   pytest tests/benchmarks --benchmark-only   (tox -e bench)
Default: with ``--benchmark-disable`` in addopts each benchmark runs once, as a plain test,
         so the assertions on its result are checked in the default tier too.

Every benchmark checks what it computed (shapes, finiteness, a reference value), so a fast
but wrong kernel fails here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from capsbench.models import create_model
from capsbench.models.capsnet import dynamic_routing
from capsbench.models.routing import squash
from capsbench.perf.timing import make_train_step


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_squash(benchmark):
    s = torch.randn(128, 10, 16, generator=_gen())
    v = benchmark(squash, s)
    assert v.shape == (128, 10, 16)
    assert torch.isfinite(v).all()
    norms = v.norm(dim=-1)
    assert (norms < 1).all() and (norms > 0).all()
    # direction kept, length |s|^2 / (1 + |s|^2)
    assert (F.cosine_similarity(v, s, dim=-1) > 0.9999).all()
    sq = (s * s).sum(-1)
    torch.testing.assert_close(norms, sq / (1 + sq), rtol=1e-4, atol=1e-6)


def test_dynamic_routing_forward_backward(benchmark):
    u_hat = (torch.randn(32, 10, 1152, 16, generator=_gen(1)) * 0.05).requires_grad_()
    weight = torch.randn(32, 10, 16, generator=_gen(2))

    def route():
        u_hat.grad = None
        v, _ = dynamic_routing(u_hat, 3)
        (v * weight).sum().backward()
        return v

    v = benchmark.pedantic(route, rounds=10, warmup_rounds=1)
    assert v.shape == (32, 10, 16)
    assert torch.isfinite(v).all() and (v.norm(dim=-1) < 1).all()
    assert u_hat.grad is not None and u_hat.grad.shape == u_hat.shape
    assert torch.isfinite(u_hat.grad).all() and u_hat.grad.abs().sum() > 0


def test_u_hat_predictions(benchmark):
    torch.manual_seed(0)
    model = create_model("capsnet")
    u = squash(torch.randn(32, 1152, 8, generator=_gen(3)))

    def predict():
        with torch.no_grad():
            return model.predictions(u)

    u_hat = benchmark(predict)
    assert u_hat.shape == (32, 10, 1152, 16) and u_hat.is_contiguous()
    assert torch.isfinite(u_hat).all()
    with torch.no_grad():  # u_hat[b, j, i] = u[b, i] @ W_ij
        ref = torch.einsum("bik,ikm->bim", u, model.W).view(32, 1152, 10, 16).permute(0, 2, 1, 3)
    torch.testing.assert_close(u_hat, ref, rtol=1e-4, atol=1e-6)


def _train_step_benchmark(benchmark, name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(8, 1, 28, 28, generator=_gen(4))
    y = torch.randint(0, 10, (8,), generator=_gen(5))
    before = [p.detach().clone() for p in model.parameters()]
    loss = benchmark.pedantic(make_train_step(model, opt, x, y), rounds=5, warmup_rounds=1)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters(), strict=True))
    assert changed == len(before)  # Adam moved every parameter
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_capsnet_train_step(benchmark):
    _train_step_benchmark(benchmark, "capsnet")


def test_cnn_maxpool_train_step(benchmark):
    _train_step_benchmark(benchmark, "cnn_maxpool")
