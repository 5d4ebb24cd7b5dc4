"""Finished training jobs: their record (job.json, checkpoint), loading them back without the
training data, and their clean accuracy as result rows."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from capsbench.data.fetch import ensure_dataset
from capsbench.data.splits import (
    VALIDATION_SEED,
    eval_subset,
)
from capsbench.data.splits import describe as describe_split
from capsbench.errors import ConfigError, TrainingError, describe
from capsbench.models import count_parameters, create_model
from capsbench.store import environment_info, read_json, stable_hash
from capsbench.train.config import TrainConfig
from capsbench.train.device import accuracy, channels_last_for, predict, resolve_device, to_float
from capsbench.train.protocols import PROTOCOLS


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


def build_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    proto = PROTOCOLS.get(cfg.protocol)
    kw = dict(cfg.model_kwargs)
    kw.setdefault("input_size", proto.input_size)
    return create_model(cfg.model, **kw).to(device)


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
    if cfg.checkpoint is not None:
        return load_pretrained(cfg, dev)
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


def evaluate_clean(
    result: TrainResult,
    data_root: str | os.PathLike | None = None,
    limit: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Accuracy and mean true-class confidence on the clean test set (as trained: 28 or 40): the
    clean cell, scored on all test images or, with ``limit``, on the seeded class-stratified
    sample of that many (:func:`capsbench.data.splits.eval_subset`)."""
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


# --------------------------------------------------------------------------- models trained elsewhere


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pretrained_config(cfg: TrainConfig, checkpoint: str | os.PathLike) -> TrainConfig:
    """``cfg`` as a job that loads ``checkpoint`` instead of training (its key is the file's content)."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise ConfigError(f"--checkpoint {checkpoint}: no such file" if not path.exists()
                          else f"--checkpoint {checkpoint}: a folder, not a checkpoint file; name the .pt file in it")
    return replace(cfg, checkpoint=str(path.resolve()), checkpoint_sha256=file_sha256(path))


def _state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The weights in a checkpoint file: a capsbench job's (``{"model": ...}``), a
    ``{"state_dict": ...}`` dict, or a bare state dict."""
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"--checkpoint {path}: holds no state dict (a mapping of parameter names to tensors, "
                          "alone or under 'model' or 'state_dict')")
    return obj


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """Load ``state`` into ``model``; weights that do not fit are one line naming them. A plain
    module's weights fit its :class:`~capsbench.models.base.PlainClassifier` wrapper too."""
    from capsbench.models.base import PlainClassifier

    if isinstance(model, PlainClassifier) and set(state) == set(model.net.state_dict()):
        state = {f"net.{k}": v for k, v in state.items()}  # the plain module's own weights
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(shapes)} of another shape (e.g. {shapes[0]})" if shapes else ""]
        raise ConfigError(f"--checkpoint {path}: its weights do not fit model {name!r}: "
                          + ", ".join(p for p in parts if p))
    model.load_state_dict(state)


def _load_failure(e: BaseException) -> str:
    """One line for a file ``torch.load(weights_only=True)`` refused, with the fix."""
    text = str(e)
    if "WeightsUnpickler error:" in text:  # torch's multi-paragraph message: keep its reason
        reason = " ".join(text.split("WeightsUnpickler error:", 1)[1].split())
        reason = reason.split(". ", 1)[0].split(" Check the documentation", 1)[0].rstrip(".")
        return (f"not a file of tensors that torch.load(weights_only=True) reads ({reason[:160]}); "
                "save the weights with torch.save(model.state_dict(), PATH)")
    return f"cannot be read as a PyTorch file ({describe(e, 120)})"


def load_pretrained(cfg: TrainConfig, device: torch.device) -> TrainResult:
    """The model of a ``checkpoint`` job, built as the suite's protocol needs it, with the file's weights."""
    path = Path(cfg.checkpoint or "")
    if cfg.checkpoint_sha256 and path.is_file() and file_sha256(path) != cfg.checkpoint_sha256:
        raise ConfigError(f"--checkpoint {path} changed while the run was using it; run again")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"--checkpoint {path}: {_load_failure(e)}") from None
    model = build_model(cfg, torch.device("cpu"))
    load_weights(model, _state_dict(obj, path), path, cfg.model)
    model = model.to(device)
    if channels_last_for(model, device):
        model = model.to(memory_format=torch.channels_last)
    return TrainResult(cfg, model, path.parent, 0, 0.0, float("nan"), True)
