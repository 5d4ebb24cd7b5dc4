"""One trainer and one evaluator for every model.

The model declares its loss and how to read confidence (``Classifier.loss`` /
``Classifier.confidence``); everything else (data, augmentation, optimiser, schedule,
checkpoints, seeds) is shared, so comparisons differ only in the model.

The whole training set lives on the device as one uint8 tensor; a batch is an index into
it, converted and augmented as one tensor op (no per-sample Python, no DataLoader).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capsbench import transforms as T
from capsbench.data import data_checksums, ensure_dataset
from capsbench.errors import ConfigError, TrainingError, describe, first_line
from capsbench.locks import DirLock, remove_partial_files
from capsbench.malloc import keep_freed_memory
from capsbench.models import count_parameters, create_model
from capsbench.profiles import get_profile
from capsbench.registry import Registry
from capsbench.splits import (
    SPLIT_VERSION,
    VALIDATION_SEED,
    VALIDATION_SIZE,
    eval_subset,
    stratified_sample,
    validation_split,
)
from capsbench.splits import describe as describe_split
from capsbench.store import atomic_torch_save, environment_info, read_json, stable_hash, write_json

# --------------------------------------------------------------------------- protocols


@dataclass(frozen=True)
class Protocol:
    """What a model is trained on: input size and the batch augmentation.

    ``augment(x, generator)`` maps a (B, 1, 28, 28) float batch to the training input;
    ``clean(x)`` maps it to the un-augmented input of the same size (the clean test cell).
    """

    name: str
    input_size: int
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    clean: Callable[[torch.Tensor], torch.Tensor]
    description: str


PROTOCOLS: Registry = Registry("training protocol")
PROTOCOLS.add(
    "mnist28_shift2",
    Protocol(
        "mnist28_shift2",
        28,
        lambda x, g: T.random_shift(x, 2, g),
        lambda x: x,
        "28x28 digits shifted by up to 2 px in each axis, zero padding (the paper's)",
    ),
)
PROTOCOLS.add(
    "canvas40_jitter2",
    Protocol(
        "canvas40_jitter2",
        40,
        lambda x, g: T.jitter_on_canvas(x, 40, 2, g),
        lambda x: T.place_on_canvas(x, 40),
        "digits centred on a 40x40 canvas, shifted by up to 2 px",
    ),
)
PROTOCOLS.add(
    "canvas40_random",
    Protocol(
        "canvas40_random",
        40,
        lambda x, g: T.random_place(x, 40, g),
        lambda x: T.place_on_canvas(x, 40),
        "digits at a uniformly random position on a 40x40 canvas (the paper's affNIST training)",
    ),
)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a training job computes (and so its cache key).

    The device, output folder and progress bars are not part of it: the same job on
    another device is the same job.
    """

    model: str
    dataset: str = "mnist"
    protocol: str = "mnist28_shift2"
    profile: str = "quick"
    seed: int = 0
    steps: int | None = None  # overrides the profile
    epochs: float | None = None  # overrides the profile (when steps is None)
    batch_size: int | None = None  # None: the profile's
    lr: float | None = None  # None: the profile's (the paper's 1e-3; quick: see profiles.py)
    lr_decay: float = 0.96
    lr_decay_steps: int = 2000
    amp: str | None = None  # "bf16" (CUDA only)
    match_accuracy: float | None = None  # stop when validation accuracy reaches this
    match_eval_every: int = 50  # validation checks; every NEAR_EVERY-th of this once within NEAR_TARGET
    train_limit: int | None = None  # train on the first N training images only
    model_kwargs: tuple[tuple[str, Any], ...] = ()

    def validate(self) -> TrainConfig:
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError(f"give steps ({self.steps}) or epochs ({self.epochs:g}), not both")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if self.train_limit is not None and self.train_limit < 1:
            raise ConfigError(f"train_limit must be >= 1, got {self.train_limit}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.amp not in (None, "bf16"):
            raise ConfigError(f"amp must be 'bf16' or unset, got {self.amp!r}")
        if self.match_accuracy is not None:
            check_match_target(self.match_accuracy, tolerance=get_profile(self.profile).match_tolerance)
        if self.match_eval_every < 1:
            raise ConfigError(f"match_eval_every must be >= 1, got {self.match_eval_every}")
        PROTOCOLS.get(self.protocol)
        get_profile(self.profile)
        return self

    def resolved(self, train_size: int) -> tuple[int, int]:
        """(total steps, batch size) this job trains for, on ``train_size`` images."""
        profile = get_profile(self.profile)
        bs = self.batch_size or profile.batch_size
        n = min(train_size, self.train_limit) if self.train_limit else train_size
        if self.steps is not None:
            return self.steps, bs
        if self.epochs is not None:
            return max(1, round(self.epochs * math.ceil(n / bs))), bs
        return profile.steps_for(self.model, n, self.protocol), bs

    @property
    def key(self) -> str:
        # The resolved budget is part of the key: editing a profile's step counts retrains.
        # So is the model's version: a model whose code changes what it learns bumps it.
        from capsbench.models import model_info

        steps, bs = self.resolved(60_000)
        version = model_info(self.model).get("version", 1)
        profile = get_profile(self.profile)
        recipe = [f"lr_schedule={profile.lr_schedule}"] if profile.lr_schedule != "exp" else []
        recipe += [f"lr={profile.lr_for(self.model):g}"] if self.lr is None else []
        # trained on the training set minus the validation split (which one is part of the job)
        recipe += [f"val={VALIDATION_SIZE}:{VALIDATION_SEED}:v{SPLIT_VERSION}"]
        if self.match_accuracy is not None:  # the stop rule: validation, denser checks near the target
            recipe += [f"match=val,tol={profile.match_tolerance:g},near={NEAR_TARGET:g}/{NEAR_EVERY},far={MATCH_FAR_SUBSET},proj=max/2,rewind=1,search={MATCH_SEARCH_STEPS}"]
        return stable_hash([asdict(self), steps, bs] + ([version] if version != 1 else []) + recipe)

    @property
    def job_name(self) -> str:
        return f"{self.model}-{self.dataset}-{self.protocol}-{self.profile}-s{self.seed}-{self.key}"


# --------------------------------------------------------------------------- matched accuracy

# A model is "at the matched accuracy" when its validation accuracy at the stop lies in
# [target, target + tolerance] (the profile's match_tolerance; MATCH_TOLERANCE by default).
# Within NEAR_TARGET below the target, validation is checked NEAR_EVERY times as often, so that a stop
# does not overshoot by more than a few updates' gain. Far from the target a check first scores
# a class-stratified MATCH_FAR_SUBSET of the validation digits and scores all of them only once
# that subset is within NEAR_TARGET: a stop is always decided on the whole split. A check that
# lands above target + tolerance does not stop the job: training goes back to the state of the
# previous check (the model, optimiser and schedule are kept in memory at every check) and replays
# the same batches with a check after every step, so the stop is the first step at or above the
# target. Where a single step jumps past the band (CapsNet on 40x40 canvases in the quick profile
# moves by over a point per step), the search goes on, checking after every step, for up to
# MATCH_SEARCH_STEPS more steps: the stop is the first step whose accuracy lies in the band, or
# the job is left unmatched (and so is any claim that needs it).
MATCH_TOLERANCE = 0.001  # 0.1 percentage point
MATCH_SEARCH_STEPS = 20
NEAR_TARGET = 0.01
NEAR_EVERY = 10
MATCH_FAR_SUBSET = 1000
# The validation split must resolve the tolerance: at least this many accuracy steps (1 / n) in it.
MATCH_STEPS_IN_TOLERANCE = 5


def check_match_target(target: float, n_val: int = VALIDATION_SIZE, tolerance: float = MATCH_TOLERANCE) -> None:
    """Refuse a ``--match-accuracy`` outside (0, 1), or one the validation split cannot resolve."""
    if not isinstance(target, (int, float)) or not 0 < target < 1:
        hint = f" (for {target:g}% pass {target / 100:g})" if isinstance(target, (int, float)) and 1 < target < 100 else ""
        raise ConfigError(f"--match-accuracy is a fraction of the validation digits, in (0, 1); got {target!r}{hint}")
    if 1 / n_val > tolerance / MATCH_STEPS_IN_TOLERANCE:
        raise ConfigError(
            f"--match-accuracy {target:g}: the validation split ({n_val} images, accuracy steps of "
            f"{100 / n_val:.3g} points) is too small to resolve the matching tolerance of {100 * tolerance:g} "
            f"point(s); it needs at least {math.ceil(MATCH_STEPS_IN_TOLERANCE / tolerance)} images")


def matched(target: float | None, val_accuracy: float | None, stopped_at: int | None,
            tolerance: float = MATCH_TOLERANCE) -> bool:
    """Whether a job stopped at the matched accuracy: it reached the target and did not overshoot."""
    if target is None or val_accuracy is None or not stopped_at:
        return False
    return target <= val_accuracy <= target + tolerance + 1e-12  # float noise in target + tolerance


class _TrainState:
    """An in-memory copy of a job's model, optimiser and schedule, restored in place (so a
    captured CUDA graph, which reads the parameters', moments' and rate's memory, stays valid)."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any) -> None:
        self.model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.opt = {id(p): {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in st.items()}
                    for p, st in opt.state.items()}
        self.lr = [float(g["lr"]) for g in opt.param_groups]
        self.sched = {k: (list(v) if isinstance(v, list) else v) for k, v in sched.state_dict().items()}

    def restore(self, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any) -> None:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(self.model[k])
            for p, st in opt.state.items():
                saved = self.opt.get(id(p), {})
                for k, v in saved.items():
                    if torch.is_tensor(v):
                        st[k].copy_(v)
                    else:
                        st[k] = v
            for g, lr in zip(opt.param_groups, self.lr, strict=True):
                if torch.is_tensor(g["lr"]):
                    g["lr"].fill_(lr)
                else:
                    g["lr"] = lr
        sched.load_state_dict(self.sched)


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
    """
    device = device or next(model.parameters()).device
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
    return (scores.argmax(1) == labels.to(scores.device)).float().mean().item()


@dataclass
class TrainResult:
    """A finished (or reused) training job."""

    config: TrainConfig
    model: torch.nn.Module
    job_dir: Path
    steps_done: int
    train_time_s: float
    images_per_s: float
    reused: bool
    stopped_early_at: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    data_checksums: dict[str, Any] = field(default_factory=dict)
    # CUDA out-of-memory retries: [{"batch_size": tried, "error": message}, ...]; when not
    # empty, ``config`` is the configuration that finally trained (a smaller batch size).
    oom_retries: list[dict[str, Any]] = field(default_factory=list)
    # with --match-accuracy: the validation accuracy at the stop (or at the end of the budget)
    match_val_accuracy: float | None = None
    split: dict[str, Any] = field(default_factory=dict)  # training / validation images (job.json)


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


# --------------------------------------------------------------------------- training


# An epoch-end checkpoint is skipped when the last one is younger than this (an epoch takes
# seconds on a GPU; writing ~100 MB of weights and Adam state each time would slow it down).
# Checkpoints every ``checkpoint_every`` steps are always written.
MIN_SAVE_INTERVAL_S = 30.0


def make_optimizer(model: torch.nn.Module, lr: float, device: torch.device, capturable: bool = False):
    """Adam, fused into one kernel (CUDA, and CPUs from torch 2.4); ``capturable`` for a CUDA-graph step.

    The same update to float32 rounding (7e-9 after three steps of CapsNet's 8.2M parameters);
    on the 2-core build machine the fused CPU step takes 7 ms instead of 19.
    """
    if device.type == "cuda":
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True, capturable=capturable)
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except RuntimeError:  # torch < 2.4 has no fused CPU Adam
        return torch.optim.Adam(model.parameters(), lr=lr)


def build_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device,
    bf16: bool,
    speed: SpeedOptions,
    x0: torch.Tensor,
    y0: torch.Tensor,
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """One training step (forward, loss, backward, optimizer) as ``step(x, y) -> (loss, scores)``.

    Eager by default; ``speed.compile`` compiles the model; ``speed.cuda_graph`` captures the
    step as a CUDA graph. Capturing needs a few warm-up steps (they create the optimizer
    state and the kernels' workspaces); their effect on the weights and on Adam's state is
    undone in place, so a graph-trained job computes the same steps as an eager one.
    """
    fwd = torch.compile(model) if speed.compile else model

    def eager(x: torch.Tensor, y: torch.Tensor):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=not speed.cuda_graph):
            out = fwd(x, y)
            loss = model.loss(out, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss, out.scores

    if not speed.cuda_graph:
        return eager
    params = list(model.parameters())
    saved_params = [p.detach().clone() for p in params]
    saved_state = {id(t): t.clone() for st in opt.state.values() for t in st.values() if torch.is_tensor(t)}
    static_x, static_y = x0.clone(), y0.clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            eager(static_x, static_y)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss, static_scores = eager(static_x, static_y)
    with torch.no_grad():  # undo the warm-up and capture steps, in place (the graph keeps the storage)
        for p, v in zip(params, saved_params, strict=True):
            p.copy_(v)
        for st in opt.state.values():
            for t in st.values():
                if torch.is_tensor(t):
                    t.copy_(saved_state[id(t)]) if id(t) in saved_state else t.zero_()

    def replay(x: torch.Tensor, y: torch.Tensor):
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        return static_loss, static_scores

    return replay


def build_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    proto = PROTOCOLS.get(cfg.protocol)
    kw = dict(cfg.model_kwargs)
    kw.setdefault("input_size", proto.input_size)
    return create_model(cfg.model, **kw).to(device)


def train(
    cfg: TrainConfig,
    out: str | os.PathLike = "runs",
    data_root: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_step: Callable[[int], None] | None = None,
    speed: SpeedOptions | None = None,
) -> TrainResult:
    """Train one model (or reuse the finished job with the same key) and return it.

    The job directory ``<out>/jobs/<job_name>/`` holds ``checkpoint.pt`` (written atomically
    every ``checkpoint_every`` steps and at the end of an epoch when the last checkpoint is at
    least ``MIN_SAVE_INTERVAL_S`` old; an interrupted job resumes from it) and
    ``job.json`` (config, status, timings) once finished. ``on_step(step)`` is called after
    every step (progress hooks, tests that interrupt a job). ``speed``: see
    :class:`SpeedOptions`.
    """
    cfg = cfg.validate()
    dev = resolve_device(device)
    speed = check_device_options(dev, cfg.amp, speed)
    keep_freed_memory()  # large CPU tensors reuse mapped pages step after step (capsbench/malloc.py)
    ensure_dataset(cfg.dataset, root=data_root, split="train")  # before the job folder exists
    job_dir = Path(out) / "jobs" / cfg.job_name
    # One trainer per job: a second process that needs it (another suite, a Ray task) waits
    # and then reuses the finished checkpoint. The lock dies with its holder, so a job killed
    # mid-training is resumed by the next run; its half-written temporary files are removed.
    lock = DirLock(job_dir, "training job", wait=True,
                   on_wait=lambda holder: log(f"waiting for job {cfg.job_name}, held by {holder}"))
    with lock:
        remove_partial_files(job_dir, recursive=False)
        return _train_locked(cfg, job_dir, data_root, dev, progress, log, on_step, speed)


def _train_locked(
    cfg: TrainConfig,
    job_dir: Path,
    data_root: str | os.PathLike | None,
    dev: torch.device,
    progress: bool,
    log: Callable[[str], None],
    on_step: Callable[[int], None] | None,
    speed: SpeedOptions,
) -> TrainResult:
    profile = get_profile(cfg.profile)
    proto = PROTOCOLS.get(cfg.protocol)
    ckpt_path = job_dir / "checkpoint.pt"
    job_json = job_dir / "job.json"

    train_set = ensure_dataset(cfg.dataset, root=data_root, split="train")
    sums = data_checksums(cfg.dataset, root=data_root)

    seed_everything(cfg.seed)
    model = build_model(cfg, dev)

    if job_json.exists() and ckpt_path.exists():
        meta = _job_meta(job_json)
        if meta is None:
            log(f"warning: ignoring unreadable {job_json}; the job resumes from its checkpoint or starts over")
        elif meta.get("status") == "finished" and meta.get("key") == cfg.key:
            try:
                reused = load_finished(cfg, job_dir.parent.parent, dev)
            except TrainingError as e:  # a damaged checkpoint: the finished job is lost, train it again
                log(f"warning: {e}; training it again")
            else:
                log(f"reusing finished job {job_dir}")
                reused.data_checksums = sums
                return reused

    train_idx, val_idx = validation_split(train_set.labels)
    if cfg.train_limit is not None:
        train_idx = train_idx[: cfg.train_limit]
    images, labels = train_set.images[train_idx], train_set.labels[train_idx]
    n = images.shape[0]
    split = job_split(train_set.labels.numel(), train_idx, val_idx, cfg.train_limit)
    total_steps, bs = cfg.resolved(n)
    # With --match-accuracy the profile's budget is an upper bound: training stops the first
    # time validation accuracy reaches the target; a model that never reaches it is recorded as such.
    steps_per_epoch = math.ceil(n / bs)

    lr = cfg.lr if cfg.lr is not None else profile.lr_for(cfg.model)
    channels_last = channels_last_for(model, dev, speed.channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, lr, dev, capturable=speed.cuda_graph)
    if profile.lr_schedule == "linear":  # to 0 at the end of the budget
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total_steps))
    else:  # continuous exponential decay, as tf.train.exponential_decay without staircase
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cfg.lr_decay ** (s / cfg.lr_decay_steps))

    step, elapsed, history, stopped = 0, 0.0, [], None
    if ckpt_path.exists():
        try:
            state = torch.load(ckpt_path, map_location=dev, weights_only=False)
        except Exception as e:  # a checkpoint we cannot read is not worth losing the run over
            log(f"warning: ignoring unreadable checkpoint {ckpt_path} ({e}); starting over")
            state = None
        if state is not None and state.get("key") == cfg.key:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            step, elapsed, history = state["step"], state["elapsed"], state.get("history", [])
            log(f"resuming {cfg.job_name} at step {step}/{total_steps}")
    if speed.cuda_graph:  # the graph reads the rate from a device tensor the schedule fills
        for group in opt.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=dev)

    images = images.to(dev)  # uint8, resident on the device
    labels = labels.to(dev)
    match_x = match_y = curve_x = curve_y = far_x = far_y = None
    val_images, val_labels = train_set.images[val_idx], train_set.labels[val_idx]
    if cfg.match_accuracy is not None:
        # validation digits placed as the protocol trains them, the same placement for every
        # model and seed (so two models are matched on the same inputs)
        match_x, match_y = proto.augment(to_float(val_images), _generator(7919)), val_labels
        if len(val_labels) > MATCH_FAR_SUBSET:
            far = stratified_sample(val_labels, MATCH_FAR_SUBSET, seed=0, tag="match-far")
            far_x, far_y = match_x[far], match_y[far]
    if speed.curve:  # validation digits as the protocol's clean cell shows test digits
        curve_x, curve_y = proto.clean(to_float(val_images)), val_labels
    match_acc = None
    near = False  # within NEAR_TARGET of the target at the last check of the whole split
    last_check: tuple[int, float] | None = None  # (step, accuracy) of the last check
    max_slope = 0.0  # the steepest accuracy gain per step between two checks so far
    next_check = cfg.match_eval_every
    tolerance = profile.match_tolerance
    at_check: _TrainState | None = None  # the state at the last check, to go back to on an overshoot
    at_check_near = False
    replay_until = 0  # after going back: a check after every step up to the step that overshot
    crossed_at: int | None = None  # the step a single update jumped past the band, if one did

    def save(finished: bool) -> None:
        atomic_torch_save(
            {
                "key": cfg.key,
                "config": asdict(cfg),
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "step": step,
                "elapsed": elapsed,
                "history": history,
                "finished": finished,
            },
            ckpt_path,
        )

    job_dir.mkdir(parents=True, exist_ok=True)
    model.train()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=cfg.model, unit="step", leave=False)
    if dev.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    # On a GPU a step takes milliseconds: read the loss back (a host synchronisation) less often.
    sync_every = 100 if dev.type == "cuda" else 10
    one_step = short_step = None  # built at the first step (a CUDA graph captures a real batch)
    t_mark = time.perf_counter()
    last_save = -math.inf  # epoch-end checkpoints at most every MIN_SAVE_INTERVAL_S seconds
    seen_since = 0
    run_loss = run_acc = 0.0
    logged = 0
    perm, perm_epoch = None, -1
    while step < total_steps:
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:
            perm = torch.randperm(n, generator=_generator(cfg.seed, epoch)).to(dev)
            perm_epoch = epoch
        idx = perm[pos * bs : (pos + 1) * bs]
        x = proto.augment(to_float(images[idx]), _generator(cfg.seed, epoch, pos, 1))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels[idx]
        if one_step is None:
            one_step = build_step(model, opt, dev, cfg.amp == "bf16", speed, x, y)
        if speed.cuda_graph and idx.shape[0] != bs:  # a graph has fixed shapes: a short
            if short_step is None:  # last batch of an epoch runs eagerly
                short_step = build_step(model, opt, dev, cfg.amp == "bf16", SpeedOptions(), x, y)
            loss, scores = short_step(x, y)
        else:
            loss, scores = one_step(x, y)
        sched.step()
        step += 1
        seen_since += idx.shape[0]
        run_loss += loss.detach()
        run_acc += (scores.detach().argmax(1) == y).float().mean()
        logged += 1
        if step % sync_every == 0 or step == total_steps:
            mean_loss = (run_loss / logged).item()  # one host sync per sync_every steps
            if not math.isfinite(mean_loss):
                raise TrainingError(
                    f"{cfg.model}: training loss became {mean_loss} by step {step}; the job "
                    f"stopped (try a lower --lr than {lr:g}, or check the input data)"
                )
            now = time.perf_counter()
            elapsed += now - t_mark
            ips = seen_since / max(now - t_mark, 1e-9)
            history.append({"step": step, "loss": mean_loss, "train_acc": (run_acc / logged).item()})
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{history[-1]['train_acc']:.3f}", img_s=f"{ips:.0f}")
                bar.update(step - bar.n)
            run_loss = run_acc = 0.0
            logged = seen_since = 0
            t_mark = time.perf_counter()
        if match_x is not None and (step >= next_check or step == total_steps):
            whole = near or step == total_steps or far_x is None or crossed_at is not None
            if not whole:  # far from the target: a subset tells whether the whole split is worth it
                far_acc = accuracy(predict(model, far_x, device=dev, amp=cfg.amp)[0], far_y)
                history.append({"step": step, "match_val_acc_subset": far_acc})
                whole = far_acc >= cfg.match_accuracy - NEAR_TARGET
            if whole:
                match_acc = accuracy(predict(model, match_x, device=dev, amp=cfg.amp)[0], match_y)
                history.append({"step": step, "match_val_acc": match_acc})
                overshot = match_acc > cfg.match_accuracy + tolerance + 1e-12
                if overshot and at_check is not None and last_check is not None and step - last_check[0] > 1:
                    # past the tolerance between two checks: back to the last check, then step by step
                    log(f"{cfg.model}: validation accuracy {match_acc:.4f} at step {step} is past the target "
                        f"{cfg.match_accuracy} + {tolerance:g}; replaying from step {last_check[0]} with a check "
                        "after every step")
                    at_check.restore(model, opt, sched)
                    replay_until, step = step, last_check[0]
                    history = [h for h in history if h["step"] <= step]
                    history.append({"step": step, "match_rewind_from": replay_until, "overshoot_val_acc": match_acc})
                    near, next_check = at_check_near, step + 1
                    perm_epoch, run_loss, run_acc, logged, seen_since = -1, 0.0, 0.0, 0, 0
                    t_mark = time.perf_counter()
                    continue
                if match_acc >= cfg.match_accuracy and not overshot:
                    stopped = step
                    log(f"{cfg.model}: validation accuracy {match_acc:.4f} >= {cfg.match_accuracy} at step {step}")
                    break
                if overshot and crossed_at is None:  # one step jumped past the band: search on, step by step
                    crossed_at = step
                    log(f"{cfg.model}: validation accuracy {match_acc:.4f} at step {step} jumped past the target "
                        f"{cfg.match_accuracy} + {tolerance:g} in one step; checking every step for up to "
                        f"{MATCH_SEARCH_STEPS} more")
                if crossed_at is not None and (step - crossed_at >= MATCH_SEARCH_STEPS or step == total_steps):
                    stopped = step
                    log(f"{cfg.model}: no step within {MATCH_SEARCH_STEPS} of step {crossed_at} had a validation "
                        f"accuracy in [{cfg.match_accuracy}, {cfg.match_accuracy} + {tolerance:g}]; stopped "
                        f"unmatched at {match_acc:.4f}")
                    break
                near = match_acc >= cfg.match_accuracy - NEAR_TARGET
            t_mark = time.perf_counter()
            # far from the target: every match_eval_every steps, or sooner when the steepest rise
            # seen between two checks would reach the target earlier (after half those steps), so a
            # steep, noisy curve is not overshot
            now = match_acc if whole else far_acc
            gap = fine = max(1, cfg.match_eval_every // NEAR_EVERY)
            if last_check is not None and now > last_check[1]:
                max_slope = max(max_slope, (now - last_check[1]) / (step - last_check[0]))
            if not near:
                gap = cfg.match_eval_every
                if max_slope > 0:
                    gap = int(min(gap, max(fine, (cfg.match_accuracy - now) / max_slope / 2)))
            if step < replay_until or crossed_at is not None:
                gap = 1
            last_check = (step, now)
            next_check = step + gap
            at_check, at_check_near = _TrainState(model, opt, sched), near
        if curve_x is not None and step % steps_per_epoch == 0:
            acc = accuracy(predict(model, curve_x, device=dev, amp=cfg.amp)[0], curve_y)
            history.append({"step": step, "epoch": step / steps_per_epoch, "val_acc": acc})
            log(f"{cfg.model}: epoch {step / steps_per_epoch:g} step {step}: validation accuracy {acc:.4f}")
            t_mark = time.perf_counter()
        epoch_end = step % steps_per_epoch == 0 and time.perf_counter() - last_save >= MIN_SAVE_INTERVAL_S
        if step % profile.checkpoint_every == 0 or epoch_end:
            save(False)
            last_save = t_mark = time.perf_counter()
        if on_step is not None:
            on_step(step)
    if bar is not None:
        bar.close()
    images_seen = step * bs
    ips_total = images_seen / elapsed if elapsed > 0 else float("nan")
    save(True)
    write_json(
        job_json,
        {
            "status": "finished",
            "key": cfg.key,
            "config": asdict(cfg),
            "steps_done": step,
            "batch_size": bs,
            "train_time_s": elapsed,
            "images_per_s": ips_total,
            "stopped_early_at": stopped,
            "match_accuracy": cfg.match_accuracy,
            "match_tolerance": profile.match_tolerance if cfg.match_accuracy is not None else None,
            "match_val_accuracy": match_acc,
            "split": split,
            "history": history,
            "params": count_parameters(model),
            "device": str(dev),
            "channels_last": channels_last,
            "environment": environment_info(dev),
            "data_checksums": sums,
        },
    )
    return TrainResult(cfg, model, job_dir, step, elapsed, ips_total, False, stopped, history, sums,
                       match_val_accuracy=match_acc, split=split)


def job_split(total: int, train_idx: torch.Tensor, val_idx: torch.Tensor, train_limit: int | None) -> dict[str, Any]:
    """job.json's record of which training-set images trained the job and which validated it."""
    return {
        "train_images": int(train_idx.numel()),
        "train_rule": "the training set minus the validation split, in file order"
                      + (f", first {train_limit}" if train_limit is not None else ""),
        "validation": describe_split(val_idx, total, VALIDATION_SEED, "validation"),
    }


def _job_meta(path: Path) -> dict[str, Any] | None:
    """A job's job.json, or None when it cannot be read as a JSON object (cut off, garbled)."""
    try:
        meta = read_json(path)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def load_finished(
    cfg: TrainConfig, out: str | os.PathLike = "runs", device: str | torch.device = "auto"
) -> TrainResult:
    """The finished job ``cfg`` from its checkpoint, without touching the training data."""
    dev = resolve_device(device)
    job_dir = Path(out) / "jobs" / cfg.job_name
    job_json = job_dir / "job.json"
    meta = _job_meta(job_json) if job_json.exists() else {}
    if meta is None:
        raise TrainingError(f"{job_json} is damaged; rerun the command (capsbench train or run) to resume the "
                            "job from its checkpoint and rewrite it")
    if meta.get("status") != "finished" or meta.get("key") != cfg.key:
        raise TrainingError(f"job {job_dir} has not finished training; run it first (capsbench train or run)")
    model = build_model(cfg, dev)
    ckpt = job_dir / "checkpoint.pt"
    try:
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        model.load_state_dict(state["model"])
    except Exception as e:  # truncated, garbled or from another model: one line, not a traceback
        raise TrainingError(f"checkpoint {ckpt} cannot be loaded ({describe(e, 120)}); "
                            f"delete the job folder {job_dir} to train the job again") from None
    if channels_last_for(model, dev):
        model = model.to(memory_format=torch.channels_last)
    return TrainResult(
        cfg, model, job_dir, meta["steps_done"], meta["train_time_s"], meta["images_per_s"], True,
        meta.get("stopped_early_at"), meta.get("history", []), meta.get("data_checksums", {}),
        match_val_accuracy=meta.get("match_val_accuracy"), split=meta.get("split") or {},
    )


def train_with_retry(
    cfg: TrainConfig,
    out: str | os.PathLike = "runs",
    data_root: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_step: Callable[[int], None] | None = None,
    speed: SpeedOptions | None = None,
) -> TrainResult:
    """:func:`train`, retried at half the batch size when the device runs out of memory.

    Each retry is a job of its own (the batch size is part of the key) and is recorded in
    ``TrainResult.oom_retries``. A fixed step budget doubles with each halving, so the job
    still sees as many images. Below a batch size of 1 the error is raised as a
    :class:`TrainingError` naming the sizes tried.
    """
    retries: list[dict[str, Any]] = []
    train_size = 60_000
    while True:
        try:
            result = train(cfg, out=out, data_root=data_root, device=device, progress=progress,
                           log=log, on_step=on_step, speed=speed)
            result.oom_retries = retries
            return result
        except torch.OutOfMemoryError as e:
            _, bs = cfg.resolved(train_size)
            retries.append({"batch_size": bs, "error": first_line(e) or "out of memory"})
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if bs <= 1:
                tried = ", ".join(str(r["batch_size"]) for r in retries)
                raise TrainingError(
                    f"{cfg.model}: out of memory at every batch size tried ({tried}); use a "
                    f"smaller model or input, or a device with more memory"
                ) from None
            log(f"{cfg.model} seed {cfg.seed}: out of memory at batch size {bs} ({retries[-1]['error']}); "
                f"retrying at {bs // 2}")
            steps, _ = cfg.resolved(train_size)
            smaller = replace(cfg, batch_size=bs // 2)
            if smaller.resolved(train_size)[0] == steps:  # a fixed step budget: keep the images seen
                smaller = replace(smaller, steps=2 * steps)
            cfg = smaller


def evaluate_clean(
    result: TrainResult,
    data_root: str | os.PathLike | None = None,
    limit: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Accuracy and mean true-class confidence on the clean test set (as trained: 28 or 40): the
    clean cell, scored on all test images or, with ``limit``, on the seeded class-stratified
    sample of that many (:func:`capsbench.splits.eval_subset`)."""
    cfg = result.config
    proto = PROTOCOLS.get(cfg.protocol)
    test = ensure_dataset(cfg.dataset, root=data_root, split="test")
    imgs, labels = test.images, test.labels
    idx = eval_subset(labels, limit)
    if idx is not None:
        imgs, labels = imgs[idx], labels[idx]
    x = proto.clean(to_float(imgs))
    dev = resolve_device(device) if device is not None else next(result.model.parameters()).device
    scores, conf = predict(result.model, x, device=dev, amp=cfg.amp)
    return {
        "accuracy": accuracy(scores, labels),
        "confidence": conf.gather(1, labels.view(-1, 1)).mean().item(),
        "n": float(labels.shape[0]),
    }


def train_rows(result: TrainResult, clean: dict[str, float], run_id: str, profile: str, device: str) -> list[dict]:
    """Tidy rows for ``capsbench train``: clean accuracy, confidence, time, throughput, params."""
    cfg = result.config
    base = {
        "run_id": run_id,
        "suite": "train",
        "model": cfg.model,
        "seed": cfg.seed,
        "train_data": f"{cfg.dataset}:{cfg.protocol}",
        "eval_data": f"{cfg.dataset}_test",
        "transform": "none",
        "cell": "clean",
        "profile": profile,
        "device": device,
        "git_sha": environment_info()["git_sha"],
        "data_sha256": stable_hash(result.data_checksums, 16),
        "job_key": cfg.key,
        "error": "",
    }
    n = int(clean["n"])
    rows = [
        {**base, "metric": "accuracy", "value": clean["accuracy"], "n": n},
        {**base, "metric": "confidence", "value": clean["confidence"], "n": n},
        {**base, "metric": "train_time_s", "value": result.train_time_s, "n": result.steps_done},
        {**base, "metric": "train_images_per_s", "value": result.images_per_s, "n": result.steps_done},
        {**base, "metric": "params", "value": float(count_parameters(result.model)), "n": 1},
        {**base, "metric": "train_steps", "value": float(result.steps_done), "n": 1},
    ]
    return rows


def with_overrides(cfg: TrainConfig, **kw: Any) -> TrainConfig:
    """``dataclasses.replace`` that ignores None, so unset CLI flags keep the defaults."""
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})
