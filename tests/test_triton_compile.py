"""Every Triton kernel of a decode step (and of the verify pass) compiles for a Hopper GPU (sm_90), checked on the CPU.

The interpreter runs the kernels' Python; this compiles them (``benchmarks/compile_kernels.py``,
in a subprocess without ``TRITON_INTERPRET``), so code the compiler would refuse fails here,
before a GPU is at hand.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_compiles_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.compile_kernels", "--arch", "90"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "every kernel compiled for sm_90" in run.stdout
    assert run.stdout.count("_attend_kernel") == 10  # 2 shapes × (2 configurations × 2 launches + the full decode)
    assert run.stdout.count("_fresh_kernel") == run.stdout.count("_prefix_kernel") == 4  # the verifying step: 2 shapes × 2 launches
    assert run.stdout.count("_verify_kernel") == 2  # lossless MAC's verify pass, both shapes
