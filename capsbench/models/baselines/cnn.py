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

from capsbench.models.base import Classifier, ModelOutput, mark, recording
from capsbench.models.kernels.fft_conv import check_conv_impl, fft_conv2d, gemm_conv2d, wants_fft
from capsbench.models.registry import register_model

# The second convolution (512 -> 256 channels, 5x5, on a 12x12 map; 18x18 at 40x40) is almost
# all of the network's arithmetic (419 of 434 MFLOP per image forward at 28x28). On CPUs it runs
# through the DFT (models/kernels/fft_conv.py; the same convolution to float32 rounding) in float32
# from batch FFT_CONV_MIN_BATCH in training and FFT_CONV_MIN_INFER_BATCH in inference on 28x28
# inputs, as CapsNet's PrimaryCaps does: `capsbench speed --model cnn_maxpool --conv fft|direct
# --variants fp32 --batch-sizes 32` (2-core Intel Xeon, 2026-12-05) trained at 238 vs 161 images/s
# with AVX-512 and 188 vs 101 with AVX2 only (CAPSBENCH_CPU_ISA=avx2); batch 8 trained slower by
# the DFT (105 vs 84 ms per step: the weight transform costs the same at any batch size). The
# DFT spreads its rounding error evenly over the weight gradient instead of scaling it with each
# entry, so a DFT run departs from a direct one like another seed; validation accuracy over three
# seeds is the same either way (docs/performance.md#pooling-cnns-by-the-dft, tests/benchmarks/
# tune_quick.py). 40x40 inputs (affNIST's canvas) stay direct by default, as CapsNet's do; "direct"
# or "fft" (conv_impl or CAPSBENCH_CONV) forces either.
FFT_CONV_MAX_INPUT = 28
FFT_CONV_MIN_BATCH = 32
FFT_CONV_MIN_INFER_BATCH = 100
# In inference the first convolution's output (512 maps of 24x24: 1.2 MB per image) is made and
# pooled a few images at a time, so it stays in cache, and pooled before the ReLU (they commute:
# the same values); 0.57 vs 0.95 s per 500 images for that stage, AVX2 only.
INFER_CHUNK = 25


def _pool2(h: torch.Tensor, dh: int, dw: int) -> torch.Tensor:
    """2x2 max-pooling (stride 2, odd edges dropped) of dimensions ``dh`` and ``dw`` (dh < dw),
    in whatever layout ``h`` is: the values of ``F.max_pool2d(h, 2)``. Its gradient splits a
    tie evenly where max_pool2d gives it to one entry; ties are a patch's copies of one value
    (all-zero patches give conv1 its bias), so the parameters' gradients are the same."""
    H, W = h.shape[dh], h.shape[dw]
    h = h.narrow(dh, 0, H // 2 * 2).narrow(dw, 0, W // 2 * 2)
    h = h.unflatten(dw, (W // 2, 2)).unflatten(dh, (H // 2, 2))
    return h.amax((dh + 1, dw + 2))


class PoolingCNN(Classifier):
    """conv 512 5x5 - down - conv 256 5x5 - down - FC 1024 - FC classes.

    Args:
        downsample: "maxpool" (2x2 max-pooling) or "strided" (2x2 stride-2 convolution).
        dropout: probability of dropout before the last layer (0 disables it).
        conv_impl: how the second convolution runs: "auto" (the DFT on CPUs in float32 on 28x28
            inputs from the batch sizes above, else direct; $CAPSBENCH_CONV overrides it),
            "direct" (F.conv2d) or "fft" (models/kernels/fft_conv.py, the same convolution to
            float32 rounding).
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
        return wants_fft(self.conv_impl, x, self.conv2.weight, FFT_CONV_MIN_BATCH, FFT_CONV_MIN_INFER_BATCH,
                         FFT_CONV_MAX_INPUT)

    def _first_block(self, x: torch.Tensor) -> torch.Tensor:
        """conv1, ReLU, 2x2 max-pool (the same values as ``pool(relu(conv1(x)))``).

        None (the plain layers) in training. In inference, a few images at a time, so the 24x24
        maps stay in cache, pooled before the ReLU (they commute); where the second convolution
        runs by the DFT, conv1 as a GEMM into the (H, W, B, C) layout the DFT reads without a
        copy. Not while the stage profiler records: it times conv and pool apart."""
        if self.downsample != "maxpool" or recording() or torch.is_grad_enabled() or x.shape[0] <= INFER_CHUNK:
            return None
        if self.uses_fft_conv(x):
            h = torch.cat([self._gemm_pool(xb) for xb in x.split(INFER_CHUNK)], dim=2)  # (H, W, B, C)
            return h.permute(2, 3, 0, 1)
        return torch.cat([F.relu(_pool2(self.conv1(xb), 2, 3)) for xb in x.split(INFER_CHUNK)])

    def _gemm_pool(self, x: torch.Tensor) -> torch.Tensor:
        w = self.conv1.weight
        h = gemm_conv2d(x.to(w.dtype), w, self.conv1.bias).permute(2, 3, 0, 1)  # (H, W, B, C), dense
        return F.relu(_pool2(h, 0, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> ModelOutput:
        down = "pool" if self.downsample == "maxpool" else "strided_conv"
        h = self._first_block(x)
        if h is None:
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
