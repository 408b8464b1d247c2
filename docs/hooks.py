"""MkDocs hooks: generated content of the docs site.

Everything the site shows that is not hand-written markdown is made here, at build time:

* the figures of the concept pages (``docs/scripts/figures.py``), cached in ``build/docs/figures``;
* the tutorials, executed once into notebooks (``docs/scripts/run_tutorials.py``) that
  mkdocs-jupyter renders without executing them again;
* the benchmarks page's results: ``benchmarks/RESULTS.md`` (its opening, up to its first
  ``##`` heading, at ``<!-- benchmark-results: headline -->``, the rest at
  ``<!-- benchmark-results: details -->``) and the plots and CSV files of the latest GPU
  run at the top of ``benchmarks/results/`` (older runs in its subfolders stay in the
  repository); the page says so when there are none, so the build never depends on a GPU;
* repository files that pages link (``[tests/tolerances.py](repo/tests/tolerances.py)``,
  ``../repo/...`` from a subfolder), published as they are under ``repo/<path>``, so the
  links work in the built site, offline; a link to a file that is not there fails the
  strict build;
* the real-model page's tables, from the fidelity study's summary (``studies/results/real_model/summary.md``);
* notebook pages lose the CDN scripts (MathJax, Mermaid) that nbconvert's template adds:
  the site typesets math with its vendored KaTeX and works offline;
* a page's title number and every link that names a page's number (``[page 4](accept.md)``)
  are checked against mkdocs.yml's nav: a mismatch fails the strict build.

The measured figures the pages quote are not made here: ``benchmarks/report.py`` renders them
into the markdown sources (``tests/test_report.py`` checks that they are up to date).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import posixpath
import re
import sys
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, InclusionLevel
from mkdocs.structure.pages import Page

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs" / "scripts"))
sys.path.insert(0, str(REPO))

# mkdocs restores sys.path after loading a hook: import the helpers now
import figures  # noqa: E402  (docs/scripts)
import griffe_rst  # noqa: E402
import run_tutorials  # noqa: E402

log = logging.getLogger("mkdocs.hooks.mac")

RESULTS_DIR = REPO / "benchmarks" / "results"
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
RESULTS_URI = "benchmarks/results"
# <!-- benchmark-results --> includes RESULTS.md whole; ": headline" its opening (up to its
# first "## " heading), ": details" the rest, so a page can open with the headline
_RESULTS = re.compile(r"<!-- benchmark-results(?:: (headline|details))? -->")

_generated: dict[str, Path] = {}  # site path -> file on disk, filled by on_pre_build
_results: dict[str, Path] = {}  # the same for benchmarks/results/, markdown included


def on_pre_build(config) -> None:
    _generated.clear()
    for name, path in figures.build_all(log=log.info).items():
        _generated[f"figures/{name}"] = path
    for stem, path in run_tutorials.execute_all(log=log.info).items():
        _generated[f"tutorials/{stem}.ipynb"] = path
    _results.clear()
    for path in sorted(RESULTS_DIR.glob("*")) if RESULTS_DIR.is_dir() else []:
        if path.suffix.lower() in {".png", ".svg", ".csv", ".md"} and path.is_file():
            _results[f"{RESULTS_URI}/{path.name}"] = path
    # plots and CSVs are copied into the site; markdown tables are included in the page
    _generated.update({uri: p for uri, p in _results.items() if p.suffix.lower() != ".md"})


REPO_URI = "repo"  # where linked repository files are published in the site
# a link to a repository file: ](repo/tests/tolerances.py) or ](../repo/...) from a subfolder
_REPO_LINK = re.compile(r"\]\(((?:\.\./)*" + REPO_URI + r"/[^)\s#]+)")
_NOT_PUBLISHED = {".git", ".venv", "site", "build", "__pycache__"}


class RepoFile(File):
    """A repository file published as it is: a ``.md`` file stays text, it is not a page."""

    def is_documentation_page(self) -> bool:
        return False

    def is_static_page(self) -> bool:
        return False


def repo_links(markdown: str, page_uri: str) -> set[str]:
    """Repository paths (``tests/tolerances.py``) that a page's markdown links as ``repo/...``."""
    paths = set()
    for target in _REPO_LINK.findall(markdown):
        uri = posixpath.normpath(posixpath.join(posixpath.dirname(page_uri), target))
        if uri.startswith(REPO_URI + "/"):
            paths.add(uri.removeprefix(REPO_URI + "/"))
    return paths


def _publishable(rel: str) -> Path | None:
    path = (REPO / rel).resolve()
    inside = path.is_relative_to(REPO) and not _NOT_PUBLISHED & set(path.relative_to(REPO).parts)
    return path if inside and path.is_file() else None


@event_priority(100)  # before mkdocs-jupyter wraps the notebooks into pages
def on_files(files, config):
    for uri, path in _generated.items():
        # a File rooted where the generated file lies (not File.generated: mkdocs-jupyter's
        # page wrapper looks the source up through src_dir)
        src_dir = str(path)[: -len(uri)]
        files.append(File(uri, src_dir=src_dir, dest_dir=config.site_dir, use_directory_urls=config.use_directory_urls))
    # repository files the pages link, and those RESULTS.md links (its links become repo/ links)
    wanted = set(_results_repo_paths())
    for page in files.documentation_pages():
        if page.src_uri.endswith(".md") and page.abs_src_path:
            source = Path(page.abs_src_path).read_text(encoding="utf-8")
            wanted |= repo_links(source, page.src_uri)
            if CATALOGUE_MARKER in source:  # the catalogue links every test file
                wanted |= {path.relative_to(REPO).as_posix() for path in _test_files()}
    for rel in sorted(wanted):
        path = _publishable(rel)
        if path is None:  # the link stays broken: the strict build reports it on its page
            log.warning(f"a page links {REPO_URI}/{rel}, which is not a file of the repository")
            continue
        # included explicitly: exclude_docs' patterns (scripts/) are meant for docs/, not for repo/docs/scripts/
        files.append(RepoFile.generated(config, f"{REPO_URI}/{rel}", abs_src_path=str(path), inclusion=InclusionLevel.INCLUDED))
    return files


def on_nav(nav, config, files):
    """The Tutorials section lists every executed tutorial, in file order (none is listed by hand)."""
    section = next(item for item in nav.items if item.title == "Tutorials")
    listed = {page.file.src_uri for page in section.children if page.is_page}
    for uri in sorted(u for u in _generated if u.startswith("tutorials/") and u.endswith(".ipynb")):
        if uri not in listed:
            page = Page(None, files.get_file_from_path(uri), config)
            page.parent = section
            section.children.append(page)
    nav.pages[:] = [item for item in _flatten(nav.items)]
    for previous, current in zip(nav.pages, nav.pages[1:]):  # the footer's previous / next links
        previous.next_page, current.previous_page = current, previous
    return nav


def _flatten(items):
    for item in items:
        if item.is_page:
            yield item
        elif item.is_section:
            yield from _flatten(item.children)


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = _RESULTS.sub(lambda m: results_markdown(page.file.src_uri, m.group(1) or "all"), markdown)
    if TOLERANCE_MARKER in markdown:
        markdown = markdown.replace(TOLERANCE_MARKER, tolerance_table())
    if CATALOGUE_MARKER in markdown:
        markdown = markdown.replace(CATALOGUE_MARKER, test_catalogue(page.file.src_uri))
    markdown = _STUDY.sub(lambda m: study_sections(m.group(1), body_only=bool(m.group(2))), markdown)
    markdown = _DOCSTRING.sub(lambda m: docstring_markdown(m.group(1)), markdown)
    markdown = _SOURCE.sub(lambda m: source_listing(m.group(1)), markdown)
    for problem in page_number_problems(markdown, page.file.src_uri, config["nav"]):
        log.warning(problem)  # the strict build fails
    return markdown


# "[page 4](accept.md)", "[4. Accept](accept.md)" and a page's "# 4. Accept" name the page's
# number in mkdocs.yml's nav: checked, so that renumbering the concepts cannot leave one behind
_PAGE_LINK = re.compile(r"\[(?:[Pp]age (\d+)|(\d+)\. [^\]]*)\]\(((?:\.\./)*[\w-]+\.md)")


def nav_numbers(nav) -> dict[str, str]:
    """``{"accept.md": "4", ...}``: the numbers of the nav's numbered pages."""
    numbers = {}
    for item in nav if isinstance(nav, list) else []:
        for title, target in item.items() if isinstance(item, dict) else []:
            m = re.match(r"(\d+)\. ", title)
            if m and isinstance(target, str):
                numbers[target] = m.group(1)
            numbers |= nav_numbers(target)
    return numbers


def page_number_problems(markdown: str, page_uri: str, nav) -> list[str]:
    """The page numbers of ``markdown`` (its title, its links to pages) that disagree with the nav."""
    numbers = nav_numbers(nav)
    problems = []
    title = re.match(r"# (\d+)\. ", markdown)
    if title and numbers.get(page_uri) != title.group(1):
        problems.append(f"{page_uri}: its title says page {title.group(1)}, the nav {numbers.get(page_uri)}")
    for m in _PAGE_LINK.finditer(markdown):
        number = m.group(1) or m.group(2)
        target = posixpath.normpath(posixpath.join(posixpath.dirname(page_uri), m.group(3)))
        if target in numbers and numbers[target] != number:
            problems.append(f"{page_uri}: a link calls {target} page {number}; the nav says {numbers[target]}")
    return problems


# <!-- docstring: mac_triton.decode --> inserts that module's docstring, so a page can show
# a fact the code documents (the kernel map) without a second copy that could drift
_DOCSTRING = re.compile(r"<!-- docstring: ([\w.]+) -->")


def docstring_markdown(module_name: str) -> str:
    text = inspect.cleandoc(importlib.import_module(module_name).__doc__ or "")
    text = griffe_rst.convert_simple_tables(griffe_rst.convert_math_blocks(text))
    text = re.sub(r":(?:mod|class|func|meth|attr|obj):`~?([\w.]+)`", r"`\1`", text)
    title, _, body = text.partition("\n\n")  # the summary paragraph is the box's title
    title = " ".join(title.split())
    path = module_name.replace(".", "/") + ".py"
    return f'!!! quote "`{module_name}` ({path}): {title}"\n\n' + "\n".join(
        "    " + line if line.strip() else "" for line in body.strip().split("\n")
    )


# <!-- source: mac_ref.summary.merge --> shows that object's current source: pages quote
# the code by name, so a quote can never drift from the code it explains
_SOURCE = re.compile(r"<!-- source: ([\w.]+) -->")


def source_listing(dotted: str) -> str:
    module_name, _, attr = dotted.rpartition(".")
    obj = getattr(importlib.import_module(module_name), attr)
    obj = getattr(obj, "fn", obj)  # a @triton.jit kernel wraps the Python function
    path = Path(inspect.getsourcefile(obj)).resolve().relative_to(REPO).as_posix()
    return f'```py title="{path}"\n{inspect.getsource(obj).rstrip()}\n```'


TOLERANCE_MARKER = "<!-- tolerance-table -->"
CATALOGUE_MARKER = "<!-- test-catalogue -->"

# <!-- study: Long context --> includes the sections of the fidelity study's summary
# (written from its CSV files by `studies/real_model_study.py --report`) whose titles start
# so: the page's tables are the study's, never a copy. <!-- study: Headline | body --> leaves
# out the sections' own headings (a page's opening table, under the page's title)
STUDY_SUMMARY = REPO / "studies" / "results" / "real_model" / "summary.md"
_STUDY = re.compile(r"<!-- study: ([^>|]+?)( \| body)? -->")
# <!-- study: rule_frontier/pydoc topics --> takes the section from studies/results/rule_frontier/summary.md
STUDIES = REPO / "studies" / "results"


def study_sections(prefix: str, body_only: bool = False) -> str:
    """The ``### {prefix}…`` sections of a study summary (their ``####`` parts included), one
    level down: the real-model study's, or ``STUDY/prefix`` for ``studies/results/STUDY/summary.md``."""
    summary = STUDY_SUMMARY
    if "/" in prefix:
        study, prefix = prefix.rsplit("/", 1)  # (a study's folder may be nested: rule_frontier/layer_probe)
        summary = STUDIES / study / "summary.md"
    text = summary.read_text(encoding="utf-8") if summary.exists() else ""
    sections = re.split(r"(?m)^(?=### )", text)
    chosen = [part for part in sections if part.startswith(f"### {prefix}")]
    if not chosen:
        raise ValueError(f"{summary} has no section starting with {prefix!r}: run the study's --report")
    if body_only:
        chosen = [part.split("\n", 1)[1] for part in chosen]
    return "\n".join(re.sub(r"(?m)^(#{3,4}) ", r"#\1 ", part) for part in chosen)


def _test_files() -> list[Path]:
    return sorted((REPO / "tests").glob("test_*.py"))


def test_catalogue(page_uri: str = "testing.md") -> str:
    """Every test file of ``tests/`` (linked to its published copy): its docstring's first
    paragraph and its test names."""
    import ast

    parts = []
    for path in _test_files():
        tree = ast.parse(path.read_text())
        doc = (ast.get_docstring(tree) or "").split("\n\n")[0].replace("\n", " ")
        names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test_")]
        names += [
            f"{c.name}.{n.name}" for c in tree.body if isinstance(c, ast.ClassDef)
            for n in c.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
        ]
        tests = "; ".join(name.removeprefix("test_").replace("_", " ") for name in names)
        link = posixpath.relpath(f"{REPO_URI}/tests/{path.name}", posixpath.dirname(page_uri) or ".")
        parts.append(f"- **[`{path.name}`]({link})** — {doc}\n\n    <small>{len(names)} tests: {tests}.</small>\n")
    return "\n".join(parts)


def tolerance_table() -> str:
    """The test-suite's tolerance table (``tests/tolerances.py``) as a markdown table."""
    spec = importlib.util.spec_from_file_location("mac_tolerances", REPO / "tests" / "tolerances.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    rows = ["| operation | input dtype | rtol | atol | relative RMS |", "|---|---|---|---|---|"]
    for (operation, dtype), tol in module.TOLERANCES.items():
        rms = "–" if tol.rel_rms is None else f"{tol.rel_rms:g}"
        rows.append(f"| `{operation}` | {str(dtype).removeprefix('torch.')} | {tol.rtol:g} | {tol.atol:g} | {rms} |")
    return "\n".join(rows)


# nbconvert's template adds a MathJax loader (an empty src here) and a Mermaid loader that
# imports from a CDN; the site typesets math with its vendored KaTeX and has no diagrams
_CDN_SCRIPT = re.compile(
    r'<script src="(?:https?://[^"]*)?">\s*</script>'
    r'|<script type="text/x-mathjax-config">.*?</script>'
    r'|<script type="module">(?:(?!</script>).)*?mermaid.*?</script>',
    re.DOTALL,
)


def on_page_content(html: str, page, config, files) -> str:
    if page.file.src_uri.endswith(".ipynb"):
        html = _CDN_SCRIPT.sub("", html)
    return html


def results_markdown(page_uri: str, part: str = "all") -> str:
    """Markdown for the benchmark results, or a note that there are none.

    ``benchmarks/RESULTS.md`` (or, without it, the ``.md`` tables of the latest run) with its
    links pointed at the copied files, at the published repository files (``repo/...``) or,
    for modules of ``mac_ref`` and ``mac_triton``, at their API pages; images it does not
    show follow; CSV files are linked. ``part``: ``"headline"`` (RESULTS.md's opening, up to
    its first ``##`` heading, without its title), ``"details"`` (the rest) or ``"all"``.
    """
    results = _results
    if not results:
        if part == "details":
            return ""
        return (
            '!!! note "No benchmark results in this checkout"\n'
            "    `benchmarks/results/` holds no plot or table yet: they appear here after a GPU run of\n"
            "    the benchmark scripts (see below) writes them there. The site builds without them.\n"
        )
    page_dir = posixpath.dirname(page_uri)
    copied = {path.resolve(): posixpath.relpath(uri, page_dir or ".") for uri, path in results.items() if uri in _generated}
    parts, shown = [], set()
    if RESULTS_MD.is_file():
        text, shown = _rewrite_links(RESULTS_MD.read_text(encoding="utf-8"), RESULTS_MD.parent, copied, page_dir)
        head, rest = _split_results(text)
        parts.append({"headline": head, "details": _demote_headings(rest, 1), "all": head + "\n" + _demote_headings(rest, 1)}[part])
    else:
        if part == "headline":
            return ""
        for path in [p for p in results.values() if p.suffix.lower() == ".md"]:
            text, used = _rewrite_links(path.read_text(encoding="utf-8"), path.parent, copied, page_dir)
            parts.append(f"### `{path.relative_to(REPO / 'benchmarks').as_posix()}`\n\n" + _demote_headings(text, 3))
            shown |= used
    if part != "headline":
        for uri, path in results.items():
            if path.suffix.lower() in {".png", ".svg"} and path.resolve() not in shown:
                parts.append(f"### {path.stem}\n\n![{path.stem}]({copied[path.resolve()]})\n")
        csvs = [f"[`{p.name}`]({copied[p.resolve()]})" for p in results.values() if p.suffix.lower() == ".csv"]
        if csvs:
            parts.append("Raw measurements (CSV): " + ", ".join(csvs) + ".\n")
    return "\n".join(parts)


def _split_results(text: str) -> tuple[str, str]:
    """RESULTS.md's opening (its ``# `` title dropped: the page has its own) and the rest, from its first ``## ``."""
    m = re.search(r"(?m)^## ", text)
    head, rest = (text[: m.start()], text[m.start():]) if m else (text, "")
    head = re.sub(r"\A\s*# [^\n]*\n", "", head)
    return head.strip() + "\n", rest


_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def _results_repo_paths() -> set[str]:
    """The repository files that RESULTS.md links and that are not copied results (published under repo/)."""
    if not RESULTS_MD.is_file():
        return set()
    copied = {path.resolve() for uri, path in _results.items() if uri in _generated}
    paths = set()
    for bang, label, target in _LINK.findall(RESULTS_MD.read_text(encoding="utf-8")):
        rel = _repo_target(target, RESULTS_MD.parent)
        if rel and (REPO / rel).resolve() not in copied and not _api_page(rel):
            paths.add(rel)
    return paths


def _repo_target(target: str, base: Path) -> str | None:
    """A relative link's repository path (``benchmarks/bench_decode.py``), or None (a URL, an anchor, outside)."""
    if re.match(r"[a-z]+://", target) or target.startswith(("#", "mailto:")):
        return None
    path = (base / target.split("#")[0]).resolve()
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) and path != REPO else None


def _api_page(rel: str) -> str | None:
    """The site page a repository path stands for: a docs page (``docs/memory-bound.md``), or the
    API reference page of a module of ``mac_ref`` or ``mac_triton`` (``api/mac_ref/match.md``)."""
    if rel.startswith("docs/") and rel.endswith(".md") and (REPO / rel).is_file() and not rel.startswith("docs/scripts/"):
        return rel.removeprefix("docs/")
    m = re.fullmatch(r"(mac_ref|mac_triton)/(\w+)\.py", rel)
    if not m or m.group(2).startswith("_"):
        return None
    if m.group(1) == "mac_triton":
        return "api/mac_triton.md"
    page = f"api/mac_ref/{m.group(2)}.md"
    return page if (REPO / "docs" / page).is_file() else "api/index.md"


def _rewrite_links(text: str, base: Path, copied: dict[Path, str], page_dir: str) -> tuple[str, set[Path]]:
    """Point links (relative to ``base``) at copied result files; links elsewhere in the repository
    at its published copy under ``repo/`` (modules of the packages: their API page), all relative
    to the page's folder ``page_dir``.

    Returns the text and the copied files it references.
    """
    used = set()

    def fix(m: re.Match) -> str:
        bang, label, target = m.groups()
        rel = _repo_target(target, base)
        if rel is None:
            return m.group(0)
        path = (REPO / rel).resolve()
        if path in copied:
            used.add(path)
            return f"{bang}[{label}]({copied[path]})"
        fragment = "#" + target.split("#", 1)[1] if "#" in target else ""
        site_path = _api_page(rel) or f"{REPO_URI}/{rel}"
        return f"{bang}[{label}]({posixpath.relpath(site_path, page_dir or '.')}{fragment})"

    return _LINK.sub(fix, text), used


def _demote_headings(text: str, levels: int) -> str:
    """An included file's headings sit ``levels`` below the page's (code blocks untouched)."""
    out, fenced = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,5} ", line):
            line = "#" * min(line.index(" ") + levels, 6) + line[line.index(" "):]
        out.append(line)
    return "\n".join(out)
