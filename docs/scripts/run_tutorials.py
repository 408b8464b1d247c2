"""Execute the jupytext tutorials into notebooks that the docs site renders.

Each ``tutorials/NN_name.py`` (jupytext percent format) is read, executed once on the CPU
by a fresh Jupyter kernel and written to ``build/docs/tutorials/NN_name.ipynb``, where the
docs build (``docs/hooks.py``) picks it up. This is the only place tutorials run: the docs
build is part of ``make test``, so a cell that raises fails the build.

Notebooks are cached by a hash of the tutorial, the library sources and the size setting,
so ``make serve`` re-executes only what changed. Tutorials run two at a time (one per core
of the CI machine), each kernel with one intra-op thread.

    python docs/scripts/run_tutorials.py            # execute (or reuse) all, print timings
    python docs/scripts/run_tutorials.py --force    # ignore the cache

Environment:
    MAC_TUTORIAL_SIZE  ``full`` (default) or ``small``: tutorials read it to shrink their
                       heavy cells for a quick CI run; every cell still runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TUTORIALS = REPO / "tutorials"
OUT_DIR = REPO / "build" / "docs" / "tutorials"
# a change in any of these invalidates every executed tutorial
LIBRARY_DIRS = ("mac_core", "mac_ref", "mac_triton", "mac_llm")
CELL_TIMEOUT_S = 600


def tutorial_sources() -> list[Path]:
    """The tutorials, in reading order."""
    return sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))


def cache_key(source: Path) -> str:
    """Hash of the tutorial text, the library sources it imports and the size setting."""
    digest = hashlib.sha256(source.read_bytes())
    for name in LIBRARY_DIRS:
        for path in sorted((REPO / name).rglob("*.py")):
            digest.update(path.relative_to(REPO).as_posix().encode())
            digest.update(path.read_bytes())
    digest.update(os.environ.get("MAC_TUTORIAL_SIZE", "full").encode())
    return digest.hexdigest()[:16]


def _execute(source: str, target: str, key: str) -> float:
    """Run one tutorial in a fresh kernel; returns the wall time in seconds."""
    import jupytext
    import nbclient

    # one thread per kernel: two kernels share the two cores instead of fighting over them
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    notebook = jupytext.read(source)
    notebook.metadata["mac_cache_key"] = key
    start = time.perf_counter()
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(Path(source).parent)}},
    )
    client.execute()
    elapsed = time.perf_counter() - start
    notebook.metadata["mac_execution_seconds"] = round(elapsed, 1)
    jupytext.write(notebook, target, fmt="ipynb")
    return elapsed


def is_fresh(target: Path, key: str) -> bool:
    """``target`` exists and was executed from sources with this ``key``."""
    if not target.exists():
        return False
    import json

    return json.loads(target.read_text()).get("metadata", {}).get("mac_cache_key") == key


def execute_all(force: bool = False, workers: int = 2, log=print) -> dict[str, Path]:
    """Execute stale tutorials, two at a time; returns ``{stem: executed notebook}``.

    Raises the first tutorial's error (``nbclient.exceptions.CellExecutionError`` names
    the cell) after the others finished.
    """
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    notebooks, jobs = {}, {}
    for source in tutorial_sources():
        target = OUT_DIR / f"{source.stem}.ipynb"
        notebooks[source.stem] = target
        key = cache_key(source)
        if force or not is_fresh(target, key):
            jobs[source.stem] = (str(source), str(target), key)
        else:
            log(f"tutorial {source.stem}: up to date")
    if not jobs:
        return notebooks
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
        futures = {stem: pool.submit(_execute, *args) for stem, args in jobs.items()}
        errors = []
        for stem, future in futures.items():
            try:
                log(f"tutorial {stem}: executed in {future.result():.1f} s")
            except Exception as error:  # report every failing tutorial, then fail
                errors.append((stem, error))
                log(f"tutorial {stem}: FAILED")
    log(f"tutorials: {len(jobs)} executed in {time.perf_counter() - start:.1f} s wall")
    if errors:
        stem, error = errors[0]
        raise RuntimeError(f"tutorial {stem} failed to execute:\n{error}") from error
    return notebooks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="execute even when the cached notebook is fresh")
    parser.add_argument("--workers", type=int, default=2, help="tutorials executed at once")
    args = parser.parse_args()
    execute_all(force=args.force, workers=args.workers)


if __name__ == "__main__":
    sys.exit(main())
