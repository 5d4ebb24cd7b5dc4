"""The ``capsbench list`` and ``capsbench data`` subcommands."""

from __future__ import annotations

import argparse
import shlex

# --------------------------------------------------------------------------- commands


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "models":
        from capsbench.errors import CapsbenchError
        from capsbench.models import count_parameters, create_model, list_models, model_info

        def params(name: str, size: int) -> tuple[list[str], str | None]:
            try:
                m = create_model(name, input_size=size)
            except CapsbenchError as e:  # a plug-in that is broken, or takes one input size only
                return ["-", "-"], str(e)
            return [f"{count_parameters(m):,}", f"{count_parameters(m, decoder=False):,}"], None

        print(f"{'name':<18} {'family':<8} {'params@28':>12} {'no decoder':>12} {'params@40':>12}  source")
        broken = []
        for name in list_models():
            meta = model_info(name)
            ((p28, n28), why), ((p40, _), _) = params(name, 28), params(name, 40)
            if why is not None and p40 == "-":
                broken.append(why)
            family = meta.get("family") or ("plug-in" if meta.get("source") else "?")
            source = meta.get("paper") or (f"{meta['source']} ({meta.get('plugin')})" if meta.get("source") else "")
            print(f"{name:<18} {family:<8} {p28:>12} {n28:>12} {p40:>12}  {source}")
        print("params: all of the model's parameters; no decoder: those at 28x28 less the reconstruction "
              "decoder's, as the capsule papers count them")
        for line in broken:
            print(f"capsbench: warning: {line}")
    elif args.what == "profiles":
        from capsbench.train.profiles import PROFILES

        rows = []
        for name in PROFILES:
            p = PROFILES.get(name)
            sched = "linear to 0" if p.lr_schedule == "linear" else "x0.96 / 2,000 steps"
            lrs = f"{p.lr:g}" + "".join(f", {m} {v:g}" for m, v in p.lr_per_model.items())
            if p.steps:
                default = p.steps.get("*")
                named = [f"{m} {v:,}" for m, v in p.steps.items() if m != "*" and v != default]
                steps = ", ".join(named + ([f"{'others' if named else 'every model'} {default:,}"] if default else []))
            else:
                steps = f"{p.epochs:g} epochs"
            scale = "".join(f"; x{v:g} on {k}" for k, v in p.protocol_scale.items())
            rows.append((name, str(p.batch_size), f"{lrs} ({sched})", str(p.eval_images or "all"),
                         f"{100 * p.match_tolerance:g}", steps + scale))
        head = ("profile", "batch", "Adam learning rate (schedule)", "test images/cell", "match tol. (pt)", "steps")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
        for r in [head, *rows]:
            print("  ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    elif args.what == "protocols":
        from capsbench.train.protocols import PROTOCOLS

        for name in PROTOCOLS:
            print(f"{name:<18} {PROTOCOLS.get(name).description}")
        print(f"{'PROTOCOL+rotN':<18} the protocol after a random rotation in [-N, N] degrees, N from 1 to 180 "
              "(in a suite run: --models MODEL@rotN)")
    elif args.what == "suites":
        from capsbench.suites.base import get_suite, list_suites

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
            if not row.get("present") and row["dataset"] == "affnist":
                print(f"{where} missing: the affnist suite scores the generated, seeded affNIST-style set "
                      "(affnist_synth) instead; for the real one put test.mat or test_batches/*.mat from "
                      f"https://www.cs.toronto.edu/~tijmen/affNIST/ under {root / 'affNIST'}")
            elif not row.get("present"):
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


def add_commands(sub, add_common) -> None:
    """Add ``list`` and ``data`` to the ``capsbench`` subcommands."""
    pl = sub.add_parser("list", help="list models, suites, profiles or training protocols")
    pl.add_argument("what", choices=["models", "suites", "profiles", "protocols"])
    pl.set_defaults(func=cmd_list)

    pd_ = sub.add_parser("data", help="inspect or download data sets")
    dsub = pd_.add_subparsers(dest="action", required=True, metavar="ACTION")
    pi = dsub.add_parser("info", help="list the data files found under the data root")
    pi.add_argument("--data-root", default=None, help="data root (else $CAPSBENCH_DATA, else ./datasets)")
    pi.set_defaults(func=cmd_data)
    pf = dsub.add_parser("fetch", help="download MNIST / Fashion-MNIST (needs internet)")
    pf.add_argument("name", nargs="?", choices=["mnist", "fashion_mnist"])
    pf.add_argument("--data-root", default=None,
                    help="where to download to (else $CAPSBENCH_DATA, else ./datasets, created if absent)")
    pf.set_defaults(func=cmd_data)
