"""A training job's configuration (:class:`TrainConfig`): frozen, validated, and hashed into the
job's key, so that a finished job is reused exactly when nothing that shapes it changed."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from capsbench.data.splits import (
    SPLIT_VERSION,
    VALIDATION_SEED,
    VALIDATION_SIZE,
)
from capsbench.errors import ConfigError
from capsbench.store import stable_hash
from capsbench.train.matching import (
    MATCH_FAR_SUBSET,
    MATCH_SEARCH_STEPS,
    NEAR_EVERY,
    NEAR_TARGET,
    check_match_target,
)
from capsbench.train.profiles import get_profile
from capsbench.train.protocols import PROTOCOLS

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
    # a model trained elsewhere: its weights are loaded from this file and nothing is trained
    # (the key is the file's content, not its path: capsbench.train.jobs.load_pretrained)
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None

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
        proto = PROTOCOLS.get(self.protocol)
        get_profile(self.profile)
        from capsbench.models import model_info

        info = model_info(self.model)
        if info.get("requires"):  # an optional dependency: (module, the extra that installs it)
            module, extra = info["requires"]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"model {self.model!r} needs the {module} package, which is not installed: "
                                  f"pip install -e '.[{extra}]' (or pip install 'capsbench[{extra}]')")
        sizes = info.get("input_sizes")
        if sizes and proto.input_size not in sizes:
            raise ConfigError(
                f"model {self.model!r} takes {' or '.join(f'{n}x{n}' for n in sizes)} inputs, but protocol "
                f"{self.protocol!r} trains on {proto.input_size}x{proto.input_size}; choose another model for it")
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

        info = model_info(self.model)
        if self.checkpoint is not None:  # nothing is trained: the weights and what they score on
            return stable_hash(["pretrained", self.model, info.get("source"), self.dataset, self.protocol,
                                self.checkpoint_sha256, self.model_kwargs])
        steps, bs = self.resolved(60_000)
        version = info.get("version", 1)
        profile = get_profile(self.profile)
        recipe = [f"lr_schedule={profile.lr_schedule}"] if profile.lr_schedule != "exp" else []
        recipe += [f"lr={profile.lr_for(self.model):g}"] if self.lr is None else []
        # trained on the training set minus the validation split (which one is part of the job)
        recipe += [f"val={VALIDATION_SIZE}:{VALIDATION_SEED}:v{SPLIT_VERSION}"]
        if self.match_accuracy is not None:  # the stop rule: validation, denser checks near the target
            recipe += [f"match=val,tol={profile.match_tolerance:g},near={NEAR_TARGET:g}/{NEAR_EVERY},far={MATCH_FAR_SUBSET},proj=max/2,rewind=1,search={MATCH_SEARCH_STEPS}"]
        if info.get("source"):  # a plug-in model: where its factory comes from
            recipe += [f"source={info['source']}"]
        fields = {k: v for k, v in asdict(self).items() if k not in ("checkpoint", "checkpoint_sha256")}
        return stable_hash([fields, steps, bs] + ([version] if version != 1 else []) + recipe)

    @property
    def job_name(self) -> str:
        return f"{self.model}-{self.dataset}-{self.protocol}-{self.profile}-s{self.seed}-{self.key}"


def with_overrides(cfg: TrainConfig, **kw: Any) -> TrainConfig:
    """``dataclasses.replace`` that ignores None, so unset CLI flags keep the defaults."""
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})
