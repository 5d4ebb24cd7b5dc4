"""Reports: from run directories to claim verdicts, tables, figures and Markdown/HTML.

The flow: :mod:`load` reads runs, :mod:`summary` and :mod:`stats` give means and intervals,
:mod:`claims` the verdicts, :mod:`figures` and :mod:`render` the document, :mod:`build` puts
it together (:func:`write_report`); :mod:`cost` is the section on speed and FLOPs.
"""

from capsbench.report.build import check_metrics, verdict_lines, write_report
from capsbench.report.claims import CLAIMS, VERDICT_RULE, Claim, Verdict, evaluate_claim
from capsbench.report.load import CLEAN_CELLS, Run, find_run_dirs, load_run, load_runs
from capsbench.report.stats import (
    compare_paired,
    holm,
    t_half_width,
    two_way_mean,
    verdict_word,
    wilson_interval,
)
from capsbench.report.summary import summarize

__all__ = [
    "CLAIMS",
    "CLEAN_CELLS",
    "VERDICT_RULE",
    "Claim",
    "Run",
    "Verdict",
    "check_metrics",
    "compare_paired",
    "evaluate_claim",
    "find_run_dirs",
    "holm",
    "load_run",
    "load_runs",
    "summarize",
    "t_half_width",
    "two_way_mean",
    "verdict_lines",
    "verdict_word",
    "wilson_interval",
    "write_report",
]
