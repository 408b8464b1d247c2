"""Compile every Triton kernel of a decode step for a GPU, on a machine without one.

The interpreter (``TRITON_INTERPRET=1``) runs the kernels' Python, not the compiler: code the
interpreter accepts can still fail to lower (a loop-carried value changing type, a
constexpr expression the code generator refuses) or spill registers. This script runs the
launchers on CPU tensors with ``JITFunction.run`` replaced by a recorder, then compiles each
recorded launch with ``triton.compile`` for the target (``ptxas`` ships with Triton's
wheel) and prints each kernel's registers, stack (spilled bytes) and shared memory, from
``cuobjdump --dump-resource-usage``. The cases: the paper's rule, the mass rule per group
(the verifying step), the group match with the subtract row rule, each under the narrow and
the wide launch, the full decode and the verify pass (a block of 5), at the real model's shape (Hq 9, Hkv 3, D 64) and the
paper's (Hq 32, Hkv 8, D 128), bf16.

Each launch is specialised as the JIT specialises it on a GPU (alignment and divisibility
hints from the arguments), so the numbers are those of the code the GPU runs, for this
Triton version: they differ between versions (a kernel that spills under one may not under
another), so compare with the GPU machine's version (``pip install --no-deps --target DIR
triton==VERSION`` and ``PYTHONPATH=DIR``).

    python -m benchmarks.compile_kernels [--arch 90]

Exits 1 when a kernel fails to compile. Run it with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.runtime.jit as jit
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend


def record_launches(run) -> list[tuple]:
    """``(kernel, positional arguments, keyword arguments)`` of every launch ``run()`` makes; nothing runs."""
    launches = []

    def recorder(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    saved, jit.JITFunction.run = jit.JITFunction.run, recorder
    try:
        run()
    finally:
        jit.JITFunction.run = saved
    return launches


def specialise(kernel, args: tuple, kwargs: dict, target: GPUTarget) -> tuple[ASTSource, dict]:
    """The source and options of one launch, specialised as the JIT specialises a launch
    (Triton's own binder): a pointer aligned to 16 bytes and an integer divisible by 16 carry
    ``tt.divisibility``, an integer equal to 1 is a constant. Without those hints the
    compiler must assume unaligned data, and the code it emits is not what the GPU runs (no
    vectorised loads, no pipelined copies into shared memory)."""
    backend = make_backend(target)
    binder = jit.create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__


def resources(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)", out)
    return f"registers {found[1]:>3}, stack {found[2]:>3} B, shared {found[3]:>6} B" if found else "resources unknown"


def cases():
    """``(name, run)`` of each case: a callable that makes one decode step's launches."""
    from mac_core import LayerState, MACConfig, MassRule
    from mac_triton import NARROW, decode, launch_for
    from mac_triton.launch import NARROW_MAX_GROUPS
    from mac_triton.verify import verify_step

    for shape, (B, Hq, Hkv, D, W) in {"smollm2": (4, 9, 3, 64, 256), "paper": (2, 32, 8, 128, 1024)}.items():
        q = torch.randn(B, Hq, D).bfloat16()
        k = torch.randn(B, Hkv, 1200, D).bfloat16()
        pos = torch.full((B,), 1100, dtype=torch.int64)
        configs = {
            "paper rule": MACConfig(window=W, band=256, tau=0.5),
            "mass rule per group": MACConfig(window=W, band=256, tau=0.3, max_chain=2, rule=MassRule(tau_m=0.85, per_group=True)),
            "group match, subtract": MACConfig(window=W, band=256, tau=0.5, group_match=True, row_update="subtract"),
        }
        for label, config in configs.items():
            for launch_name, launch in (("narrow", NARROW), ("wide", launch_for(NARROW_MAX_GROUPS + 1, D))):  # wide: the default past NARROW's groups
                def step(config=config, launch=launch, B=B, Hq=Hq, D=D, W=W, q=q, k=k, pos=pos):
                    state = LayerState.empty(B, Hq, D, W, dtype=torch.bfloat16, device="cpu")
                    workspace = decode.DecodeWorkspace.new(config, B, Hq, D, "cpu")
                    decode.mac_step(q, q, k, k, state, pos, config, 0.125, workspace, launch)

                yield f"{shape}, {label}, {launch_name}", step
        yield f"{shape}, full decode", lambda q=q, k=k, pos=pos: decode.full_step(q, k, k, pos)
        block = torch.randn(B, Hq, 5, D).bfloat16()  # lossless MAC's verify pass: a block of 5 queries per request
        yield f"{shape}, verify a block of 5", lambda q=block, k=k, pos=pos, W=W: verify_step(q, k, k, pos, MACConfig(window=W, band=256, sinks=4), 0.125)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="the CUDA compute capability, e.g. 90 (H100, H200) or 80 (A100)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: under the interpreter there is nothing to compile")
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for name, run in cases():
        print(name, flush=True)
        for kernel, launch_args, launch_kwargs in record_launches(run):
            try:
                source, options = specialise(kernel, launch_args, launch_kwargs, target)
                compiled = triton.compile(source, target=target, options=options)
                print(f"  {kernel.__name__:<22} {resources(compiled.asm['cubin'])}, {options['num_warps']} warps, {compiled.metadata.shared:>6} B shared in all", flush=True)
            except Exception as err:  # noqa: BLE001 - report every failure, then exit 1
                failed += 1
                print(f"  {kernel.__name__:<22} FAILED: {type(err).__name__}: {str(err)[:2000]}", flush=True)
    print(f"{failed} kernel(s) failed to compile for sm_{args.arch}" if failed else f"every kernel compiled for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
