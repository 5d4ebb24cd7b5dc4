"""EfficientNet-B0 (Tan & Le 2019) from timm, single-channel input, trained from scratch.

No pretrained weights are loaded: the comparison is between architectures trained on the
same data, and this machine cannot download weights anyway. At 28x28 the network's total
stride of 32 leaves a 1x1 map before global pooling; it still trains, and the architecture
is kept at timm's defaults so users get the network they know.

One change to the initialisation: the classifier (1280 -> 10) starts at zero. timm's
Google-style initialisation gives logits with a standard deviation of about 6 at the start
(initial cross-entropy about 6 instead of ln 10 = 2.3), and from scratch on MNIST the network
then spends hundreds of steps unlearning it: after 300 steps at batch 32 (same data, Adam
1e-3) we measured 80.5% test accuracy with the zeroed classifier and 39% training accuracy
without it.
"""

from __future__ import annotations

import torch

from capsbench.models.base import Classifier, ModelOutput, mark
from capsbench.models.registry import register_model


class TimmClassifier(Classifier):
    """Wraps a timm model so it returns :class:`ModelOutput`."""

    family = "cnn"
    # depthwise convolutions: on the 2-core build CPU (capsbench speed --variants fp32,fp32_cl)
    # training at batch 32 ran at 330 vs 182 images/s, at 128 618 vs 183, inference 3,490 vs 630-720
    cpu_channels_last = True

    def __init__(
        self, arch: str, num_classes: int = 10, input_size: int = 28, in_chans: int = 1, **kw
    ) -> None:
        super().__init__(num_classes=num_classes, input_size=input_size)
        import timm

        self.arch = arch
        self.net = timm.create_model(
            arch, pretrained=False, in_chans=in_chans, num_classes=num_classes, **kw
        )
        classifier = self.net.get_classifier()
        torch.nn.init.zeros_(classifier.weight)
        torch.nn.init.zeros_(classifier.bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> ModelOutput:
        feats = mark(self.net.forward_features(x), "conv")  # stem, blocks, head conv
        return ModelOutput(scores=mark(self.net.forward_head(feats), "fc"))  # pool + classifier


@register_model("efficientnet_b0", family="cnn", paper="Tan & Le 2019 (timm)", version=2)
def efficientnet_b0(**kw) -> TimmClassifier:
    return TimmClassifier("efficientnet_b0", **kw)
