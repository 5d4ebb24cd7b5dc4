"""The user-facing Markdown (README, docs/, committed reports' READMEs): every relative link
points at a file that exists, and a link to a heading finds that heading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "reports").glob("*/README.md")),
         *sorted((REPO / "reports").glob("*/report.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to '-'."""
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http(s), mailto
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_the_readme_leads_with_the_two_commands_and_the_answer():
    lines = (REPO / "README.md").read_text().splitlines()
    fences = [i for i, ln in enumerate(lines) if ln.startswith("```")]
    commands = lines[fences[0] + 1:fences[1]]
    assert len(commands) == 2 and "capsbench run --suite rotation" in commands[0] and "pytest" in commands[1]
    head = "\n".join(lines[:40])
    assert "## What it found" in head and "## How to start" in head


def test_the_readme_model_table_matches_the_registry():
    """Every registered model has a row, and its two parameter counts are the models' own."""
    from capsbench.models import count_parameters, create_model, list_models

    rows = {}
    for line in (REPO / "README.md").read_text().split("### Models", 1)[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (int(cells[2].replace(",", "")), int(cells[3].replace(",", "")))
        elif rows and not line.startswith("|"):
            break
    assert set(rows) == set(list_models())
    for name, (total, without) in rows.items():
        m = create_model(name, input_size=28)
        assert (count_parameters(m), count_parameters(m, decoder=False)) == (total, without), name
