"""The ``capsbench report`` subcommand."""

from __future__ import annotations

import argparse


def compare_pairs(values: list[str] | None) -> list[tuple[str, str]]:
    """``--compare A:B`` options as (A, B) pairs."""
    from capsbench.errors import ConfigError

    pairs = []
    for v in values or []:
        a, sep, b = v.partition(":")
        if not sep or not a.strip() or not b.strip() or ":" in b:
            raise ConfigError(f"--compare {v!r}: write two model names of the runs as A:B, e.g. my_caps:capsnet")
        pairs.append((a.strip(), b.strip()))
    return pairs


def cmd_report(args: argparse.Namespace) -> int:
    from capsbench.report.build import verdict_lines, write_report
    from capsbench.report.claims import list_claims, load_claims

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics is not None else None
    claims = list_claims() + [c for f in args.claims or [] for c in load_claims(f)]
    path = write_report(args.run_dirs, args.out, title=args.title, data_root=args.data_root, metrics=metrics,
                        claims=claims, compare=compare_pairs(args.compare))
    for line in verdict_lines(path.parent):
        print(line)
    print(f"report: {path}")
    print(f"        {path.parent / 'report.md'}")
    return 0


def add_commands(sub, add_common=None) -> None:
    """Add ``report`` to the ``capsbench`` subcommands.

    ``add_common`` is accepted for the common signature but not used: the shared --out and
    --device options do not fit a report (its output folder is -o/--out, default
    reports/latest, and it trains nothing).
    """
    p = sub.add_parser(
        "report",
        help="write tables, figures and claim verdicts (HTML and Markdown) from run directories",
        description="Write index.html, report.md, tables/*.csv and figures/*.png for one or more run "
        "directories written by `capsbench run` (a folder holding several run directories is expanded).",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, e.g. runs/rotation-quick")
    p.add_argument("-o", "--out", default="reports/latest", help="output folder (default: reports/latest)")
    p.add_argument("--title", default=None, help="report title (default: names the runs)")
    p.add_argument("--data-root", default=None,
                   help="data root for the example images and reconstructions (default: each run's own)")
    p.add_argument("--metrics", default=None,
                   help="comma-separated metrics for the tables: accuracy, confidence, unchanged (default: all)")
    p.add_argument("--compare", action="append", default=None, metavar="A:B",
                   help="also judge the claim 'A is more accurate than B' on the transformed cells of every suite "
                        "whose runs hold both models (same statistics and verdict rule); repeatable")
    p.add_argument("--claims", action="append", default=None, metavar="FILE",
                   help="also judge the claims in this JSON or TOML file (fields of capsbench.Claim); repeatable")
    p.set_defaults(func=cmd_report)
