"""The ``capsbench train`` subcommand: one model, one seed, scored on the clean test set."""

from __future__ import annotations

import argparse
import sys

from capsbench.cli.args import (
    add_speed_args,
    nonneg_int,
    positive_float,
    positive_int,
    speed_options,
)


def _train_config(args: argparse.Namespace):
    """The validated :class:`~capsbench.train.config.TrainConfig` of ``capsbench train``."""
    from capsbench.models.registry import resolve_model
    from capsbench.train.config import TrainConfig

    return TrainConfig(
        model=resolve_model(args.model),  # an unknown name stops here, listing the known ones
        dataset=args.dataset,
        protocol=args.protocol,
        profile=args.profile,
        seed=args.seed,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        amp=args.amp,
        match_accuracy=args.match_accuracy,
    ).validate()


def cmd_train(args: argparse.Namespace) -> int:
    from capsbench.data.specs import resolve_data_root
    from capsbench.store import ensure_writable_dir, environment_info, write_json, write_rows_csv
    from capsbench.train.device import check_device_options, resolve_device, set_deterministic
    from capsbench.train.jobs import evaluate_clean, train_rows
    from capsbench.train.trainer import train_with_retry

    cfg = _train_config(args)
    out = ensure_writable_dir(args.out)
    dev = resolve_device(args.device)
    speed = check_device_options(dev, cfg.amp, speed_options(args, curve=args.curve))
    flags = set_deterministic(args.deterministic)
    result = train_with_retry(cfg, out=out, data_root=args.data_root, device=dev, progress=not args.no_progress,
                              speed=speed)
    clean = evaluate_clean(result, data_root=args.data_root)
    rows = train_rows(result, clean, run_id=cfg.job_name, profile=cfg.profile, device=str(dev))
    write_rows_csv(result.job_dir / "results.csv", rows)
    write_json(
        result.job_dir / "run.json",
        {
            "command": "capsbench " + " ".join(sys.argv[1:]),
            "config": cfg,
            "job_key": cfg.key,
            "reused": result.reused,
            "environment": environment_info(dev),
            "data_root": str(resolve_data_root(args.data_root)),
            "data_checksums": result.data_checksums,
            "clean": clean,
            "train_time_s": result.train_time_s,
            "images_per_s": result.images_per_s,
            "steps": result.steps_done,
            "stopped_early_at": result.stopped_early_at,
            "match_val_accuracy": result.match_val_accuracy,
            "split": result.split,
            "trained_config": result.config,
            "oom_retries": result.oom_retries,
            "determinism_flags": flags,
            "speed_options": speed,
        },
    )
    print(
        f"{cfg.model}: clean {cfg.dataset} test accuracy {clean['accuracy'] * 100:.2f}% "
        f"(n={int(clean['n'])}), {result.steps_done} steps in {result.train_time_s:.0f} s "
        f"({result.images_per_s:.0f} images/s){' [reused]' if result.reused else ''}"
    )
    if cfg.match_accuracy is not None:
        reached = (f"stopped at step {result.stopped_early_at}" if result.stopped_early_at
                   else "did not reach it within the budget")
        print(f"{cfg.model}: --match-accuracy {cfg.match_accuracy:g}: {reached}, validation accuracy "
              f"{100 * (result.match_val_accuracy or float('nan')):.2f}%")
    print(f"run directory: {result.job_dir}")
    return 0


def add_commands(sub, add_common) -> None:
    """Add ``train`` to the ``capsbench`` subcommands."""
    pt = sub.add_parser("train", help="train one model and score it on the clean test set")
    pt.add_argument("--model", required=True, help="model name (capsbench list models) or pkg.module:factory")
    pt.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist"], help="training data")
    pt.add_argument("--protocol", default="mnist28_shift2", help="training data protocol (capsbench list protocols)")
    pt.add_argument("--profile", default="quick", help="smoke, quick (CPU default) or paper")
    budget = pt.add_mutually_exclusive_group()  # both given, one would silently win
    budget.add_argument("--epochs", type=positive_float, default=None,
                        help="train for this many epochs instead of the profile's budget")
    budget.add_argument("--steps", type=positive_int, default=None,
                        help="train for this many steps instead of the profile's budget")
    pt.add_argument("--batch-size", type=positive_int, default=None, help="training batch size (default: the profile's)")
    pt.add_argument("--lr", type=positive_float, default=None,
                    help="Adam learning rate (default: the profile's rate for this model)")
    pt.add_argument("--seed", type=nonneg_int, default=0, help="training seed (initialisation, batch order, shifts)")
    add_speed_args(pt)
    pt.add_argument("--match-accuracy", type=positive_float, default=None,
                    help="stop when accuracy on the validation split reaches this fraction (as capsbench run: "
                         "a job trained here is reused by a run with the same settings)")
    pt.add_argument("--curve", action="store_true",
                    help="evaluate the validation split after every epoch and keep the learning curve in job.json")
    pt.add_argument("--deterministic", action="store_true",
                    help="reproducible kernels (torch.use_deterministic_algorithms); recorded in run.json")
    pt.add_argument("--no-progress", action="store_true", help="no progress bar: plain lines")
    add_common(pt)
    pt.set_defaults(func=cmd_train)
