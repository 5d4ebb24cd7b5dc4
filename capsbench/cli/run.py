"""The ``capsbench run`` subcommand (suites)."""

from __future__ import annotations

import argparse
import sys


def checkpoints(values: list[str] | None, models: list[str] | None) -> dict[str, list[str]]:
    """``--checkpoint [MODEL=]PATH`` options as {model: [path per seed]}; without ``MODEL=`` the
    path belongs to the one model of ``--models``."""
    from capsbench.errors import ConfigError

    out: dict[str, list[str]] = {}
    for v in values or []:
        model, sep, path = v.partition("=")
        if not sep or not path or "/" in model or "\\" in model:  # a bare path (which may hold '=')
            if not models or len(models) != 1:
                raise ConfigError(f"--checkpoint {v}: say which model it is for (--checkpoint MODEL=PATH), "
                                  "or name one model in --models")
            model, path = models[0], v
        out.setdefault(model, []).append(path)
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from capsbench.cli.args import name_list, speed_options
    from capsbench.errors import ConfigError
    from capsbench.evaluation.run import run_suite

    models = name_list(args.models, "--models")
    ckpts = checkpoints(args.checkpoint, models)
    ray_only = [f for f, v in (("--ray-address", args.ray_address), ("--cpus-per-task", args.cpus_per_task))
                if v is not None]
    if ray_only and args.executor != "ray":
        raise ConfigError(f"{' and '.join(ray_only)} only apply with --executor ray; add it or leave them out")
    run_dir = run_suite(
        args.suite,
        models=models,
        seeds=args.seeds,
        profile=args.profile,
        device=args.device,
        out=args.out,
        data_root=args.data_root,
        match_accuracy=args.match_accuracy,
        progress=not args.no_progress,
        command="capsbench " + " ".join(sys.argv[1:]),
        executor=args.executor,
        ray_address=args.ray_address,
        cpus_per_task=1 if args.cpus_per_task is None else args.cpus_per_task,
        deterministic=args.deterministic,
        amp=args.amp,
        speed=speed_options(args),
        epochs=args.epochs,
        checkpoints=ckpts or None,
    )
    if not args.no_report:
        from capsbench.report.build import verdict_lines, write_report

        path = write_report([run_dir], run_dir / "report")
        for line in verdict_lines(run_dir / "report"):
            print(line)
        print(f"report: {path}")
    return failure_exit(run_dir)


def failure_exit(run_dir) -> int:
    """Exit code 1, with one line on stderr, when jobs or cells of the run folder failed."""
    import json

    failed = json.loads((run_dir / "run.json").read_text()).get("failed") or {}
    jobs, cells = int(failed.get("jobs", 0)), int(failed.get("cells", 0))
    if not jobs and not cells:
        return 0
    print(f"capsbench: {jobs} training job(s) and {cells} cell(s) failed; their errors are the rows with "
          f"an 'error' in {run_dir / 'results.csv'} (a rerun tries them again)", file=sys.stderr)
    return 1


def add_commands(sub, add_common) -> None:
    from capsbench.cli.args import add_speed_args, positive_float, positive_int

    p = sub.add_parser("run", help="run a robustness suite: train what it needs, evaluate every cell")
    p.add_argument("--suite", required=True, help="suite name (capsbench list suites)")
    p.add_argument("--models", default=None,
                   help="comma-separated model names, or pkg.module:factory for a model from outside capsbench "
                        "(default: the suite's)")
    p.add_argument("--checkpoint", action="append", default=None, metavar="[MODEL=]PATH",
                   help="score this model's weights instead of training it (a capsbench job's checkpoint.pt or "
                        "a state dict); repeat for more seeds or models")
    p.add_argument("--seeds", type=positive_int, default=None,
                   help="seeds 0..N-1 of every model (default: 3 of the two models the suite's claim compares, "
                        "capsnet and cnn_maxpool, so that the claim gets a verdict; 1 of the others)")
    p.add_argument("--profile", default="quick", help="smoke, quick (CPU default) or paper")
    p.add_argument("--epochs", type=positive_float, default=None,
                   help="train every model for this many epochs instead of the profile's budget")
    p.add_argument("--match-accuracy", type=positive_float, default=None,
                   help="stop each model's training when its accuracy on the validation split (training digits "
                        "held out, placed as in training) reaches this fraction, e.g. 0.992")
    p.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="local: this process (default); ray: each training job and evaluation batch as a Ray task")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to use with --executor ray (e.g. ray://HEAD:10001 or auto); "
                        "default: start a local one for the run")
    p.add_argument("--cpus-per-task", type=positive_int, default=None,
                   help="CPUs (and torch threads) per Ray task (default 1)")
    p.add_argument("--deterministic", action="store_true",
                   help="reproducible kernels (torch.use_deterministic_algorithms); recorded in run.json")
    add_speed_args(p)
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar or progress lines while a model trains: one line per job and cell")
    add_common(p)
    p.set_defaults(func=cmd_run)
