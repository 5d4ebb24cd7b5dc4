"""Plain CNN baselines for the CapsNet comparisons.

* ``cnn_maxpool``: the baseline in the CapsNet authors' released code
  (github.com/Sarasra/models, research/capsules, ``conv_model``-style baseline): conv 512 5x5
  ReLU, 2x2 max-pool, conv 256 5x5 ReLU, 2x2 max-pool, FC 1024 ReLU, FC 10. Valid padding
  gives 7,495,946 parameters at 28x28, close to CapsNet's 8.2M, which is the point of the
  comparison (paper Section 5.2 compares with "a traditional convolutional model with a
  similar number of parameters" on affNIST).
* ``cnn_strided``: the same network with each max-pool replaced by a learned 2x2 stride-2
  convolution with as many output channels as inputs (the "all convolutional" substitution
  of Springenberg et al. 2015), so the pooling claim can be tested with everything else
  equal. The two extra convolutions add 1,310,976 parameters at any input size.
* ``cnn_sabour``: the paper's Table 1 baseline (Section 5): three conv layers of 256, 256
  and 128 channels, 5x5 kernels, stride 1, then FC 328, FC 192 and a 10-way output with
  dropout before it. Same padding and no pooling give exactly 35,445,522 parameters at
  28x28, the paper's 35.4M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capsbench.models.base import Classifier, ModelOutput, mark
from capsbench.models.kernels.fft_conv import check_conv_impl, fft_conv2d, wants_fft
from capsbench.models.registry import register_model

# The second convolution (512 -> 256 channels, 5x5, on a 12x12 map; 18x18 at 40x40) is almost
# all of the network's arithmetic (419 of 434 MFLOP per image forward at 28x28). With
# conv_impl="fft" (or CAPSBENCH_CONV=fft) it runs through the DFT (models/kernels/fft_conv.py; the same
# convolution to float32 rounding). On the 2-core build machine `capsbench speed --model
# cnn_maxpool --conv fft|direct --device cpu --variants fp32 --batch-sizes 32,100 --infer-batch
# 500` gave steps of 148 vs 263 ms at batch 32 and 329 vs 791 ms at 100, inference at 500 0.71 vs
# 1.32 s; in an alternating-step script batch 8 trained slower by the DFT (105 vs 84 ms: the
# weight transform costs the same at any batch size) and 40x40 inputs at batch 32 faster (469
# vs 796 ms). It is not the default ("auto" is "direct"): the DFT's rounding error is spread
# evenly over the weight gradient instead of scaling with each entry, Adam divides every entry
# by its own running magnitude, and this ReLU + max-pooling network's trajectory then departs
# from the direct one's like another seed's (tests/benchmarks/conv_drift.py). The quick
# rotation suite (seed 0) reached 97.8% clean accuracy against 98.1% direct, cells differing by
# up to 1.7 points (docs/performance.md), where CapsNet's DFT path keeps its smoke-suite accuracies.


class PoolingCNN(Classifier):
    """conv 512 5x5 - down - conv 256 5x5 - down - FC 1024 - FC classes.

    Args:
        downsample: "maxpool" (2x2 max-pooling) or "strided" (2x2 stride-2 convolution).
        dropout: probability of dropout before the last layer (0 disables it).
        conv_impl: how the second convolution runs: "auto" (= "direct" unless $CAPSBENCH_CONV
            says otherwise), "direct" (F.conv2d) or "fft" (models/kernels/fft_conv.py, the same
            convolution to float32 rounding; on CPUs faster in training from batch 16 and in
            inference from batch 32; see above).
    """

    family = "cnn"

    def __init__(
        self,
        num_classes: int = 10,
        input_size: int = 28,
        in_chans: int = 1,
        downsample: str = "maxpool",
        dropout: float = 0.0,
        conv_impl: str = "auto",
    ) -> None:
        super().__init__(num_classes=num_classes, input_size=input_size)
        if downsample not in ("maxpool", "strided"):
            raise ValueError(f"downsample must be 'maxpool' or 'strided', got {downsample!r}")
        self.downsample = downsample
        self.conv_impl = check_conv_impl(conv_impl)
        self.conv1 = nn.Conv2d(in_chans, 512, 5)
        self.conv2 = nn.Conv2d(512, 256, 5)
        if downsample == "strided":
            self.down1 = nn.Conv2d(512, 512, 2, stride=2)
            self.down2 = nn.Conv2d(256, 256, 2, stride=2)
        else:
            self.down1 = nn.MaxPool2d(2)
            self.down2 = nn.MaxPool2d(2)
        side = ((input_size - 4) // 2 - 4) // 2  # 28 -> 24 -> 12 -> 8 -> 4; 40 -> 7
        self.fc1 = nn.Linear(256 * side * side, 1024)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(1024, num_classes)

    def uses_fft_conv(self, x: torch.Tensor) -> bool:
        """Whether the second convolution runs by the DFT for the model input ``x``."""
        return wants_fft(self.conv_impl, x, self.conv2.weight)  # no thresholds: "auto" is "direct"

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> ModelOutput:
        down = "pool" if self.downsample == "maxpool" else "strided_conv"
        h = mark(self.down1(mark(F.relu(self.conv1(x)), "conv")), down)
        if self.uses_fft_conv(x):  # in the weights' precision even under autocast (conv_impl="fft")
            with torch.autocast(device_type=x.device.type, enabled=False):
                h = fft_conv2d(h.to(self.conv2.weight.dtype), self.conv2.weight, self.conv2.bias)
        else:
            h = self.conv2(h)
        h = mark(self.down2(mark(F.relu(h), "conv")), down)
        h = F.relu(self.fc1(h.flatten(1)))
        return ModelOutput(scores=mark(self.fc2(self.dropout(h)), "fc"))


class SabourCNN(Classifier):
    """The paper's Table 1 baseline: conv 256-256-128 (5x5, same), FC 328-192, dropout, FC."""

    family = "cnn"

    def __init__(
        self, num_classes: int = 10, input_size: int = 28, in_chans: int = 1, dropout: float = 0.5
    ) -> None:
        super().__init__(num_classes=num_classes, input_size=input_size)
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 256, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 128, 5, padding=2),
            nn.ReLU(inplace=True),
        )
        self.fc1 = nn.Linear(128 * input_size * input_size, 328)
        self.fc2 = nn.Linear(328, 192)
        self.dropout = nn.Dropout(dropout)
        self.fc3 = nn.Linear(192, num_classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> ModelOutput:
        h = mark(self.features(x), "conv").flatten(1)
        h = F.relu(self.fc2(F.relu(self.fc1(h))))
        return ModelOutput(scores=mark(self.fc3(self.dropout(h)), "fc"))


@register_model("cnn_maxpool", family="cnn", paper="Sabour et al. 2017 released baseline")
def cnn_maxpool(**kw) -> PoolingCNN:
    return PoolingCNN(**{"downsample": "maxpool", **kw})


@register_model("cnn_strided", family="cnn", paper="ablation (Springenberg et al. 2015)")
def cnn_strided(**kw) -> PoolingCNN:
    return PoolingCNN(**{"downsample": "strided", **kw})


@register_model("cnn_sabour", family="cnn", paper="Sabour et al. 2017, Table 1 baseline")
def cnn_sabour(**kw) -> SabourCNN:
    return SabourCNN(**kw)
