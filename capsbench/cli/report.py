"""The ``capsbench report`` subcommand."""

from __future__ import annotations

import argparse


def cmd_report(args: argparse.Namespace) -> int:
    from capsbench.report.build import write_report

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics is not None else None
    path = write_report(args.run_dirs, args.out, title=args.title, data_root=args.data_root, metrics=metrics)
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
    p.set_defaults(func=cmd_report)
