"""The ``capsbench`` command: list, data, train (run, report and profile build on these)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from collections.abc import Sequence

from capsbench.cli.args import (
    Parser,
    add_common,
)
from capsbench.cli.checks import _check_routing, _preflight, _replay, _set_threads
from capsbench.errors import CapsbenchError
from capsbench.malloc import keep_freed_memory
from capsbench.perf.isa import apply_limit


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


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="capsbench",
        description="Benchmark Capsule Networks against CNNs: train, evaluate robustness, report.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("--version", action=_VersionAction, help="print capsbench's version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from capsbench.cli import data as data_cli
    from capsbench.cli import profile as profile_cli
    from capsbench.cli import report as report_cli
    from capsbench.cli import run as suite_cli
    from capsbench.cli import train as train_cli

    for module in (data_cli, train_cli, suite_cli, report_cli, profile_cli):
        module.add_commands(sub, add_common)
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
        apply_limit()  # CAPSBENCH_CPU_ISA=avx2: before anything loads torch
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
    except BrokenPipeError:  # the reader went away (`capsbench list models | head -1`): end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that Python's flush at exit does not complain
        return 141  # as a process killed by SIGPIPE
    except KeyboardInterrupt:
        print("capsbench: interrupted; finished work is saved and a rerun resumes it", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
