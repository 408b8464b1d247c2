"""The measured numbers of the pages are the result files' (``benchmarks/report.py``): every
region of ``benchmarks/RESULTS.md`` and ``docs/*.md`` shows what its result file gives, so a
run that changes a result file without ``python -m benchmarks.report`` fails here."""

import csv
import io
import re

import pytest

from benchmarks import report


def test_every_region_shows_its_result_file():
    stale = report.stale()
    assert not stale, "regions that differ from their result files (run `python -m benchmarks.report`):\n" + "\n".join(stale)


def test_the_pages_quote_through_regions():
    """The pages that quote measurements have their regions (a marker that no longer parses would leave none)."""
    counts = {path.relative_to(report.REPO).as_posix(): len(report._REGION.findall(path.read_text(encoding="utf-8"))) for path in report.pages()}
    for page in ("benchmarks/RESULTS.md", "docs/real_model.md", "docs/serving.md", "docs/memory-bound.md"):
        assert counts[page] > 0, f"{page} has no region"


def test_the_markers_survive_markdown():
    """Markdown takes a line (or a list item) that starts with an HTML comment for an HTML block,
    which ends the paragraph, so a figure's region sits after some words of its line; and the
    math extension would typeset a ``\\(…\\)`` inside a marker and break the comment open
    (regular expressions in a marker write ``[(]`` instead)."""
    starts = re.compile(r"(?m)^[ \t]*(?:(?:[-*]|\d+\.)[ \t]+)?<!-- report: [^\n]*?-->(?!\n)")
    found = []
    for path in report.pages():
        page = path.read_text(encoding="utf-8")
        found += [f"{path.name}, at the start of a line: {m.group(0).strip()[:90]}" for m in starts.finditer(page)]
        found += [f"{path.name}, math delimiters: {spec[:90]}" for spec in re.findall(r"<!-- report: (.+?) -->", page) if re.search(r"\\[()\[\]]|\$", spec)]
    assert not found, "\n".join(found)


def test_a_region_follows_its_result_file(tmp_path, monkeypatch):
    """Twice the all-hit step's time at batch 16, 128K in a copy of decode.csv halves the speed-up
    that RESULTS.md quotes, and the page is then stale until refreshed."""
    page = "At batch 16 and 128K MAC is <!-- report: x 16 128K mac@1.0 -->26.00×<!-- /report --> faster."
    assert report.refreshed(page) == page

    rows = report.rows(report.DECODE)
    slower = io.StringIO()
    writer = csv.DictWriter(slower, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        chosen = (row["provider"], row["hit_rate"], row["batch"], row["ctx"], row["hkv"], row["window"]) == ("mac", "1.0", "16", "131072", "8", "1024")
        writer.writerow({**row, "median_us": str(2 * float(row["median_us"]))} if chosen else row)
    copy = tmp_path / report.DECODE
    copy.parent.mkdir(parents=True)
    copy.write_text(slower.getvalue())
    monkeypatch.setattr(report, "REPO", tmp_path)
    report.clear()
    try:
        assert report.refreshed(page) == page.replace("26.00×", "13.00×")
    finally:
        monkeypatch.undo()
        report.clear()


def test_a_region_that_cannot_render_names_itself():
    with pytest.raises(ValueError, match="no_such_region"):
        report.refreshed("<!-- report: no_such_region 1 2 -->?<!-- /report -->")
    with pytest.raises(ValueError, match=r"cell profile \"no such point\""):
        report.refreshed('<!-- report: cell profile "no such point" attend -->?<!-- /report -->')


def test_a_range_over_several_values_of_a_column():
    """``batch=32|64`` takes the rows of either batch: the range spans both, and each alone lies inside it."""
    file = "benchmarks/results/h100_fresh_ab/new/model.csv"
    low, high = (float(x) for x in report.csv_range(file, "speedup_vs_best_full", nd=3, provider="mac_mass", batch="32|64").split("–"))
    alone = [float(report.csv_range(file, "speedup_vs_best_full", nd=3, provider="mac_mass", batch=b)) for b in ("32", "64")]
    assert low == min(alone) and high == max(alone) and low < high
