"""The ``capsbench`` command: list, data, train (run, report and profile build on these)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from capsbench.errors import CapsbenchError


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


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
            print(f"{name:<8} batch {p.batch_size}, eval images per cell {p.eval_images or 'all'}, "
                  f"steps {p.steps or f'{p.epochs:g} epochs'}")
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

    if args.action == "info":
        root = data.resolve_data_root(args.data_root)
        print(f"data root: {root}")
        for row in data.data_info(args.data_root):
            if row.get("present"):
                print(f"  {row['dataset']:<14} {row.get('split', ''):<5} {row['file']:<28} {row.get('status', ''):<16} "
                      f"sha256 {str(row.get('sha256', ''))[:16]}  md5 {row.get('md5', '')}")
            else:
                print(f"  {row['dataset']:<14} {row.get('split', ''):<5} {row['file']:<28} missing")
        return 0
    names = [args.name] if args.name else ["mnist", "fashion_mnist"]
    for name in names:
        paths = data.fetch_dataset(name, args.data_root)
        print(f"{name}: {len(paths)} file(s) ready under {data.resolve_data_root(args.data_root)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from capsbench.data import resolve_data_root
    from capsbench.models import model_info
    from capsbench.runner import TrainConfig, evaluate_clean, resolve_device, train, train_rows
    from capsbench.store import ensure_writable_dir, environment_info, write_json, write_rows_csv

    model_info(args.model)  # an unknown name stops here, listing the known ones
    cfg = TrainConfig(
        model=args.model,
        dataset=args.dataset,
        protocol=args.protocol,
        profile=args.profile,
        seed=args.seed,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr if args.lr is not None else 1e-3,
        amp=args.amp,
    ).validate()
    out = ensure_writable_dir(args.out)
    dev = resolve_device(args.device)
    result = train(cfg, out=out, data_root=args.data_root, device=dev, progress=not args.no_progress)
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
        },
    )
    print(
        f"{cfg.model}: clean {cfg.dataset} test accuracy {clean['accuracy'] * 100:.2f}% "
        f"(n={int(clean['n'])}), {result.steps_done} steps in {result.train_time_s:.0f} s "
        f"({result.images_per_s:.0f} images/s){' [reused]' if result.reused else ''}"
    )
    print(f"run directory: {result.job_dir}")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="capsbench",
        description="Benchmark Capsule Networks against CNNs: train, evaluate robustness, report.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
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
    pt.add_argument("--epochs", type=_positive_float, default=None)
    pt.add_argument("--steps", type=_positive_int, default=None)
    pt.add_argument("--batch-size", type=_positive_int, default=None)
    pt.add_argument("--lr", type=_positive_float, default=None)
    pt.add_argument("--seed", type=_nonneg_int, default=0)
    pt.add_argument("--amp", choices=["bf16"], default=None, help="bf16 autocast (CUDA only)")
    pt.add_argument("--no-progress", action="store_true")
    _add_common(pt)
    pt.set_defaults(func=cmd_train)

    from capsbench import profile_cli, report_cli, suite_cli

    for module in (suite_cli, report_cli, profile_cli):
        module.add_commands(sub, _add_common)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.debug:
        import warnings

        warnings.formatwarning = lambda msg, cat, *a, **k: f"capsbench: warning: {msg}\n"
    if os.environ.get("CAPSBENCH_THREADS"):
        import torch

        torch.set_num_threads(int(os.environ["CAPSBENCH_THREADS"]))
    try:
        return int(args.func(args) or 0)
    except CapsbenchError as e:
        if args.debug:
            traceback.print_exc()
        print(f"capsbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("capsbench: interrupted; finished work is saved and a rerun resumes it", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
