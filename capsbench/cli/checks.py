"""Checks before any work starts: model names, data root and files, output folder, device and
kernel options, so that a run that cannot finish stops in its first second with one line."""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Sequence

from capsbench.cli.args import (
    speed_options,
)
from capsbench.cli.run import checkpoints
from capsbench.cli.train import _train_config
from capsbench.errors import ConfigError, DataError

# --------------------------------------------------------------------------- checks before any work
#
# A mistake in what was typed or in the files pointed at must stop a command within seconds,
# with one line, before it creates or changes anything: not after minutes of training, and
# not by leaving an empty or half-rewritten run directory behind. Each command's checks run
# here, before the command itself; the commands keep their own checks for library callers.


def _model_list(text: str | None) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()] if text else []


def _check_models(names: Sequence[str], option: str = "--models", entries: bool = False) -> None:
    """Every name a registered model (or pkg.module:factory); with ``entries``, each may carry an
    augmentation (``capsnet@rot180``, a suite run's model trained on rotated digits)."""
    from capsbench.models import list_models
    from capsbench.models.registry import resolve_model
    from capsbench.train.protocols import split_entry

    if entries:
        names = [split_entry(m)[0] for m in names]
    for m in names:
        if ":" in m:  # pkg.module:factory: imported and registered now, or one line saying why not
            resolve_model(m)
    known = list_models()
    unknown = [m for m in names if ":" not in m and m not in known]
    if unknown:
        raise ConfigError(
            f"unknown model{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in {option}; "
            f"known models: {', '.join(known)}"
        )


def _check_data_root(args: argparse.Namespace, use_env: bool = True) -> None:
    """An explicitly chosen data root must be an existing folder.

    Only the default root (``./datasets``) is created and filled by a download: a root that
    was typed and does not exist is far more often a typo than a wish to download into it.
    """
    from capsbench.data.specs import DATA_ENV, resolve_data_root

    given = getattr(args, "data_root", None)
    if given:
        source = "--data-root"
    elif use_env and os.environ.get(DATA_ENV):
        source = DATA_ENV
    else:
        return
    root = resolve_data_root(given or None)
    if root.is_dir():
        return
    if root.exists():
        raise DataError(
            f"data root {root} (from {source}) is a file, not a folder; point {source} at the folder "
            f"that holds MNIST/raw/*.gz instead"
        )
    raise DataError(
        f"data root {root} (from {source}) does not exist; point {source} at the folder that holds "
        f"MNIST/raw/*.gz, or create it and run 'capsbench data fetch --data-root {root}' when online"
    )


def _check_data(dataset: str, data_root: str | None, affnist: bool = False) -> None:
    """Load (and so check) every file a command will read; the loads are cached for it."""
    from capsbench.data.affnist import load_affnist_test
    from capsbench.data.fetch import ensure_dataset

    ensure_dataset(dataset, root=data_root, split="test")
    ensure_dataset(dataset, root=data_root, split="train")
    if affnist:
        load_affnist_test(data_root)  # the real files, when present, must be readable


def _preflight(args: argparse.Namespace) -> None:
    """Check names, numbers, the output folder and the data of ``args.command``; raise on a problem.

    Cheap checks first, the data (seconds) last. Nothing is created or written.
    """
    from capsbench.store import check_writable_dir

    command = getattr(args, "command", None)
    if command == "data":
        _check_data_root(args)  # info and fetch alike: a typed root that does not exist is a typo
    elif command == "train":
        from capsbench.train.device import check_device_options, resolve_device

        cfg = _train_config(args)
        check_device_options(resolve_device(args.device), cfg.amp, speed_options(args, curve=args.curve))
        _check_data_root(args)
        out = check_writable_dir(args.out)
        check_writable_dir(out / "jobs")
        _check_data(args.dataset, args.data_root)
    elif command == "run":
        from capsbench.suites.base import get_suite
        from capsbench.train.config import TrainConfig
        from capsbench.train.device import check_device_options, resolve_device
        from capsbench.train.profiles import get_profile
        from capsbench.train.protocols import entry_protocol, split_entry

        suite = get_suite(args.suite)
        profile = get_profile(args.profile)
        models = _model_list(getattr(args, "models", None)) or list(suite.default_models)
        _check_models(models, entries=True)
        match = getattr(args, "match_accuracy", None)
        for model in models:
            TrainConfig(model=split_entry(model)[0], dataset=suite.dataset,
                        protocol=entry_protocol(suite.protocol, model),
                        profile=profile.name, match_accuracy=match).validate()
        checkpoints(args.checkpoint, models)
        check_device_options(resolve_device(args.device), args.amp, speed_options(args))
        _check_data_root(args)
        out = check_writable_dir(args.out)
        check_writable_dir(out / f"{suite.name}-{profile.name}")
        check_writable_dir(out / "jobs")
        _check_data(suite.dataset, args.data_root, affnist=any(c.eval_data == "affnist" for c in suite.cells))
    elif command == "profile":
        from capsbench.train.device import resolve_device

        _check_models(_model_list(args.models))
        resolve_device(args.device)
        check_writable_dir(args.out)
    elif command == "report":
        from capsbench.report.build import check_metrics

        if args.metrics is not None:
            check_metrics([m.strip() for m in args.metrics.split(",") if m.strip()])
        _check_data_root(args, use_env=False)  # without --data-root each run's own root is used
        check_writable_dir(args.out)


def _set_threads() -> None:
    text = os.environ.get("CAPSBENCH_THREADS")
    if not text:
        return
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(
            f"CAPSBENCH_THREADS must be a whole number >= 1, got {text!r}; set it to e.g. 2, or unset it"
        )
    import torch

    torch.set_num_threads(n)


def _check_routing(args: argparse.Namespace) -> None:
    """CAPSBENCH_CONV, CAPSBENCH_ROUTING, --routing and CAPSBENCH_ROUTING_TILES: known values, the Triton
    kernels only on a CUDA device and the C++ ones only on a CPU where they build, before a command
    starts rather than at its first step."""
    from capsbench.models.base import env_choice
    from capsbench.models.capsnet import ROUTING_KERNELS
    from capsbench.models.kernels import fused_routing
    from capsbench.models.kernels.fft_conv import CONV_IMPLS

    try:
        env_choice("CAPSBENCH_CONV", CONV_IMPLS)
        env = env_choice("CAPSBENCH_ROUTING", ROUTING_KERNELS)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    kernel = getattr(args, "routing", "auto")
    kernel = env if kernel == "auto" else kernel
    device = getattr(args, "device", None)
    if kernel == "cpp":
        from capsbench.models.kernels import cpu_routing

        if device is not None:
            from capsbench.train.device import resolve_device

            if resolve_device(device).type != "cpu":
                raise ConfigError(f"the CPU routing kernels (--routing cpp or CAPSBENCH_ROUTING=cpp) run on the CPU; "
                                  f"got --device {device}; use the default routing instead")
        if cpu_routing.library() is None:
            raise ConfigError(f"the CPU routing kernels (--routing cpp or CAPSBENCH_ROUTING=cpp) did not build: "
                              f"{cpu_routing.build_error()}; install a C++ compiler or use the default routing")
        return
    if kernel != "triton":
        return
    if device is not None:
        from capsbench.train.device import resolve_device

        if resolve_device(device).type != "cuda" or fused_routing.triton is None:
            raise ConfigError(f"the fused routing kernels (--routing triton or CAPSBENCH_ROUTING=triton) need a "
                              f"CUDA device and Triton; got --device {device}; use the default routing instead")
    try:
        fused_routing._tiles()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _replay(caught: Sequence[warnings.WarningMessage]) -> None:
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
