"""See the built site as a reader does: serve it locally, open pages in headless Chromium.

Chromium runs with no network beyond the local server (every other host name fails to
resolve), so a page that still needed a CDN would show it: its math would stay raw TeX.
Used by ``tests/test_docs.py`` and for screenshots:

    python docs/scripts/browser.py screenshot summaries/ tutorials/01_summaries/ ...
        -> build/screenshots/<page>.png
"""

from __future__ import annotations

import contextlib
import functools
import html
import http.server
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SITE = REPO / "site"
SHOTS = REPO / "build" / "screenshots"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    # offline: only the local server resolves
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--virtual-time-budget=20000",  # let scripts (KaTeX) finish before the DOM is read
]


def chromium() -> str | None:
    """Path of the Chromium binary (Debian's ``chromium``), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    inject = b""  # appended to every HTML page served (a measuring script)

    def log_message(self, *args):  # keep test output clean
        pass

    def copyfile(self, source, outputfile):
        if self.inject and self.path.endswith(("/", ".html")):
            source = io.BytesIO(source.read().replace(b"</body>", self.inject + b"</body>"))
        super().copyfile(source, outputfile)

    def send_header(self, keyword, value):
        if keyword == "Content-Length" and self.inject:
            return  # the injected script changes the length; the connection closes after the body
        super().send_header(keyword, value)


# Every element of the content column must fit in it, or sit inside a box of the column that
# scrolls (a formula, a code block, a table; a box that clips would cut it off), and a box that
# scrolls sideways must not clip its height: the report lists the others, with their text, as
# a <pre id="overflow-report"> that --dump-dom returns.
_OVERFLOW_SCRIPT = b"""<script>
addEventListener("load", () => setTimeout(() => {
  const report = [];
  for (const column of document.querySelectorAll(".md-content__inner")) {
    // the column's edge is .md-content's: Material lets table wrappers reach into its margin
    const right = column.closest(".md-content").getBoundingClientRect().right + 1;
    for (const el of column.querySelectorAll("*")) {
      const style = getComputedStyle(el);  // a box that scrolls sideways but clips its height (a display formula)
      if (["auto", "scroll"].includes(style.overflowX) && style.overflowY === "hidden" && el.scrollHeight > el.clientHeight + 1)
        report.push("cut at the bottom or top: " + (el.textContent || "").trim().slice(0, 60));
      if (el.getBoundingClientRect().right <= right) continue;
      if (el.parentElement.closest(".katex")) continue;  // KaTeX's inner boxes (its hidden MathML, clipped SVG): the formula's box counts
      let box = el.parentElement, held = false;
      for (; box && box !== column; box = box.parentElement) {
        if (["auto", "scroll"].includes(getComputedStyle(box).overflowX) && box.getBoundingClientRect().right <= right) { held = true; break; }
      }
      if (!held) report.push(el.tagName.toLowerCase() + "." + [...el.classList].join(".") + ": " + (el.textContent || "").trim().slice(0, 60));
    }
  }
  const out = document.createElement("pre");
  out.id = "overflow-report";
  out.textContent = JSON.stringify(report);
  document.body.appendChild(out);
}, 2000));
</script>"""


@contextlib.contextmanager
def serve(site: Path = SITE, inject: bytes = b""):
    """Serve ``site`` on a free local port (``inject``: markup added to every HTML page); yields the base URL."""
    handler = functools.partial(type("_Handler", (_QuietHandler,), {"inject": inject}), directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    binary = chromium()
    if binary is None:
        raise RuntimeError("chromium is not installed (make test installs it with apt-get)")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:  # a fresh profile each run
        return subprocess.run(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=timeout, check=True,
        )


def rendered_dom(url: str, timeout: float = 90) -> str:
    """The page's DOM after its scripts ran."""
    return _run(["--dump-dom", url], timeout).stdout


def overflowing(url: str, width: int = 1280, timeout: float = 90) -> list[str]:
    """The elements of a page's content column wider than it at ``width`` pixels that nothing
    scrolls (a page served by ``serve(site, inject=OVERFLOW_SCRIPT)``)."""
    dom = _run([f"--window-size={width},2000", "--dump-dom", url], timeout).stdout
    report = re.search(r'<pre id="overflow-report">(.*?)</pre>', dom, re.S)
    if report is None:
        raise RuntimeError(f"{url}: the overflow report did not run")
    return json.loads(html.unescape(report.group(1)))


OVERFLOW_SCRIPT = _OVERFLOW_SCRIPT


def screenshot(url: str, path: Path, width: int = 1280, height: int = 2000, timeout: float = 90) -> Path:
    """A PNG of the page's first ``height`` pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--screenshot={path}", f"--window-size={width},{height}", url], timeout)
    return path


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] != "screenshot":
        sys.exit(__doc__)
    with serve() as base:
        for page in sys.argv[2:]:
            name = page.strip("/").replace("/", "_") or "index"
            print(screenshot(base + page, SHOTS / f"{name}.png"))


if __name__ == "__main__":
    main()
