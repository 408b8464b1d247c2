#!/usr/bin/env bash
# The GPU lane, in one call on a CUDA machine, from the repository root:
#   bash benchmarks/gpu_lane.sh [OUT_DIR] [tests|bench|paged|profile|all]
# 1. the Triton differential tests compiled (no interpreter) and the GPU-only ones,
#    the harness test, and the real model's lockstep test when the model is installed;
# 2. the kernel benchmark (python -m benchmarks.bench_decode --check), tables and plots;
# 3. the paged-KV benchmark (python -m benchmarks.bench_paged);
# 4. the step profile (python -m benchmarks.profile_step).
# FlashInfer wheels placed in .whl/ are installed into /tmp/flashinfer first (no network there).
set -uo pipefail
out=${1:-benchmarks/results}
what=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/flashinfer*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/flashinfer .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/flashinfer"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
status=0
if [[ $what == all || $what == tests ]]; then
    tests=(tests/test_triton_summary.py tests/test_triton_match.py tests/test_triton_decode.py tests/test_triton_gpu.py tests/test_benchmark_harness.py
           tests/test_paged.py tests/test_ops.py tests/test_interop.py tests/test_engine_gpu.py)
    echo "\$ python3 -m pytest -n 8 -q ${tests[*]} -m 'gpu or not gpu'   # $(nvidia-smi --query-gpu=name --format=csv,noheader), compiled" | tee "$out/gpu_tests.log"
    (time python3 -m pytest -n 8 -q -p no:cacheprovider "${tests[@]}" -m "gpu or not gpu") 2>&1 | tee -a "$out/gpu_tests.log" || status=1
fi
if [[ $what == all || $what == bench ]]; then
    python3 -m benchmarks.bench_decode --check --out "$out" 2>&1 | tee "$out/decode.log" || status=1
fi
if [[ $what == all || $what == paged ]]; then
    python3 -m benchmarks.bench_paged --out "$out" 2>&1 | tee "$out/paged.log" || status=1
fi
if [[ $what == all || $what == profile ]]; then
    python3 -m benchmarks.profile_step --out "$out" 2>&1 | tee "$out/profile.log" || status=1
fi
exit $status
