"""The report as a document (sections, tables, figures) and its Markdown and HTML renderings."""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from capsbench.report.load import PROPORTION_METRICS

# --------------------------------------------------------------------------- formatting


def _pct(x: Any, digits: int = 2) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "—"
    return "—" if not np.isfinite(x) else f"{100 * x:.{digits}f}"


def _params_h(p: Any) -> str:
    try:
        p = float(p)
    except (TypeError, ValueError):
        return "?"
    if not np.isfinite(p):
        return "?"
    if p >= 1e6:
        return f"{p / 1e6:.2f}M"
    if p >= 1e3:
        return f"{p / 1e3:.1f}k"
    return f"{int(p)}"


def _fmt_value(r: pd.Series) -> str:
    """'97.31 ± 0.42' over seeds, or '13.28 (Wilson 9.71–17.88)' for one seed."""
    if r["metric"] in PROPORTION_METRICS or r["metric"] == "confidence":
        m = _pct(r["mean"])
        if r["n_seeds"] >= 2:
            return f"{m} ± {100 * r['ci_half']:.2f}"
        if np.isfinite(r.get("wilson_low", np.nan)):
            return f"{m} (Wilson {_pct(r['wilson_low'])}–{_pct(r['wilson_high'])})"
        return f"{m} (n/a, 1 seed)"
    if r["n_seeds"] >= 2:
        return f"{r['mean']:.4g} ± {r['ci_half']:.2g}"
    return f"{r['mean']:.4g}"


def try_draw(skipped: list[str], what: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
    """Call ``fn`` (it draws a figure); ``(True, its result)``, or ``(False, None)`` with the
    error appended to ``skipped`` as ``"what: Error: message"``: a figure that cannot be drawn
    is reported, not fatal."""
    try:
        return True, fn()
    except Exception as e:
        skipped.append(f"{what}: {type(e).__name__}: {e}")
        return False, None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


# --------------------------------------------------------------------------- document model


@dataclass
class Table:
    df: pd.DataFrame
    caption: str = ""
    csv_name: str | None = None


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Doc:
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, df: pd.DataFrame, caption: str = "", csv_name: str | None = None) -> None:
        self.blocks.append(("table", Table(df, caption, csv_name)))

    def figure(self, path: Path, caption: str) -> None:
        self.blocks.append(("fig", Figure(path, caption)))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def toc(self) -> None:
        """A table of contents here: every level-2 heading of the document, linked."""
        self.blocks.append(("toc", None))

    def anchors(self) -> list[tuple[int, str, str]]:
        """(level, text, anchor) of every heading, anchors as GitHub makes them (lower case,
        punctuation dropped, spaces to '-', '-1', '-2' after repeats), the same in Markdown and HTML."""
        seen: dict[str, int] = {}
        out = []
        for kind, val in self.blocks:
            if kind != "h":
                continue
            level, text = val
            base = re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text.strip().lower()))
            k = seen.get(base, 0)
            seen[base] = k + 1
            out.append((level, text, base if k == 0 else f"{base}-{k}"))
        return out


def _md_cell(x: Any) -> str:
    s = "" if x is None or (isinstance(x, float) and math.isnan(x)) else str(x)
    return s.replace("|", "\\|").replace("\n", " ")


def render_markdown(doc: Doc, out_dir: Path) -> str:
    out: list[str] = []
    for kind, val in doc.blocks:
        if kind == "toc":
            out.append("Contents: " + " · ".join(f"[{t}](#{a})" for lvl, t, a in doc.anchors() if lvl == 2) + "\n")
        elif kind == "h":
            level, text = val
            out.append(f"{'#' * level} {text}\n")
        elif kind == "p":
            out.append(f"{val}\n")
        elif kind == "ul":
            out.append("\n".join(f"- {_md_cell(i)}" for i in val) + "\n")
        elif kind == "code":
            out.append(f"```\n{val}\n```\n")
        elif kind == "table":
            t: Table = val
            if t.caption:
                out.append(f"{t.caption}\n")
            cols = [str(c) for c in t.df.columns]
            lines = ["| " + " | ".join(_md_cell(c) for c in cols) + " |", "|" + "---|" * len(cols)]
            for row in t.df.itertuples(index=False):
                lines.append("| " + " | ".join(_md_cell(x) for x in row) + " |")
            out.append("\n".join(lines) + "\n")
        elif kind == "fig":
            f: Figure = val
            rel = f.path.relative_to(out_dir).as_posix()
            out.append(f"![{_md_cell(f.caption)}]({rel})\n\n*{f.caption}*\n")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
figure{margin:1em 0 2em}
img{max-width:100%;height:auto}
figcaption,.caption{color:#555;font-size:.9em}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em}
nav.toc{background:#f7f7f7;border:1px solid #ddd;padding:.4em 1em;margin:1em 0}
nav.toc ul{margin:.3em 0;padding-left:1.2em;columns:2}
.verdict-supported{color:#0a6b0a;font-weight:bold}
.verdict-refuted{color:#a40000;font-weight:bold}
.verdict-negligible{color:#444;font-weight:bold}
.verdict-inconclusive{color:#8a6d00;font-weight:bold}
"""


def render_html(doc: Doc, title: str) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8" />',
        f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
    ]
    heads = iter(doc.anchors())
    for kind, val in doc.blocks:
        if kind == "toc":
            items = "".join(f'<li><a href="#{e(a)}">{e(t)}</a></li>' for lvl, t, a in doc.anchors() if lvl == 2)
            parts.append(f'<nav class="toc"><strong>Contents</strong><ul>{items}</ul></nav>')
        elif kind == "h":
            level, text = val
            anchor = next(heads)[2]
            parts.append(f'<h{level} id="{e(anchor)}">{e(text)}</h{level}>')
        elif kind == "p":
            parts.append(f"<p>{e(val)}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{e(str(i))}</li>" for i in val) + "</ul>")
        elif kind == "code":
            parts.append(f"<pre>{e(val)}</pre>")
        elif kind == "table":
            t: Table = val
            if t.caption:
                parts.append(f'<p class="caption">{e(t.caption)}</p>')
            head = "".join(f"<th>{e(str(c))}</th>" for c in t.df.columns)
            body = []
            for row in t.df.itertuples(index=False):
                cells = []
                for c, x in zip(t.df.columns, row, strict=True):
                    s = _md_cell(x).replace("\\|", "|")
                    cls = f' class="verdict-{_slug(s).replace("_", "-")}"' if c == "verdict" else ""
                    cells.append(f"<td{cls}>{e(s)}</td>")
                body.append("<tr>" + "".join(cells) + "</tr>")
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
        elif kind == "fig":
            f: Figure = val
            data = base64.b64encode(f.path.read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img alt="{e(f.caption)}" src="data:image/png;base64,{data}" />'
                f"<figcaption>{e(f.caption)}</figcaption></figure>"
            )
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)
