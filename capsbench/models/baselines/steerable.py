"""A rotation-equivariant CNN: a steerable CNN over the rotations by multiples of 45 degrees (C8),
built from e2cnn's layers (Weiler & Cesa 2019, "General E(2)-Equivariant Steerable CNNs",
NeurIPS; library: github.com/QUVA-Lab/e2cnn), the network Weiler & Cesa and Cohen & Welling
(2016, "Group Equivariant Convolutional Networks") built for rotated MNIST, sized to cost about
what the max-pooling CNN costs.

Every hidden feature is a *regular* field of C8: 8 channels that one rotation by 45 degrees
permutes cyclically, so a rotation of the input by a multiple of 90 degrees rotates every feature
map and permutes its channels exactly (45 degrees only up to the pixel grid's interpolation).
The filters are linear combinations of a fixed steerable basis; e2cnn expands them into plain
convolution weights (cached in eval mode).

* input padded from 28x28 to 29x29 (one zero row and column) so that every map has a centre
  pixel and the stride-2 poolings commute with rotations by 90 degrees (as e2cnn's MNIST example);
* R2Conv 1 (trivial) -> 8 regular fields (64 channels), 7x7, same padding; batch norm per field
  (e2cnn's InnerBatchNorm); ReLU; antialiased average pool, stride 2 (29 -> 15);
* R2Conv 8 -> 16 regular fields (128 channels), 5x5; BN; ReLU;
* R2Conv 16 -> 16 regular fields, 5x5; BN; ReLU; antialiased pool, stride 2 (15 -> 8);
* R2Conv 16 -> 32 regular fields (256 channels), 5x5; BN; ReLU;
* group pooling (the maximum over each field's 8 channels: invariant to the rotations), then the
  spatial mean over the 8x8 map: 32 numbers that do not change when the input turns by 90
  degrees; FC 64, batch norm, ELU, FC 10.

388 MFLOP per image forward (cnn_maxpool 443, CapsNet 406; capsbench.perf.flops) and 82,026
trainable parameters (the steerable basis ties most of each filter). Weiler & Cesa's best
MNIST-rot model (D16 restricted to C16, much larger) has a 0.68% test error, trained on rotated
digits; trained here on upright digits the network is invariant to quarter turns by
construction and to other angles only as far as its features interpolate.

Needs the optional dependency e2cnn (pure Python): ``pip install -e '.[equivariant]'``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from capsbench.errors import ConfigError
from capsbench.models.base import Classifier, ModelOutput, mark
from capsbench.models.registry import register_model

EXTRA = "pip install -e '.[equivariant]'"


def _e2cnn():
    try:
        from e2cnn import gspaces
        from e2cnn import nn as enn
    except ImportError as e:
        raise ConfigError(f"model 'steerable_c8' needs the e2cnn package ({e.name or 'e2cnn'} is missing): "
                          f"install the equivariant extra, {EXTRA}") from None
    return gspaces, enn


class SteerableCNN(Classifier):
    """C8-equivariant steerable CNN with a rotation-invariant head (module docstring)."""

    family = "cnn"

    def __init__(self, num_classes: int = 10, input_size: int = 28, rotations: int = 8,
                 fields: tuple[int, int, int, int] = (8, 16, 16, 32)) -> None:
        if input_size != 28:
            raise ConfigError(f"the steerable CNN takes 28x28 inputs only (its poolings are laid out for a 29x29 "
                              f"padded digit), got {input_size}x{input_size}; use cnn_maxpool for this suite")
        super().__init__(num_classes=num_classes, input_size=input_size)
        gspaces, enn = _e2cnn()
        self._enn = enn
        gs = gspaces.Rot2dOnR2(N=rotations)
        self.in_type = enn.FieldType(gs, [gs.trivial_repr])

        def regular(n: int):
            return enn.FieldType(gs, n * [gs.regular_repr])

        def block(t_in, t_out, k: int) -> list:
            return [enn.R2Conv(t_in, t_out, kernel_size=k, padding=k // 2, bias=False),
                    enn.InnerBatchNorm(t_out), enn.ReLU(t_out, inplace=True)]

        t = [self.in_type] + [regular(n) for n in fields]
        with warnings.catch_warnings():  # e2cnn 0.2.3 indexes with uint8 masks while it builds its bases
            warnings.filterwarnings("ignore", message="indexing with dtype torch.uint8")
            self.features = enn.SequentialModule(
                *block(t[0], t[1], 7), enn.PointwiseAvgPoolAntialiased(t[1], sigma=0.66, stride=2, padding=2),
                *block(t[1], t[2], 5),
                *block(t[2], t[3], 5), enn.PointwiseAvgPoolAntialiased(t[3], sigma=0.66, stride=2, padding=2),
                *block(t[3], t[4], 5),
            )
        self.gpool = enn.GroupPooling(t[4])
        width = self.gpool.out_type.size
        self.head = nn.Sequential(nn.Linear(width, 64), nn.BatchNorm1d(64), nn.ELU(inplace=True),
                                  nn.Linear(64, num_classes))
        # e2cnn's R2Conv caches its expanded filter as a buffer while in eval mode (and builds in
        # that state), so its state_dict depends on the mode. The cache is derived from the
        # weights: it is left out of every state_dict and rebuilt after loading.
        self._cached = {f"{name}.{attr}" for name, mod in self.named_modules() if isinstance(mod, enn.R2Conv)
                        for attr in ("filter", "expanded_bias")}
        self.train()

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for key in self._cached:
            sd.pop(prefix + key, None)
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        was_training = self.training
        self.train()  # drops the cached filters
        out = super().load_state_dict({k: v for k, v in state_dict.items() if k not in self._cached},
                                      strict=strict, assign=assign)
        self.train(was_training)  # eval mode expands the loaded weights again
        return out

    def invariant_features(self, x29: torch.Tensor) -> torch.Tensor:
        """(B, 32) rotation-invariant features of a (B, 1, 29, 29) padded batch."""
        g = self.gpool(self.features(self._enn.GeometricTensor(x29, self.in_type))).tensor
        return g.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> ModelOutput:
        feats = mark(self.invariant_features(F.pad(x, (0, 1, 0, 1))), "conv")
        return ModelOutput(scores=mark(self.head(feats), "fc"))


@register_model("steerable_c8", family="cnn", input_sizes=(28,), requires=("e2cnn", "equivariant"),
                paper="Weiler & Cesa 2019 (e2cnn), C8")
def steerable_c8(**kw) -> SteerableCNN:
    return SteerableCNN(**kw)
