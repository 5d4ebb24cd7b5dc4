"""Efficient-CapsNet (Mazzia, Salvetti & Chiaberge 2021, "Efficient-CapsNet: Capsule Network with
Self-Attention Routing", Scientific Reports 11:14634), the paper's MNIST architecture.

* Stem: conv 32 5x5, conv 64 3x3, conv 64 3x3, conv 128 3x3 stride 2, each valid, ReLU and then
  batch normalisation (28 -> 24 -> 22 -> 20 -> 9).
* PrimaryCaps: a depthwise 9x9 convolution (128 channels, one 9x9 filter each) turns the 9x9x128
  map into 128 numbers, read as 16 capsules of 8 dimensions; squashed.
* FCCaps, self-attention routing (no iterations): every primary capsule i predicts every class
  capsule k, u_hat[k, i] = u_i W[k, i] (W: 10 x 16 x 8 x 16); the agreement of prediction i with
  all predictions for k, a[k, i] = u_hat[k, i] . sum_j u_hat[k, j] / sqrt(16), is softmaxed over the
  classes k, a learned bias b[k, i] added, and s_k = sum_i (softmax(a)[k, i] + b[k, i]) u_hat[k, i].
* Squash (the paper's): v = (1 - 1 / exp(|s|)) s / |s|; class scores are the capsule lengths.
* Loss: the margin loss (m+ 0.9, m- 0.1, lambda 0.5) plus 0.392 times the mean squared error of a
  reconstruction (decoder FC 512 - 1024 - 784, sigmoid; the class capsule of the label while
  training, of the prediction otherwise), i.e. 0.0005 times the summed squared error, as CapsNet's.

161,824 trainable parameters without the decoder, the paper's "161K" (its Table 1): convolutions
832 + 18,496 + 36,928 + 73,856, batch normalisation 2 x (32 + 64 + 64 + 128) = 576, depthwise
PrimaryCaps 128 x 81 + 128 = 10,496, W 20,480 and b 160 (tests/test_efficient_capsnet.py).

Written from the paper and the layer definitions of its authors' TensorFlow release
(github.com/EscVM/Efficient-CapsNet, utils/layers.py and models/efficient_capsnet_graph_mnist.py):
Keras' batch normalisation (epsilon 1e-3, moving averages kept at 0.99: PyTorch momentum 0.01),
its he_normal initialisation of the convolutions and of W (a truncated normal with standard deviation sqrt(2 / fan_in),
fan_in = 8 x 10 x 16 as Keras counts it for a 4-D kernel) and zero b. The paper's training recipe
(Adam 5e-3 decayed by 0.98 per epoch, batch 16, 100 epochs, shifts and rotations) is not copied:
here it trains in the profile every model shares.

Only 28x28 inputs: the 9x9 depthwise PrimaryCaps needs the stem's 9x9 map (affNIST's 40x40 canvas
would give 15x15; the paper has no 40x40 model).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from capsbench.errors import ConfigError
from capsbench.models.base import Classifier, ModelOutput, mark
from capsbench.models.capsnet import CapsNet
from capsbench.models.registry import register_model

LENGTH_EPS = 1e-7  # Keras' backend epsilon, inside the square root of the capsule length


def squash_exp(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The paper's squash: (1 - 1 / exp(|s|)) s / |s| (0 for s = 0)."""
    n = torch.linalg.vector_norm(s, dim=dim, keepdim=True)
    return (1.0 - torch.exp(-n)) * s / n.clamp_min(torch.finfo(s.dtype).tiny)


def self_attention_routing(u: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
                           keep_coupling: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class capsules v (B, n_out, D) from primary capsules u (B, n_in, d), W (n_out, n_in, d, D)
    and b (n_out, n_in); with ``keep_coupling`` also the coefficients softmax(a) + b, (B, n_in, n_out)."""
    u_hat = torch.einsum("bid,kidz->bkiz", u, W)  # (B, n_out, n_in, D)
    total = u_hat.sum(dim=2, keepdim=True)  # sum_j u_hat[k, j]
    a = (u_hat * total).sum(dim=-1) / math.sqrt(W.shape[-1])  # (B, n_out, n_in)
    c = a.softmax(dim=1) + b
    s = (c.unsqueeze(-1) * u_hat).sum(dim=2)  # (B, n_out, D)
    return squash_exp(s), (c.transpose(1, 2) if keep_coupling else None)


def _he_normal(t: torch.Tensor, fan_in: int) -> None:
    """Keras' he_normal: a normal truncated at two standard deviations, scaled so that its
    standard deviation is sqrt(2 / fan_in)."""
    std = math.sqrt(2.0 / fan_in) / 0.87962566103423978
    with torch.no_grad():
        nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)


class EfficientCapsNet(Classifier):
    """Efficient-CapsNet for 28x28 single-channel digits (see the module docstring).

    Args:
        num_classes: class capsules (10).
        input_size: must be 28.
        in_chans: input channels (1).
        reconstruction: train with the decoder's reconstruction loss (the paper's).
        recon_weight: weight of the summed squared reconstruction error (0.0005 = the paper's
            0.392 on the per-pixel mean).
    """

    family = "capsule"

    def __init__(self, num_classes: int = 10, input_size: int = 28, in_chans: int = 1,
                 reconstruction: bool = True, recon_weight: float = 0.0005) -> None:
        super().__init__(num_classes=num_classes, input_size=input_size)
        if input_size != 28:
            raise ConfigError(f"Efficient-CapsNet takes 28x28 inputs only (its 9x9 depthwise PrimaryCaps needs the "
                             f"stem's 9x9 map), got {input_size}x{input_size}; use capsnet for this suite")
        self.m_plus, self.m_minus, self.lambda_ = 0.9, 0.1, 0.5
        self.recon_weight = recon_weight
        layers: list[nn.Module] = []
        for cin, cout, k, stride in ((in_chans, 32, 5, 1), (32, 64, 3, 1), (64, 64, 3, 1), (64, 128, 3, 2)):
            conv = nn.Conv2d(cin, cout, k, stride=stride)
            _he_normal(conv.weight, cin * k * k)
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True), nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)]
        self.stem = nn.Sequential(*layers)
        self.primary = nn.Conv2d(128, 128, 9, groups=128)
        self.num_primary, self.primary_dim, self.digit_dim = 16, 8, 16
        self.W = nn.Parameter(torch.empty(num_classes, self.num_primary, self.primary_dim, self.digit_dim))
        _he_normal(self.W, self.primary_dim * num_classes * self.num_primary)
        self.b = nn.Parameter(torch.zeros(num_classes, self.num_primary))
        self.decoder = None
        if reconstruction:
            self.decoder = nn.Sequential(
                nn.Linear(num_classes * self.digit_dim, 512), nn.ReLU(inplace=True),
                nn.Linear(512, 1024), nn.ReLU(inplace=True),
                nn.Linear(1024, in_chans * input_size * input_size), nn.Sigmoid(),
            )

    def primary_capsules(self, x: torch.Tensor) -> torch.Tensor:
        h = mark(self.stem(x), "conv")
        p = self.primary(h).flatten(1)  # (B, 128): capsule n is channels 8n .. 8n + 7
        return mark(squash_exp(p.view(-1, self.num_primary, self.primary_dim)), "primary_caps")

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, keep_coupling: bool = False) -> ModelOutput:
        u = self.primary_capsules(x)
        v, c = self_attention_routing(u, self.W, self.b, keep_coupling)
        v = mark(v, "routing")
        lengths = torch.sqrt((v * v).sum(dim=-1) + LENGTH_EPS)
        recon = None
        if self.decoder is not None:
            labels = y if (self.training and y is not None) else lengths.argmax(dim=1)
            mask = F.one_hot(labels, self.num_classes).to(v.dtype)
            recon = mark(self.decoder((v * mask.unsqueeze(-1)).flatten(1)), "decoder")
        return ModelOutput(scores=lengths, poses=v, reconstruction=recon, coupling=c)

    # CapsNet's margin loss and reconstruction term, with the same m+, m-, lambda and weight
    margin_loss = CapsNet.margin_loss
    loss = CapsNet.loss

    def confidence(self, out: ModelOutput) -> torch.Tensor:
        return out.scores.float().clamp(0.0, 1.0)


@register_model("efficient_capsnet", family="capsule", paper="Mazzia et al. 2021", input_sizes=(28,))
def efficient_capsnet(**kw) -> EfficientCapsNet:
    """Efficient-CapsNet (self-attention routing), the paper's MNIST model."""
    return EfficientCapsNet(**kw)
