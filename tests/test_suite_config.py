"""The test-suite's own configuration: the documented commands work where third-party plugins are installed."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# what pytest-benchmark < 5.3 does: registered under the name "benchmark", it warns at
# configure time whenever xdist is active, and the suite's filterwarnings = error turns
# that warning into an INTERNALERROR before any test runs
FAKE_PLUGIN = '''
import warnings
import pytest

class FakeBenchmarkWarning(pytest.PytestWarning):
    pass

def pytest_configure(config):
    if config.getoption("dist", "no") != "no" or "PYTEST_XDIST_WORKER" in __import__("os").environ:
        warnings.warn(FakeBenchmarkWarning("Benchmarks are automatically disabled because xdist plugin is active."))
'''


def test_pytest_with_xdist_runs_beside_a_benchmark_plugin(tmp_path):
    """``pytest -n 2`` with a pytest-benchmark-like plugin installed runs the tests, no INTERNALERROR."""
    (tmp_path / "fake_benchmark_plugin.py").write_text(textwrap.dedent(FAKE_PLUGIN))
    dist = tmp_path / "fake_benchmark-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-benchmark\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[pytest11]\nbenchmark = fake_benchmark_plugin\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider", "tests/test_rope.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert "INTERNALERROR" not in run.stdout + run.stderr, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
