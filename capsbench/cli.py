"""The ``capsbench`` command: list, data, train (run, report and profile build on these)."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import traceback
import warnings
from collections.abc import Sequence

from capsbench.errors import CapsbenchError, ConfigError, DataError
from capsbench.malloc import keep_freed_memory


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other capsbench error.

    argparse prints the whole usage block before its message; on a terminal the one line that
    matters then scrolls past. The usage stays one ``--help`` away, and the line says so.
    """

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {lo}, got {v}")
        return v

    return parse


def _version() -> str:
    """capsbench's version: the installed package's, else ``capsbench.__version__`` (a source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("capsbench")
    except PackageNotFoundError:
        import capsbench

        return str(getattr(capsbench, "__version__", "unknown"))


class _VersionAction(argparse.Action):
    """``--version``: like argparse's, but looks the version up only when asked (~50 ms)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {_version()}")  # on stdout, as argparse's own --version
        parser.exit()


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return v


def _add_speed_args(p: argparse.ArgumentParser) -> None:
    """The flags that choose how training runs on a GPU (``capsbench train`` and ``run``)."""
    p.add_argument("--amp", choices=["bf16"], default=None, help="train under bf16 autocast (CUDA only)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC weights and inputs (faster on GPUs). Default: on CPUs for the models whose "
                        "convolutions run faster that way (efficientnet_b0, lenet5), off elsewhere")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture the whole training step as one CUDA graph and replay it (CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only)")


def _speed_options(args: argparse.Namespace, curve: bool = False):
    """The :class:`~capsbench.runner.SpeedOptions` of the flags :func:`_add_speed_args` adds."""
    from capsbench.runner import SpeedOptions

    return SpeedOptions(channels_last=args.channels_last, cuda_graph=args.cuda_graph, compile=args.compile,
                        curve=curve)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None, help="data root (else $CAPSBENCH_DATA, else ./datasets)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N")
    p.add_argument("--out", default="runs", help="output folder (default: runs/)")


# --------------------------------------------------------------------------- commands


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "models":
        from capsbench.models import count_parameters, create_model, list_models, model_info

        print(f"{'name':<18} {'family':<8} {'params@28':>12} {'params@40':>12}  default input  source")
        for name in list_models():
            meta = model_info(name)
            p28 = count_parameters(create_model(name, input_size=28))
            p40 = count_parameters(create_model(name, input_size=40))
            print(f"{name:<18} {meta.get('family', '?'):<8} {p28:>12,} {p40:>12,}  28x28          {meta.get('paper', '')}")
    elif args.what == "profiles":
        from capsbench.profiles import PROFILES

        for name in PROFILES:
            p = PROFILES.get(name)
            sched = "linear to 0" if p.lr_schedule == "linear" else "x0.96 per 2,000 steps"
            lrs = f"{p.lr:g}" + "".join(f", {m} {v:g}" for m, v in p.lr_per_model.items())
            print(f"{name:<8} batch {p.batch_size}, Adam lr {lrs} ({sched}), eval images per cell "
                  f"{p.eval_images or 'all'}, steps {p.steps or f'{p.epochs:g} epochs'}")
    elif args.what == "protocols":
        from capsbench.runner import PROTOCOLS

        for name in PROTOCOLS:
            print(f"{name:<18} {PROTOCOLS.get(name).description}")
    elif args.what == "suites":
        from capsbench.suites import get_suite, list_suites

        for name in list_suites():
            s = get_suite(name)
            print(f"{name:<18} train {s.dataset}:{s.protocol}, {len(s.cells)} cells: {s.description}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from capsbench import data

    root = data.resolve_data_root(args.data_root)
    if args.action == "info":
        print(f"data root: {root}")
        damaged: dict[str, int] = {}
        for row in data.data_info(args.data_root):
            where = f"  {row['dataset']:<14} {row.get('split', ''):<5} {row['file']:<28}"
            if not row.get("present"):
                print(f"{where} missing")
            elif row.get("status") == "damaged":
                print(f"{where} damaged: {row.get('problem')}")
                damaged[row["dataset"]] = damaged.get(row["dataset"], 0) + 1
            else:
                print(f"{where} {row.get('status', ''):<16} "
                      f"sha256 {str(row.get('sha256', ''))[:16]}  md5 {row.get('md5', '')}")
        given = f" --data-root {shlex.quote(args.data_root)}" if args.data_root else ""
        for name, n in damaged.items():
            print(f"{name}: {n} damaged file(s); copy good ones in their place, or run "
                  f"'capsbench data fetch {name}{given}' when online to replace them")
        return 0
    names = [args.name] if args.name else ["mnist", "fashion_mnist"]
    for name in names:
        got = len(data.fetch_dataset(name, args.data_root))
        total = len(data.DATASETS[name].filenames())
        print(f"{name}: {total} files present under {root} ({got} downloaded now, {total - got} already there)")
    return 0


def _train_config(args: argparse.Namespace):
    """The validated :class:`~capsbench.runner.TrainConfig` of ``capsbench train``."""
    from capsbench.models import model_info
    from capsbench.runner import TrainConfig

    model_info(args.model)  # an unknown name stops here, listing the known ones
    return TrainConfig(
        model=args.model,
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
    from capsbench.data import resolve_data_root
    from capsbench.runner import (
        check_device_options,
        evaluate_clean,
        resolve_device,
        set_deterministic,
        train_rows,
        train_with_retry,
    )
    from capsbench.store import ensure_writable_dir, environment_info, write_json, write_rows_csv

    cfg = _train_config(args)
    out = ensure_writable_dir(args.out)
    dev = resolve_device(args.device)
    speed = check_device_options(dev, cfg.amp, _speed_options(args, curve=args.curve))
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


# --------------------------------------------------------------------------- checks before any work
#
# A mistake in what was typed or in the files pointed at must stop a command within seconds,
# with one line, before it creates or changes anything: not after minutes of training, and
# not by leaving an empty or half-rewritten run directory behind. Each command's checks run
# here, before the command itself; the commands keep their own checks for library callers.


def _model_list(text: str | None) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()] if text else []


def _check_models(names: Sequence[str], option: str = "--models") -> None:
    from capsbench.models import list_models

    known = list_models()
    unknown = [m for m in names if m not in known]
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
    from capsbench.data import DATA_ENV, resolve_data_root

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
    from capsbench.data import ensure_dataset, load_affnist_test

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
        from capsbench.runner import check_device_options, resolve_device

        cfg = _train_config(args)
        check_device_options(resolve_device(args.device), cfg.amp, _speed_options(args, curve=args.curve))
        _check_data_root(args)
        out = check_writable_dir(args.out)
        check_writable_dir(out / "jobs")
        _check_data(args.dataset, args.data_root)
    elif command == "run":
        from capsbench.profiles import get_profile
        from capsbench.runner import TrainConfig, check_device_options, resolve_device
        from capsbench.suites import get_suite

        suite = get_suite(args.suite)
        profile = get_profile(args.profile)
        models = _model_list(getattr(args, "models", None)) or list(suite.default_models)
        _check_models(models)
        match = getattr(args, "match_accuracy", None)
        for model in models:
            TrainConfig(model=model, dataset=suite.dataset, protocol=suite.protocol,
                        profile=profile.name, match_accuracy=match).validate()
        check_device_options(resolve_device(args.device), args.amp, _speed_options(args))
        _check_data_root(args)
        out = check_writable_dir(args.out)
        check_writable_dir(out / f"{suite.name}-{profile.name}")
        check_writable_dir(out / "jobs")
        _check_data(suite.dataset, args.data_root, affnist=any(c.eval_data == "affnist" for c in suite.cells))
    elif command == "profile":
        from capsbench.runner import resolve_device

        _check_models(_model_list(args.models))
        resolve_device(args.device)
        check_writable_dir(args.out)
    elif command == "report":
        from capsbench.report import check_metrics

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
    from capsbench.models import fused_routing
    from capsbench.models.base import env_choice
    from capsbench.models.capsnet import ROUTING_KERNELS
    from capsbench.models.fft_conv import CONV_IMPLS

    try:
        env_choice("CAPSBENCH_CONV", CONV_IMPLS)
        env = env_choice("CAPSBENCH_ROUTING", ROUTING_KERNELS)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    kernel = getattr(args, "routing", "auto")
    kernel = env if kernel == "auto" else kernel
    device = getattr(args, "device", None)
    if kernel == "cpp":
        from capsbench.models import cpu_routing

        if device is not None:
            from capsbench.runner import resolve_device

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
        from capsbench.runner import resolve_device

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


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="capsbench",
        description="Benchmark Capsule Networks against CNNs: train, evaluate robustness, report.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("--version", action=_VersionAction, help="print capsbench's version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pl = sub.add_parser("list", help="list models, suites, profiles or training protocols")
    pl.add_argument("what", choices=["models", "suites", "profiles", "protocols"])
    pl.set_defaults(func=cmd_list)

    pd_ = sub.add_parser("data", help="inspect or download data sets")
    dsub = pd_.add_subparsers(dest="action", required=True, metavar="ACTION")
    pi = dsub.add_parser("info", help="list the data files found under the data root")
    pi.add_argument("--data-root", default=None)
    pi.set_defaults(func=cmd_data)
    pf = dsub.add_parser("fetch", help="download MNIST / Fashion-MNIST (needs internet)")
    pf.add_argument("name", nargs="?", choices=["mnist", "fashion_mnist"])
    pf.add_argument("--data-root", default=None)
    pf.set_defaults(func=cmd_data)

    pt = sub.add_parser("train", help="train one model and score it on the clean test set")
    pt.add_argument("--model", required=True)
    pt.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist"])
    pt.add_argument("--protocol", default="mnist28_shift2", help="training data protocol (capsbench list protocols)")
    pt.add_argument("--profile", default="quick", help="smoke, quick (CPU default) or paper")
    budget = pt.add_mutually_exclusive_group()  # both given, one would silently win
    budget.add_argument("--epochs", type=_positive_float, default=None,
                        help="train for this many epochs instead of the profile's budget")
    budget.add_argument("--steps", type=_positive_int, default=None,
                        help="train for this many steps instead of the profile's budget")
    pt.add_argument("--batch-size", type=_positive_int, default=None)
    pt.add_argument("--lr", type=_positive_float, default=None)
    pt.add_argument("--seed", type=_nonneg_int, default=0)
    _add_speed_args(pt)
    pt.add_argument("--match-accuracy", type=_positive_float, default=None,
                    help="stop when accuracy on the validation split reaches this fraction (as capsbench run: "
                         "a job trained here is reused by a run with the same settings)")
    pt.add_argument("--curve", action="store_true",
                    help="evaluate the validation split after every epoch and keep the learning curve in job.json")
    pt.add_argument("--deterministic", action="store_true",
                    help="reproducible kernels (torch.use_deterministic_algorithms); recorded in run.json")
    pt.add_argument("--no-progress", action="store_true")
    _add_common(pt)
    pt.set_defaults(func=cmd_train)

    from capsbench import profile_cli, report_cli, suite_cli

    for module in (suite_cli, report_cli, profile_cli):
        module.add_commands(sub, _add_common)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``capsbench`` command; return its exit code.

    A mistake the user can fix (a :class:`CapsbenchError`: a bad name, number, data file or
    output folder) prints one line, ``capsbench: error: ...``, and returns 2; ``--debug``
    prints the traceback too. Bad options stop in argparse with one line and exit code 2
    (``SystemExit``). Before a command starts, :func:`_preflight` checks what it will need,
    so such mistakes stop it before it creates or changes anything. Warnings issued by
    those checks (e.g. an unverified data file) are shown only when the command goes on.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        warnings.formatwarning = lambda msg, cat, *a, **k: f"capsbench: warning: {msg}\n"
    caught: list[warnings.WarningMessage] = []
    try:
        _set_threads()
        keep_freed_memory()
        _check_routing(args)
        with warnings.catch_warnings(record=True) as caught:
            _preflight(args)
        _replay(caught)
        return int(args.func(args) or 0)
    except CapsbenchError as e:
        if args.debug:
            _replay(caught)
            traceback.print_exc()
        print(f"capsbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("capsbench: interrupted; finished work is saved and a rerun resumes it", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
