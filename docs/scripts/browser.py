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
import http.server
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
    def log_message(self, *args):  # keep test output clean
        pass


@contextlib.contextmanager
def serve(site: Path = SITE):
    """Serve ``site`` on a free local port; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(site))
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
