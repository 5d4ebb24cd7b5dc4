"""Model facts the paper and the issue state: sizes, routing, squash, losses, masking."""

from __future__ import annotations

import pytest
import torch

from capsbench import ConfigError, create_model, list_models
from capsbench.models import count_parameters, model_info
from capsbench.models.capsnet import CapsNet, dynamic_routing
from capsbench.models.routing import squash

EXPECTED_PARAMS_28 = {
    "capsnet": 8_215_568,
    "capsnet_r1": 8_215_568,
    "capsnet_uniform": 8_215_568,
    "capsnet_norecon": 6_804_224,
    "lenet5": 61_706,
    "cnn_sabour": 35_445_522,
    "cnn_maxpool": 7_495_946,
    "cnn_strided": 7_495_946 + 512 * 512 * 4 + 512 + 256 * 256 * 4 + 256,
    # the paper's 161,824 and the decoder's 160*512+512 + 512*1024+1024 + 1024*784+784
    "efficient_capsnet": 161_824 + 1_411_344,
    "steerable_c8": 82_026,  # the steerable basis ties most of each filter
}


@pytest.mark.parametrize("name,count", sorted(EXPECTED_PARAMS_28.items()))
def test_parameter_counts_at_28(name, count):
    assert count_parameters(create_model(name, input_size=28)) == count


def test_parameter_counts_without_the_decoder():
    assert count_parameters(create_model("capsnet"), decoder=False) == EXPECTED_PARAMS_28["capsnet_norecon"]
    assert count_parameters(create_model("efficient_capsnet"), decoder=False) == 161_824
    assert count_parameters(create_model("lenet5"), decoder=False) == EXPECTED_PARAMS_28["lenet5"]


def test_efficientnet_is_timm_b0_with_one_channel():
    m = create_model("efficientnet_b0")
    assert m.net.conv_stem.in_channels == 1
    assert m.net.classifier.out_features == 10
    assert 3_900_000 < count_parameters(m) < 4_100_000


def test_capsnet_at_40x40_has_4608_primary_capsules():
    m = CapsNet(input_size=40)
    assert m.num_primary == 12 * 12 * 32 == 4608
    out = m(torch.rand(2, 1, 40, 40))
    assert out.reconstruction.shape == (2, 1600)


def test_unknown_model_lists_known_names():
    with pytest.raises(ConfigError) as e:
        create_model("capsnett")
    assert "capsnet" in str(e.value) and "lenet5" in str(e.value)


def test_create_model_drops_none_kwargs():
    m = create_model("capsnet", routing_iters=None, input_size=None)
    assert m.routing_iters == 3 and m.input_size == 28


def test_variants():
    assert create_model("capsnet_r1").routing_iters == 1
    assert create_model("capsnet_norecon").decoder is None
    u = create_model("capsnet_uniform")
    out = u(torch.rand(2, 1, 28, 28), keep_coupling=True)
    assert torch.allclose(out.coupling, torch.full_like(out.coupling, 0.1))


def _literal_routing(u_hat: torch.Tensor, r: int):
    """Procedure 1 of the paper, written with explicit loops over capsules (slow, obvious).

    u_hat: (B, n_in, n_out, D). Returns v (B, n_out, D) and c (B, n_in, n_out).
    """
    B, n_in, n_out, D = u_hat.shape
    b = [[[u_hat.new_zeros(()) for _ in range(n_out)] for _ in range(n_in)] for _ in range(B)]
    for it in range(r):
        vs, cs = [], []
        for e in range(B):
            c = [torch.softmax(torch.stack(b[e][i]), dim=0) for i in range(n_in)]
            v = []
            for j in range(n_out):
                s_j = sum(c[i][j] * u_hat[e, i, j] for i in range(n_in))
                n2 = (s_j * s_j).sum()
                v.append(n2 / (1 + n2) * s_j / torch.sqrt(n2 + 1e-7))
            if it < r - 1:
                for i in range(n_in):
                    for j in range(n_out):
                        b[e][i][j] = b[e][i][j] + (u_hat[e, i, j] * v[j]).sum()
            vs.append(torch.stack(v))
            cs.append(torch.stack([torch.stack(list(ci)) for ci in c]))
    return torch.stack(vs), torch.stack(cs)


@pytest.mark.parametrize("r", [1, 2, 3, 5])
def test_fast_routing_matches_literal_procedure_outputs_and_gradients(r):
    torch.manual_seed(r)
    u = torch.randn(2, 6, 4, 5, dtype=torch.float64, requires_grad=True)  # (B, n_in, n_out, D)
    v_ref, c_ref = _literal_routing(u, r)
    v, c = dynamic_routing(u.permute(0, 2, 1, 3).contiguous(), r, keep_coupling=True)
    assert torch.allclose(v, v_ref, atol=1e-5) and torch.allclose(c, c_ref, atol=1e-5)
    g = torch.randn_like(v)
    (g_ref,) = torch.autograd.grad(v_ref, u, g)
    (g_fast,) = torch.autograd.grad(v, u, g)
    assert torch.allclose(g_fast, g_ref, atol=1e-5)


def test_routing_gradcheck():
    u = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: dynamic_routing(x, 3)[0], (u,))


def test_coupling_coefficients_sum_to_one_over_outputs():
    m = create_model("capsnet")
    with torch.no_grad():
        m.W.mul_(100)  # untrained predictions are tiny; make agreement large enough to route
    out = m(torch.rand(3, 1, 28, 28), keep_coupling=True)
    assert out.coupling.shape == (3, 1152, 10)
    assert torch.allclose(out.coupling.sum(dim=2), torch.ones(3, 1152), atol=1e-5)
    assert (out.coupling - 0.1).abs().max() > 1e-3  # routing moved them off uniform


def test_routing_logits_are_per_example():
    # The same image routes the same whether or not other images share its batch.
    m = create_model("capsnet").eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        alone = m(x[:1], keep_coupling=True).coupling
        batched = m(x, keep_coupling=True).coupling[:1]
    assert torch.allclose(alone, batched, atol=1e-5)


def test_squash_zero_vector_is_zero_with_finite_gradient():
    s = torch.zeros(3, 16, requires_grad=True)
    v = squash(s)
    assert torch.equal(v, torch.zeros_like(v))
    v.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_squash_lengths():
    s = torch.tensor([[3.0, 4.0]])  # |s| = 5 -> |v| = 25/26
    assert torch.allclose(squash(s).norm(dim=-1), torch.tensor([25 / 26]), atol=1e-6)


def test_margin_loss_equals_hand_computed_value():
    m = CapsNet(num_classes=3, reconstruction=False)
    lengths = torch.tensor([[0.95, 0.2, 0.05], [0.5, 0.6, 0.7]])
    y = torch.tensor([0, 2])
    # example 1: present 0 (0.95 > 0.9); absent 0.5*(0.2-0.1)^2 = 0.005; absent 0
    # example 2: absent 0.5*(0.4^2 + 0.5^2) = 0.205; present (0.9-0.7)^2 = 0.04
    expected = (0.005 + 0.205 + 0.04) / 2
    assert m.margin_loss(lengths, y).item() == pytest.approx(expected, abs=1e-6)


def test_reconstruction_loss_is_sse_times_0005():
    m = create_model("capsnet")
    x = torch.rand(2, 1, 28, 28)
    y = torch.tensor([1, 2])
    out = m(x, y)
    total = m.loss(out, x, y)
    sse = (out.reconstruction - x.flatten(1)).pow(2).sum(1).mean()
    assert total.item() == pytest.approx(m.margin_loss(out.scores, y).item() + 0.0005 * sse.item(), rel=1e-5)


def test_decoder_mask_uses_true_label_in_training_and_prediction_in_eval():
    torch.manual_seed(0)
    m = create_model("capsnet")
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        m.eval()
        out = m(x)
        pred = out.scores.argmax(1)
        wrong = (pred + 1) % 10
        assert torch.allclose(out.reconstruction, m.decode(out.poses, pred))
        # in eval mode a given label is ignored: the prediction masks
        assert torch.allclose(m(x, wrong).reconstruction, out.reconstruction)
        m.train()
        out_t = m(x, wrong)
        assert torch.allclose(out_t.reconstruction, m.decode(out_t.poses, wrong))
        assert not torch.allclose(out_t.reconstruction, m.decode(out_t.poses, pred))


@pytest.mark.parametrize("size", [28, 40])
@pytest.mark.parametrize("name", list_models())
def test_every_model_forward_backward(name, size):
    torch.manual_seed(0)
    sizes = model_info(name).get("input_sizes")
    if sizes and size not in sizes:  # a model for one input size says so in one line
        with pytest.raises(ConfigError, match=f"takes 28x28 inputs only.*got {size}x{size}"):
            create_model(name, input_size=size)
        return
    m = create_model(name, input_size=size)
    x = torch.rand(2, 1, size, size)
    y = torch.tensor([3, 7])
    m.train()
    out = m(x, y)
    assert out.scores.shape == (2, 10)
    loss = m.loss(out, x, y)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    conf = m.confidence(out)
    assert conf.shape == (2, 10) and (conf >= 0).all() and (conf <= 1).all()


class _RecordsBatches(torch.nn.Module):
    """A plug-in CNN that scores in batches of at most 3 and records the batches it is given
    (and that it is given them in inference mode: no autograd graph kept while scoring)."""

    inference_batch = 3

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(28 * 28, 10)
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(x.shape[0] if torch.is_inference_mode_enabled() else -1)
        return self.fc(x.flatten(1))


def test_predict_scores_in_batches_no_larger_than_the_models_inference_batch():
    from capsbench.models.base import PlainClassifier
    from capsbench.train.device import predict

    net = _RecordsBatches()
    x = torch.rand(10, 1, 28, 28)
    scores, _ = predict(PlainClassifier(net), x)  # default batch 500
    assert net.seen == [3, 3, 3, 1]
    torch.testing.assert_close(scores, net.fc(x.flatten(1)).detach())
    net.seen.clear()
    predict(PlainClassifier(net), x, batch_size=2)  # a smaller batch asked for stays
    assert net.seen == [2] * 5
    assert create_model("em_capsnet").inference_batch == 64
