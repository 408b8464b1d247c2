"""Checks of the built docs site, as a reader sees it (run after ``make docs``; ``make test`` does both).

* math is typeset by the vendored KaTeX in headless Chromium with every host but the
  local server unreachable: proof that the site works offline;
* no page loads a script, stylesheet, image or font from the internet;
* every image a page shows exists, every concept page has a figure, every tutorial page
  shows at least one plot and no error output;
* at 1280 px nothing sticks out of the content column: wide formulas, code and tables scroll;
* the runnable snippets of the concept pages run.

The tutorials themselves are executed once, by the docs build (``docs/scripts/run_tutorials.py``);
a cell that raises fails ``make docs`` already.
"""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs" / "scripts"))
import browser  # noqa: E402  (docs/scripts)

pytestmark = pytest.mark.docs

SITE = REPO / "site"
DOCS = REPO / "docs"
CONCEPT_PAGES = ["memory-bound", "summaries", "match", "accept", "amend", "decode-step", "triton", "testing"]
TUTORIALS = sorted(p.stem for p in (REPO / "tutorials").glob("[0-9][0-9]_*.py"))


@pytest.fixture(scope="module")
def site() -> Path:
    if not (SITE / "index.html").exists():
        pytest.fail("no built site: run `make docs` first (`make test` does)")
    return SITE


def page_html(site: Path, page: str) -> str:
    return (site / page / "index.html").read_text(encoding="utf-8")


def test_tutorials_are_pages(site):
    assert len(TUTORIALS) >= 4
    for stem in TUTORIALS:
        text = page_html(site, f"tutorials/{stem}")
        assert "jupyter-wrapper" in text, f"tutorial {stem} was not rendered as a notebook page"
        assert "data:image/png" in text, f"tutorial {stem} shows no plot"
        assert "Traceback (most recent call last)" not in text, f"tutorial {stem} shows an error"
        assert re.search(r"<h2[^>]*>\s*Exercises", text), f"tutorial {stem} has no Exercises section"


@pytest.mark.skipif(browser.chromium() is None, reason="chromium is missing (make test installs it)")
@pytest.mark.parametrize("page", ["summaries", "tutorials/01_summaries"])
def test_math_is_typeset_offline(site, page):
    """Headless Chromium, no internet: KaTeX must have turned every formula into markup."""
    static = page_html(site, page)
    formulas = len(re.findall(r'class="arithmatex"', static)) + len(re.findall(r"\$[^$\n]+\$", static))
    assert formulas >= 5, f"{page}: expected a page with math, found {formulas} formulas"
    with browser.serve(site) as base:
        dom = browser.rendered_dom(base + page + "/")
    typeset = len(re.findall(r'class="katex"', dom))
    assert typeset >= formulas * 0.9, f"{page}: {typeset} formulas typeset out of {formulas}"
    assert "katex-error" not in dom, f"{page}: KaTeX could not parse a formula"
    body = re.sub(r'<annotation encoding="application/x-tex">.*?</annotation>', "", dom, flags=re.S)
    body = re.sub(r"<(pre|code|script)\b.*?</\1>", "", body, flags=re.S)
    assert "\\(" not in html.unescape(body), f"{page}: raw \\( … \\) math left on the page"


# every page with formulas, code or wide tables: the concept pages, the benchmark and real-model
# pages (their tables), the tutorials (notebook outputs) and two API pages (signatures, math)
WIDE_PAGES = ["index", "spec", *CONCEPT_PAGES, "benchmarks", "real_model", "serving", *(f"tutorials/{t}" for t in TUTORIALS),
              "api/mac_triton", "api/mac_ref/summary"]  # fmt: skip


@pytest.mark.skipif(browser.chromium() is None, reason="chromium is missing (make test installs it)")
@pytest.mark.parametrize("page", WIDE_PAGES)
def test_nothing_is_cut_off_at_1280_px(site, page):
    """At 1280 px no element sticks out of the content column unless a box that scrolls holds it
    (display formulas, code blocks and tables scroll inside their box: docs/assets/stylesheets/extra.css)."""
    with browser.serve(site, inject=browser.OVERFLOW_SCRIPT) as base:
        wide = browser.overflowing(base + ("" if page == "index" else page + "/"), width=1280)
    assert not wide, f"{page}: wider than the column at 1280 px and not scrollable:\n" + "\n".join(wide[:10])


_EXTERNAL = re.compile(
    r'<(?:script|img|iframe|source)\b[^>]*\bsrc="(https?:)?//'
    r'|<link\b[^>]*\bhref="(https?:)?//[^"]*"[^>]*>'
    r'|url\(\s*["\']?(https?:)?//'
    r'|import\(\s*["\']https?://'
)


def test_no_resource_from_the_internet(site):
    offenders = []
    for path in list(site.rglob("*.html")) + list(site.rglob("*.css")):
        for m in _EXTERNAL.finditer(path.read_text(encoding="utf-8", errors="replace")):
            tag = m.group(0)
            if tag.startswith("<link") and re.search(r'rel="(canonical|alternate)"', tag):
                continue  # links, not loads
            offenders.append(f"{path.relative_to(site)}: {tag[:120]}")
    assert not offenders, "external loads:\n" + "\n".join(offenders[:20])


def test_images_exist_and_concept_pages_have_figures(site):
    missing = []
    for path in site.rglob("*.html"):
        for src in re.findall(r'<img\b[^>]*\bsrc="([^"]+)"', path.read_text(encoding="utf-8")):
            if src.startswith("data:"):
                continue
            if not (path.parent / src.split("#")[0]).resolve().exists():
                missing.append(f"{path.relative_to(site)} -> {src}")
    assert not missing, "missing images:\n" + "\n".join(missing)
    for page in CONCEPT_PAGES:
        assert re.search(r'<img\b[^>]*src="[^"]*figures/', page_html(site, page)), f"{page} has no generated figure"


def test_every_concept_page_is_in_the_sidebar(site):
    """Each numbered page of mkdocs.yml's nav is a link of the sidebar (none swallowed as a section's index)."""
    titles = re.findall(r"(?m)^\s+- (\d+\. [^:]+): \S+\.md\s*$", (REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    assert len(titles) >= 10
    sidebar = page_html(site, "summaries")
    for title in titles:
        assert re.search(r'class="md-nav__link[^"]*">\s*<span class="md-ellipsis">\s*' + re.escape(html.escape(title, quote=False)), sidebar), (
            f"{title!r} is not a sidebar link"
        )


def test_real_model_page_shows_the_study_tables(site):
    """The page's tables are included from the study's summary, rows and all, and none is left as a marker."""
    text = page_html(site, "real_model")
    assert "<!-- study:" not in text
    summary = (REPO / "studies" / "results" / "real_model" / "summary.md").read_text(encoding="utf-8")
    for title in re.findall(r"(?m)^### ((?:Long context|Rounding alone)[^(\n]*)", summary):
        assert html.escape(title.strip(), quote=False) in text, f"the page lacks the study section {title!r}"
    # the first body row of the first long-context table (after its caption line, header and rule)
    first_long_row = re.search(r"(?m)^### Long context[^\n]*\n(?:(?!\|)[^\n]*\n)*\|[^\n]*\n\|[-|]+\n(\|[^\n]*)$", summary).group(1)
    cells = [c.strip() for c in first_long_row.strip("|").split("|")]
    assert all(html.escape(c, quote=False) in text for c in cells), "a long-context row is missing from the page"


def test_no_report_marker_shows(site):
    """The figures' regions (benchmarks/report.py) stay HTML comments: none was broken open into the page's text."""
    shown = [path.relative_to(site).as_posix() for path in site.rglob("*.html") if "&lt;!-- report:" in path.read_text(encoding="utf-8")]
    assert not shown, f"pages that show a report marker as text: {shown}"


def test_repo_links_resolve(site):
    """Every link into ``repo/`` (the repository files that pages name, published by the hooks) is a file of the site."""
    broken, seen = [], 0
    for path in site.rglob("*.html"):
        for href in re.findall(r'<a\b[^>]*\bhref="((?:[^"#?]*/)?repo/[^"#?]*)', path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", href):
                continue
            seen += 1
            target = (path.parent / html.unescape(href)).resolve()
            if not target.is_file():
                broken.append(f"{path.relative_to(site)} -> {href}")
    assert seen >= 10, f"expected the pages to link repository files, found {seen} links"
    assert not broken, "links into repo/ that lead nowhere:\n" + "\n".join(broken[:20])


def _snippets(page: Path) -> list[str]:
    """The ```python blocks of a page: all runnable (quoted library code is ```py, by the hooks)."""
    return re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.S | re.M)


@pytest.mark.parametrize("page", ["index", "spec", "serving", *CONCEPT_PAGES])
def test_snippets_run(page):
    code = _snippets(DOCS / f"{page}.md")
    assert code, f"{page}.md has no runnable snippet"
    result = subprocess.run(
        [sys.executable, "-c", "\n\n".join(code)], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, f"{page}.md snippets failed:\n{result.stderr[-3000:]}"
