"""The documentation stays true to its data: docs/results.md's table is docs/results.csv's, and every
relative link of README.md and docs/*.md reaches a file."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
TABLE_START, TABLE_END = "<!-- results-table", "<!-- end results-table -->"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)  # code blocks hold commands, not links


def load_plot_results():
    spec = importlib.util.spec_from_file_location("plot_results", DOCS / "plot_results.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_table_is_the_csv():
    plot_results = load_plot_results()
    page = (DOCS / "results.md").read_text()
    start = page.index(TABLE_START)
    table = page[page.index("\n", start) + 1 : page.index(TABLE_END)]
    expected = plot_results.markdown_table(plot_results.read_rows(DOCS / "results.csv"))
    assert table == expected, "docs/results.md's table differs from docs/results.csv: paste the output of " + (
        "`uv run python docs/plot_results.py --table` between its markers"
    )


def test_every_csv_row_names_its_n_processor_and_command():
    rows = load_plot_results().read_rows(DOCS / "results.csv")
    assert rows
    for row in rows:
        assert int(row["n"]) > 0 and row["processor"] and row["command"].startswith("uv run"), row
        assert abs(float(row["fid"]) / float(row["floor"]) - float(row["ratio"])) < 0.01 * float(row["ratio"]), row


def relative_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_a_file(page):
    missing = [t for t in relative_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"
