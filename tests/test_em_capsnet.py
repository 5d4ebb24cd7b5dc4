"""Matrix capsules with EM routing (Hinton et al. 2018): the parameter count of the paper's smaller
network, every capsule layer against a literal per-parent, per-child implementation of the
paper's Procedure 1 (values and gradients), the spread loss and its margin schedule, and the
input-size rule."""

from __future__ import annotations

import math

import pytest
import torch

from capsbench import ConfigError, create_model
from capsbench.cli.main import main
from capsbench.models import em_capsnet
from capsbench.models.em_capsnet import VAR_EPS, ConvCaps, inverse_temperatures


def _literal_em(votes: dict, acts: dict, parents: list, beta_u, beta_a, iters: int, scale: float):
    """Procedure 1 of the paper, one parent and one child at a time.

    votes[(i, j)]: the 16-vector vote of child i for parent j = (position, type); acts[i]: a_i.
    Returns {j: (mu_j, a_j)}.
    """
    children_of: dict = {j: [] for j in parents}
    parents_of: dict = {}
    for i, j in votes:
        children_of[j].append(i)
        parents_of.setdefault(i, []).append(j)
    R = {(i, j): 1.0 / len(parents_of[i]) for i, j in votes}
    lambdas = inverse_temperatures(iters)
    out = {}
    for t in range(iters):
        for j in parents:  # M-step
            kids = children_of[j]
            r = torch.stack([R[i, j] * acts[i] for i in kids])
            total = r.sum()
            v = torch.stack([votes[i, j] for i in kids])
            mu = (r[:, None] * v).sum(0) / total
            var = (r[:, None] * (v - mu) ** 2).sum(0) / total + VAR_EPS
            cost = (beta_u[j[1]] + 0.5 * torch.log(var)) * total * scale
            out[j] = (mu, var, torch.sigmoid(lambdas[t] * (beta_a[j[1]] - cost.sum())))
        if t == iters - 1:
            break
        for i, js in parents_of.items():  # E-step
            ap = []
            for j in js:
                mu, var, a = out[j]
                p = torch.exp(-((votes[i, j] - mu) ** 2 / (2 * var)).sum()) / torch.sqrt(torch.prod(2 * math.pi * var))
                ap.append(a * p)
            total = sum(ap)
            for j, x in zip(js, ap, strict=True):
                R[i, j] = x / total
    return {j: (mu, a) for j, (mu, _, a) in out.items()}


def _literal_conv_caps(layer: ConvCaps, pose: torch.Tensor, act: torch.Tensor):
    """One sample: pose (H, W, C, 16), act (H, W, C) -> (Ho, Wo, J, 16), (Ho, Wo, J)."""
    h, w, cin = act.shape
    k, s, cout = layer.k, layer.stride, layer.cout
    ho, wo = (h - k) // s + 1, (w - k) // s + 1
    votes, acts, parents = {}, {}, []
    for oy in range(ho):
        for ox in range(wo):
            for j in range(cout):
                parents.append(((oy, ox), j))
            for dy in range(k):
                for dx in range(k):
                    y, x = oy * s + dy, ox * s + dx
                    for c in range(cin):
                        child = ((y, x), c)
                        acts[child] = act[y, x, c]
                        for j in range(cout):
                            votes[child, ((oy, ox), j)] = (pose[y, x, c].view(4, 4) @ layer.W[dy * k + dx, c, j]).flatten()
    res = _literal_em(votes, acts, parents, layer.beta_u, layer.beta_a, layer.iters, 100.0 * cout / (k * k * cin))
    mu = torch.stack([torch.stack([torch.stack([res[(oy, ox), j][0] for j in range(cout)]) for ox in range(wo)])
                      for oy in range(ho)])
    a = torch.stack([torch.stack([torch.stack([res[(oy, ox), j][1] for j in range(cout)]) for ox in range(wo)])
                     for oy in range(ho)])
    return mu, a


def _literal_class_caps(layer, pose: torch.Tensor, act: torch.Tensor):
    """One sample: every child votes for every class, its position's centre added to the first
    two entries of the vote's right-hand column."""
    h, w, cin = act.shape
    votes, acts = {}, {}
    parents = [((0, 0), j) for j in range(layer.classes)]
    for y in range(h):
        for x in range(w):
            for c in range(cin):
                acts[(y, x), c] = act[y, x, c]
                for j in range(layer.classes):
                    v = pose[y, x, c].view(4, 4) @ layer.W[c, j]
                    v = v + torch.zeros(4, 4, dtype=v.dtype).index_put(
                        (torch.tensor([0, 1]), torch.tensor([3, 3])), torch.tensor([(y + 0.5) / h, (x + 0.5) / w],
                                                                                   dtype=v.dtype))
                    votes[((y, x), c), ((0, 0), j)] = v.flatten()
    res = _literal_em(votes, acts, parents, layer.beta_u, layer.beta_a, layer.iters,
                      100.0 * layer.classes / (h * w * cin))
    return torch.stack([res[p][0] for p in parents]), torch.stack([res[p][1] for p in parents])


def test_the_smaller_networks_68k_parameters():
    m = create_model("em_capsnet")
    parts = {name: sum(p.numel() for n, p in m.named_parameters() if n.startswith(name))
             for name in ("conv1", "primary", "conv_caps1", "conv_caps2", "class_caps")}
    assert parts == {"conv1": 1_664, "primary": 8_840, "conv_caps1": 18_432 + 32, "conv_caps2": 36_864 + 32,
                     "class_caps": 2_560 + 20}
    assert sum(p.numel() for p in m.parameters()) == 68_444  # the paper's "68K" (at 5 classes: 67,154)


@pytest.mark.parametrize("size,stride", [(5, 1), (7, 2)])
def test_conv_caps_is_the_literal_procedure_with_parents_competing_across_positions(size, stride):
    torch.manual_seed(0)
    layer = ConvCaps(2, 3, 3, stride, iters=3).double()
    with torch.no_grad():
        layer.beta_u.normal_(0, 0.5)
        layer.beta_a.normal_(0, 50.0)
    pose = torch.randn(2, size, size, 2, 16, dtype=torch.float64)
    act = torch.rand(2, size, size, 2, dtype=torch.float64)
    mu, a = layer(pose, act)
    assert 0.05 < a.min().item() and a.max().item() < 0.95  # the activations are not saturated
    for b in range(2):
        mu_ref, a_ref = _literal_conv_caps(layer, pose[b], act[b])
        # (E[V^2] - mu^2 for the variance costs some digits against the literal sum of squares)
        torch.testing.assert_close(mu[b], mu_ref, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(a[b], a_ref, rtol=1e-7, atol=1e-9)


def test_the_model_and_its_gradients_are_the_literal_procedure():
    torch.manual_seed(0)
    m = create_model("em_capsnet", A=8, B=2, C=3, D=2).double()
    x = torch.rand(1, 1, 28, 28, dtype=torch.float64)
    out = m(x)
    pose, act = m.primary_capsules(x)
    p, a = _literal_conv_caps(m.conv_caps1, pose[0], act[0])
    p, a = _literal_conv_caps(m.conv_caps2, p, a)
    mu_ref, a_ref = _literal_class_caps(m.class_caps, p, a)
    torch.testing.assert_close(out.poses[0], mu_ref, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(out.scores[0], a_ref, rtol=1e-7, atol=1e-9)
    # gradients: the votes' gradient is gathered by hand (em_capsnet._StackedVotes); autograd
    # through the literal loops is the reference
    weights = torch.randn(10, 16, dtype=torch.float64)
    names = [n for n, _ in m.named_parameters()]
    g = torch.autograd.grad((out.poses[0] * weights).sum() + 100 * out.scores.sum(), list(m.parameters()))
    g_ref = torch.autograd.grad((mu_ref * weights).sum() + 100 * a_ref.sum(), list(m.parameters()))
    for name, x1, x2 in zip(names, g, g_ref, strict=True):
        torch.testing.assert_close(x1, x2, rtol=1e-7, atol=1e-9, msg=name)
        assert x1.abs().sum() > 0, name


@pytest.mark.parametrize("piece_floats", [1, 1 << 30])  # one image a piece; the whole batch in one
def test_conv_votes_made_in_pieces_are_the_plain_product_and_its_gradient(piece_floats, monkeypatch):
    """_ConvVotes writes the votes and their squares piece by piece and turns the gathered
    gradient back piece by piece: the same values and gradients as autograd through one einsum."""
    monkeypatch.setattr(em_capsnet, "_PIECE_FLOATS", piece_floats)
    torch.manual_seed(0)
    layer = ConvCaps(3, 4, 3, 2, iters=2).double()
    pose = torch.randn(3, 7, 7, 3, 16, dtype=torch.float64, requires_grad=True)
    act = torch.rand(3, 7, 7, 3, dtype=torch.float64)
    index = em_capsnet.patch_index(7, 7, 3, 2)
    p = pose.reshape(3, 49, 3, 4, 4)[:, index]
    outer = em_capsnet._Outer()
    stacked = em_capsnet._ConvVotes.apply(p, layer.W, outer)
    votes = torch.einsum("blpcxy,pcjyz->bljxzpc", p, layer.W).reshape(3, 9, 4, 16, 27)
    torch.testing.assert_close(stacked, torch.cat([votes, votes.square()], dim=-2), rtol=1e-12, atol=1e-12)
    args = (act.reshape(3, 49, 3)[:, index].flatten(2), layer.beta_u, layer.beta_a, index, 49, 3, 2, None)
    mu, a = em_capsnet._route_stacked(stacked, outer, *args)
    mu_ref, a_ref = em_capsnet.em_routing(votes, *args[:-2], iters=2)
    weights = torch.randn_like(mu)
    params = [pose, layer.W, layer.beta_u, layer.beta_a]
    g = torch.autograd.grad((mu * weights).sum() + 100 * a.sum(), params, retain_graph=True)
    g_ref = torch.autograd.grad((mu_ref * weights).sum() + 100 * a_ref.sum(), params)
    for x1, x2, name in zip(g, g_ref, ("pose", "W", "beta_u", "beta_a"), strict=True):
        torch.testing.assert_close(x1, x2, rtol=1e-9, atol=1e-11, msg=name)


def test_spread_loss_and_its_margin_rising_from_0_2_to_0_9_over_half_the_budget():
    m = create_model("em_capsnet").eval()
    m.set_training_steps(10)
    a = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.3, 0.95]])
    y = torch.tensor([0, 2])
    out = type("O", (), {"scores": a})()
    # margin 0.2: sample 0 loses (0.2 - 0.1)^2 for class 1 only; sample 1 nothing
    assert m.loss(out, None, y).item() == pytest.approx(0.01 / 2)
    m.train()
    for _ in range(5):
        m.loss(out, None, y)
    assert m.margin().item() == pytest.approx(0.9)  # 5 steps counted: halfway through 10
    loss = m.loss(out, None, y).item()
    expected = ((0.9 - 0.1) ** 2 + (0.9 - 0.8) ** 2 + (0.9 - 0.75) ** 2 + (0.9 - 0.65) ** 2) / 2
    assert loss == pytest.approx(expected)
    m.eval()
    before = m.steps_seen.item()
    m.loss(out, None, y)
    assert m.steps_seen.item() == before  # evaluation does not move the schedule


def test_only_28x28_inputs_with_one_clear_line(tmp_path, capsys, data_root):
    with pytest.raises(ConfigError, match="takes 28x28 inputs only"):
        create_model("em_capsnet", input_size=40)
    rc = main(["run", "--suite", "affnist", "--models", "em_capsnet", "--profile", "smoke",
               "--out", str(tmp_path), "--data-root", str(data_root)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "'em_capsnet' takes 28x28 inputs" in err[0]
