"""Where and how a job computes: device choice, seeds and determinism, batched prediction,
and the speed options (channels-last, CUDA graphs, compile) with their checks."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from capsbench.errors import ConfigError
from capsbench.store import stable_hash

# --------------------------------------------------------------------------- helpers


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``: CUDA, then MPS, then CPU. Anything else is passed to ``torch.device``."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but CUDA is not available; use --device cpu")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> dict[str, Any]:
    """Turn reproducible kernels on (or back to torch's defaults) and return the flags.

    On: ``torch.use_deterministic_algorithms(True)`` (an op without a deterministic kernel
    raises instead of silently varying), cuDNN deterministic and not benchmarking, and
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` as CUDA >= 10.2 needs for deterministic cuBLAS. On the
    CPU the same seed and thread count already give the same numbers; the flags matter on GPUs.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False
    return determinism_flags()


def determinism_flags() -> dict[str, Any]:
    """What decides reproducibility in this process, for run.json."""
    return {
        "use_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "torch_threads": torch.get_num_threads(),
    }


def _generator(*parts: int) -> torch.Generator:
    # One generator per (seed, epoch) or (seed, step): resuming anywhere replays the same
    # data order and augmentation as an uninterrupted run.
    g = torch.Generator()
    g.manual_seed(int(stable_hash(list(parts), 15), 16))
    return g


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, 1, H, W) float32 in [0, 1]."""
    return images_u8.unsqueeze(1).float().div_(255.0)


def inference_batch(model: torch.nn.Module, batch_size: int) -> int:
    """``batch_size``, or less where the model's ``inference_batch`` attribute caps it (a wrapped
    plug-in's is copied onto its :class:`~capsbench.models.base.PlainClassifier`)."""
    cap = getattr(model, "inference_batch", None)
    return min(batch_size, int(cap)) if cap else batch_size


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    x: torch.Tensor,
    batch_size: int = 500,
    device: torch.device | None = None,
    amp: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and confidences for a whole tensor of inputs, batched on the device.

    Args:
        x: (N, 1, H, W) float inputs (any device).

    Returns:
        scores (N, C) and confidence (N, C), float32 on the CPU.

    A model whose inference is fastest in smaller batches says so with an ``inference_batch``
    attribute; the batch is then at most that.
    """
    device = device or next(model.parameters()).device
    batch_size = inference_batch(model, batch_size)
    channels_last = _in_channels_last(model)  # inputs follow the weights' memory format
    was_training = model.training
    model.eval()
    scores, conf = [], []
    try:
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(device, non_blocking=True)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                out = model(xb)
            scores.append(out.scores.float())
            conf.append(model.confidence(out).float())
    finally:
        model.train(was_training)
    return torch.cat(scores).cpu(), torch.cat(conf).cpu()


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction correct, as a count over n (exact: 4200 of 5000 is 0.84, not float32's 0.8399999)."""
    return int((scores.argmax(1) == labels.to(scores.device)).sum()) / max(1, int(labels.shape[0]))


@dataclass(frozen=True)
class SpeedOptions:
    """How a job runs on its device, not what it computes: none of this is in the job key.

    channels_last: weights and inputs in NHWC (faster convolutions on tensor cores); None
        (the default) leaves it to :func:`channels_last_for`: on CPUs for the models that
        declare ``cpu_channels_last``, off elsewhere.
    cuda_graph: capture the whole step (forward, loss, backward, Adam) once as a CUDA graph
        and replay it (CUDA only): no launch overhead, no host synchronisation in the step.
    compile: ``torch.compile`` the model (CUDA only here; compiling takes a while).
    curve: evaluate the validation split (clean, as the protocol's clean cell) at the end of every
        epoch and keep the accuracy in the job's history (the learning curve; costs one pass over
        the validation images per epoch; test images are for scoring cells only).
    """

    channels_last: bool | None = None
    cuda_graph: bool = False
    compile: bool = False
    curve: bool = False

    def check(self, dev: torch.device) -> SpeedOptions:
        if (self.cuda_graph or self.compile) and dev.type != "cuda":
            raise ConfigError("--cuda-graph and --compile need a CUDA device; drop them on the CPU")
        if self.cuda_graph and self.compile:
            raise ConfigError("use one of --cuda-graph and --compile, not both")
        return self


def channels_last_for(model: torch.nn.Module, dev: torch.device, requested: bool | None = None) -> bool:
    """Whether ``model`` trains and predicts on ``dev`` with NHWC weights and inputs: as
    requested (``--channels-last`` / ``--no-channels-last``), else on CPUs where the model
    declares ``cpu_channels_last`` (oneDNN ran its convolutions faster that way; the same
    arithmetic in another order, so results differ only by float32 rounding)."""
    if requested is not None:
        return requested
    return dev.type == "cpu" and bool(getattr(model, "cpu_channels_last", False))


def _in_channels_last(model: torch.nn.Module) -> bool:
    """Whether the model's convolution weights are stored NHWC (its inputs should be too): the
    first 4-D weight whose NHWC and NCHW strides differ decides (compared as strides: with one
    input channel, as in depthwise convolutions, both layouts count as contiguous)."""
    for p in model.parameters():
        if p.dim() != 4:
            continue
        _, c, h, w = p.shape
        nhwc, nchw = (h * w * c, 1, w * c, c), (c * h * w, h * w, w, 1)
        if nhwc != nchw:
            return p.stride() == nhwc
    return False


def check_device_options(dev: torch.device, amp: str | None, speed: SpeedOptions | None = None) -> SpeedOptions:
    """Refuse options the device cannot honour (before any work); returns the speed options."""
    if amp == "bf16" and dev.type != "cuda":
        raise ConfigError("--amp bf16 needs a CUDA device; drop it on the CPU")
    return (speed or SpeedOptions()).check(dev)
