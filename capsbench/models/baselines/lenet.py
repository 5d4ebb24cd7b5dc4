"""LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998, "Gradient-based learning applied to
document recognition"), in its common modern form: ReLU and max-pooling instead of the
original scaled tanh and trainable subsampling, full C3 connectivity, and a 10-way linear
output instead of the RBF layer. With padding 2 on the first convolution it has 61,706
parameters at 28x28.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capsbench.models.base import Classifier, ModelOutput, mark
from capsbench.models.registry import register_model


class LeNet5(Classifier):
    """conv 6@5x5 (pad 2) - pool - conv 16@5x5 - pool - FC 120 - FC 84 - FC classes."""

    family = "cnn"
    # on the 2-core build CPU (capsbench speed --variants fp32,fp32_cl): training at batch 8
    # 4,030 vs 3,020 images/s, at 128 14,400 vs 12,500; inference 40,100-43,500 vs 28,800-30,400
    cpu_channels_last = True

    def __init__(self, num_classes: int = 10, input_size: int = 28, in_chans: int = 1) -> None:
        super().__init__(num_classes=num_classes, input_size=input_size)
        self.conv1 = nn.Conv2d(in_chans, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        side = (input_size // 2 - 4) // 2  # 28 -> 28 -> 14 -> 10 -> 5; 40 -> 8
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> ModelOutput:
        h = mark(F.max_pool2d(mark(F.relu(self.conv1(x)), "conv"), 2), "pool")
        h = mark(F.max_pool2d(mark(F.relu(self.conv2(h)), "conv"), 2), "pool")
        h = F.relu(self.fc1(h.flatten(1)))
        h = F.relu(self.fc2(h))
        return ModelOutput(scores=mark(self.fc3(h), "fc"))


@register_model("lenet5", family="cnn", paper="LeCun et al. 1998")
def lenet5(**kw) -> LeNet5:
    return LeNet5(**kw)
