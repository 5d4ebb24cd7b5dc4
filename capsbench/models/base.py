"""What every model in capsbench promises the runner, the suites and the profiler."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelOutput:
    """What a forward pass returns, for capsule models and CNNs alike.

    Attributes:
        scores: (B, C) class scores: capsule lengths for capsule models, logits for CNNs.
            ``scores.argmax(1)`` is the prediction.
        poses: (B, C, D) output capsule vectors, or None for CNNs.
        reconstruction: (B, H*W) decoder output in [0, 1], or None.
        coupling: (B, n_in, C) coupling coefficients of the last routing iteration, when
            the model was asked to keep them (``keep_coupling=True``), else None.
    """

    scores: torch.Tensor
    poses: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    coupling: torch.Tensor | None = None


class Classifier(nn.Module):
    """Base class: a model declares its loss and how to read confidence from its output.

    Subclasses set ``family`` ("capsule" or "cnn"), ``input_size`` and ``num_classes`` and
    implement ``forward(x, y=None) -> ModelOutput``. ``x`` is (B, 1, H, W) float in [0, 1].
    """

    family: str = "cnn"
    # NHWC ("channels_last") weights and inputs on CPUs by default, for the models whose
    # oneDNN convolutions measured faster that way (train.device.channels_last_for; docs/performance.md).
    cpu_channels_last: bool = False

    def __init__(self, num_classes: int = 10, input_size: int = 28) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.input_size = input_size

    def loss(self, out: ModelOutput, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Training loss, a scalar mean over the batch. CNNs: cross-entropy on logits."""
        return F.cross_entropy(out.scores, y)

    def confidence(self, out: ModelOutput) -> torch.Tensor:
        """(B, C) confidence per class in [0, 1]: softmax for CNNs, capsule length for capsules."""
        return out.scores.float().softmax(dim=1)


class PlainClassifier(Classifier):
    """A plain ``nn.Module`` that returns (B, C) logits, as a :class:`Classifier`: softmax
    confidence and cross-entropy training, unless the module defines ``loss`` / ``confidence``
    itself (with the signatures above). Its ``family``, ``input_size`` and ``num_classes`` are
    read from the module when it has them (defaults "cnn", 28, 10); its weights are ``net.*``."""

    def __init__(self, net: nn.Module, input_size: int = 28) -> None:
        super().__init__(num_classes=int(getattr(net, "num_classes", 10)),
                         input_size=int(getattr(net, "input_size", input_size)))
        self.net = net
        self.family = str(getattr(net, "family", "cnn"))
        self.inference_batch = getattr(net, "inference_batch", None)  # predict()'s batch cap, if any

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> ModelOutput:
        out = self.net(x)
        return out if isinstance(out, ModelOutput) else ModelOutput(scores=out)

    def loss(self, out: ModelOutput, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        own = getattr(self.net, "loss", None)
        return own(out, x, y) if callable(own) else super().loss(out, x, y)

    def confidence(self, out: ModelOutput) -> torch.Tensor:
        own = getattr(self.net, "confidence", None)
        return own(out) if callable(own) else super().confidence(out)

    def set_training_steps(self, total: int) -> None:
        own = getattr(self.net, "set_training_steps", None)
        if callable(own):
            own(total)


def as_classifier(model: object, name: str, input_size: int | None = None, source: str | None = None) -> Classifier:
    """Check a model from outside capsbench against the model protocol and return it as a
    :class:`Classifier` (a plain ``nn.Module`` is wrapped in :class:`PlainClassifier`).

    The protocol: an ``nn.Module`` whose forward takes a (B, 1, H, W) float batch in [0, 1] and
    returns (B, num_classes) scores (logits) or a :class:`ModelOutput`; optional ``family``
    ("capsule" or "cnn"), ``input_size`` (H = W, default 28), ``num_classes`` (default 10),
    ``loss(out, x, y)`` and ``confidence(out)``. What is missing or wrong fails here, in one line
    that names it, after one forward pass on two blank images.
    """
    from capsbench.errors import ConfigError

    where = f"model {name!r}" + (f" ({source})" if source else "")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{where}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    clf = model if isinstance(model, Classifier) else PlainClassifier(model, input_size or 28)
    if input_size is not None and clf.input_size != input_size:
        raise ConfigError(f"{where} takes {clf.input_size}x{clf.input_size} inputs (its input_size), but this "
                          f"protocol trains on {input_size}x{input_size}; give the factory an input_size "
                          "argument, or use a suite of that size")
    if clf.family not in ("capsule", "cnn"):
        raise ConfigError(f"{where}: family must be 'capsule' or 'cnn', got {clf.family!r}")
    was_training = clf.training
    clf.eval()
    try:
        with torch.no_grad():
            param = next(clf.parameters(), None)
            x = torch.zeros(2, 1, clf.input_size, clf.input_size,
                            device=param.device if param is not None else None)
            out = clf(x)
    except Exception as e:
        raise ConfigError(f"{where}: forward on a (2, 1, {clf.input_size}, {clf.input_size}) batch raised "
                          f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    finally:
        clf.train(was_training)
    scores = out.scores if isinstance(out, ModelOutput) else None
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (2, clf.num_classes):
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{where}: forward must return (batch, {clf.num_classes}) class scores or a ModelOutput; "
                          f"got {got} for a batch of 2")
    return clf


def env_choice(var: str, choices: tuple[str, ...]) -> str:
    """The value of the environment variable ``var`` ("auto" when unset or empty), checked
    against ``choices`` (CAPSBENCH_ROUTING, CAPSBENCH_CONV). The models and the CLI (before a
    command starts) both check with it, so a bad value has one wording."""
    value = os.environ.get(var) or "auto"
    if value not in choices:
        raise ValueError(f"{var} must be one of {', '.join(choices)}, got {value!r}; unset it for the default")
    return value


def count_parameters(model: nn.Module, decoder: bool = True) -> int:
    """The model's parameters; with ``decoder=False`` less those of its reconstruction decoder
    (a submodule named ``decoder``, on the model or on a wrapped plug-in's ``net``), which is
    how the capsule papers count (Sabour et al. 2017, Table 1: 8.2M, 6.8M without it; Mazzia
    et al. 2021: 161K)."""
    total = sum(p.numel() for p in model.parameters())
    if not decoder:
        for owner in (model, getattr(model, "net", None)):
            sub = getattr(owner, "decoder", None)
            if isinstance(sub, nn.Module):
                total -= sum(p.numel() for p in sub.parameters())
                break
    return total


# --------------------------------------------------------------------------- stage marks
# The profiler times the stages of a model (conv1, primary capsules, u_hat, routing, decoder;
# conv / pool / fc for CNNs) in the forward AND the backward pass. A model calls
# ``mark(tensor, "stage")`` on the output of each stage; with no recorder active this returns
# the tensor itself (no cost). With a recorder, the forward pass notes the time the stage
# ended, and an identity autograd function notes when the gradient reaches the stage's
# output, which is when that stage's backward starts.

_RECORDER: list | None = None


class _StageMark(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, name, recorder):
        ctx.name, ctx.recorder = name, recorder
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.recorder.append(("backward", ctx.name, _now(grad.device)))
        return grad, None, None


def _now(device: torch.device) -> float:
    import time

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def recording() -> bool:
    """Whether :func:`mark` calls are being recorded (a model may then skip a fused fast path
    whose stages it could not mark apart)."""
    return _RECORDER is not None


def mark(x: torch.Tensor, name: str) -> torch.Tensor:
    """Mark the end of stage ``name`` (see above); identity unless the profiler records."""
    rec = _RECORDER
    if rec is None:
        return x
    rec.append(("forward", name, _now(x.device)))
    if x.requires_grad:
        return _StageMark.apply(x, name, rec)
    return x


class record_stages:
    """Context manager: collect (pass, stage, time) events from :func:`mark` calls.

    Example:
        >>> with record_stages() as events:
        ...     _ = mark(torch.ones(1), "conv")
        >>> events[0][:2]
        ('forward', 'conv')
    """

    def __enter__(self) -> list:
        global _RECORDER
        self._prev = _RECORDER
        _RECORDER = []
        return _RECORDER

    def __exit__(self, *exc) -> None:
        global _RECORDER
        _RECORDER = self._prev
