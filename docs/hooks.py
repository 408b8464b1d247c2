"""MkDocs hooks: generated content of the docs site.

Everything the site shows that is not hand-written markdown is made here, at build time:

* the figures of the concept pages (``docs/scripts/figures.py``), cached in ``build/docs/figures``;
* the tutorials, executed once into notebooks (``docs/scripts/run_tutorials.py``) that
  mkdocs-jupyter renders without executing them again;
* the benchmarks page's results, copied from ``benchmarks/results/`` when a GPU run left
  some there (the page says so when there are none, so the build never depends on a GPU);
* notebook pages lose the CDN scripts (MathJax, Mermaid) that nbconvert's template adds:
  the site typesets math with its vendored KaTeX and works offline.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs" / "scripts"))

import figures  # noqa: E402  (docs/scripts)
import run_tutorials  # noqa: E402

log = logging.getLogger("mkdocs.hooks.mac")

RESULTS_DIR = REPO / "benchmarks" / "results"
RESULTS_URI = "benchmarks/results"
RESULTS_MARKER = "<!-- benchmark-results -->"

_generated: dict[str, Path] = {}  # site path -> file on disk, filled by on_pre_build


def on_pre_build(config) -> None:
    _generated.clear()
    for name, path in figures.build_all(log=log.info).items():
        _generated[f"figures/{name}"] = path
    for stem, path in run_tutorials.execute_all(log=log.info).items():
        _generated[f"tutorials/{stem}.ipynb"] = path
    for path in sorted(RESULTS_DIR.glob("*")) if RESULTS_DIR.is_dir() else []:
        if path.suffix.lower() in {".png", ".svg", ".csv", ".md"} and path.is_file():
            _generated[f"{RESULTS_URI}/{path.name}"] = path


@event_priority(100)  # before mkdocs-jupyter wraps the notebooks into pages
def on_files(files, config):
    for uri, path in _generated.items():
        # a File rooted where the generated file lies (not File.generated: mkdocs-jupyter's
        # page wrapper looks the source up through src_dir)
        src_dir = str(path)[: -len(uri)]
        files.append(File(uri, src_dir=src_dir, dest_dir=config.site_dir, use_directory_urls=config.use_directory_urls))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if RESULTS_MARKER in markdown:
        markdown = markdown.replace(RESULTS_MARKER, results_markdown(page.file.src_uri))
    return markdown


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


def results_markdown(page_uri: str) -> str:
    """Markdown for the results in ``benchmarks/results/``, or a note that there are none."""
    results = {uri: path for uri, path in _generated.items() if uri.startswith(RESULTS_URI + "/")}
    if not results:
        return (
            '!!! note "No benchmark results in this checkout"\n'
            "    `benchmarks/results/` is empty: the plots and tables appear here after a GPU run of the\n"
            "    benchmark scripts (see above) leaves them there. The site builds without them.\n"
        )
    page_dir = Path(page_uri).parent
    rel = lambda uri: Path(uri).relative_to(page_dir).as_posix() if page_dir != Path(".") else uri  # noqa: E731
    parts, shown = [], set()
    for uri, path in results.items():
        if path.name.lower() == "results.md":
            text, used = _rewrite_links(path.read_text(), {p.name: rel(u) for u, p in results.items()})
            parts.append(_demote_headings(text))
            shown |= used
    for uri, path in results.items():
        if path.suffix.lower() in {".png", ".svg"} and path.name not in shown:
            parts.append(f"### {path.stem}\n\n![{path.stem}]({rel(uri)})\n")
    csvs = [f"[`{p.name}`]({rel(u)})" for u, p in results.items() if p.suffix.lower() == ".csv"]
    if csvs:
        parts.append("Raw measurements (CSV): " + ", ".join(csvs) + ".\n")
    return "\n".join(parts)


_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def _rewrite_links(text: str, known: dict[str, str]) -> tuple[str, set[str]]:
    """Point links at copied result files; links elsewhere in the repo become plain code.

    Returns the text and the names of the result files it references.
    """
    used = set()

    def fix(m: re.Match) -> str:
        bang, label, target = m.groups()
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            return m.group(0)
        name = Path(target).name
        if name in known:
            used.add(name)
            return f"{bang}[{label}]({known[name]})"
        return f"{label} (`{target}`)"

    return _LINK.sub(fix, text), used


def _demote_headings(text: str) -> str:
    """RESULTS.md's headings sit under the page's own ``##`` section."""
    return re.sub(r"^(#{1,4}) ", lambda m: "#" * min(len(m.group(1)) + 2, 6) + " ", text, flags=re.MULTILINE)
