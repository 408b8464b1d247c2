"""Sweep the launch parameters of the Triton decode kernels on a CUDA GPU.

Times the match scan alone (``BLOCK_W``, warps, programs per SM) and the attention
kernels (``BLOCK_N``, pipeline stages, warps, programs per SM, fewest keys per program)
on full decodes and on all-hit MAC steps, at the benchmark's shapes (Hq = 32, Hkv = 8,
D = 128, bf16), CUDA-graph medians. Prints the
best settings and writes ``tune.csv`` into ``--out``. The defaults in ``mac_triton``
come from a run of this script (see ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mac_triton  # noqa: E402, F401
from bench_decode import planted_state  # noqa: E402
from mac_ref import MACConfig  # noqa: E402
from mac_triton.match import match_keys  # noqa: E402

complete = sys.modules["mac_triton.complete"]
match = sys.modules["mac_triton.match"]


def graph_us(fn) -> float:
    torch.cuda.synchronize()  # do_bench_cudagraph runs on a side stream: let the inputs' writes land first
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--skip-match", action="store_true", help="only the attention kernels")
    args = parser.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []

    # the match scan
    for batch in () if args.skip_match else (1, 16):
        q = torch.randn(batch, 32, 128, generator=gen, device=device).bfloat16()
        ring = torch.randn(batch, 32, 1024, 128, generator=gen, device=device).bfloat16()
        pos = torch.full((batch,), 131071, dtype=torch.int64, device=device)
        for block_w, warps, per_sm in itertools.product((16, 32, 64), (2, 4, 8), (4, 8, 16)):
            match.BLOCK_W, match.MATCH_WARPS, match.PROGRAMS_PER_SM = block_w, warps, per_sm
            us = graph_us(lambda: match_keys(q, ring, pos))
            rows.append(dict(kernel="match", batch=batch, ctx=1024, block=block_w, warps=warps, per_sm=per_sm, stages="", min_chunk="", us=round(us, 2)))
        match.key_workspace(device, batch * 32).fill_(match.NO_CANDIDATE)

    # the attend + reduce kernels: full decodes and all-hit MAC steps (short spans, many units)
    shapes = [(1, 8192), (1, 131072), (16, 8192), (16, 131072)]
    config = MACConfig(window=1024, band=256, tau=0.45)
    cases = {}
    for batch, ctx in shapes:
        k = torch.randn(batch, 8, ctx, 128, generator=gen, device=device).bfloat16()
        v = torch.randn(batch, 8, ctx, 128, generator=gen, device=device).bfloat16()
        q = torch.randn(batch, 32, 128, generator=gen, device=device).bfloat16()
        pos = torch.full((batch,), ctx - 1, dtype=torch.int64, device=device)
        cases[("full", batch, ctx)] = lambda q=q, k=k, v=v, pos=pos: mac_triton.full_decode(q, k, v, pos)
        if ctx == 8192 or batch == 1:
            state, _ = planted_state(q, batch, config.window, ctx - 1, 1.0, gen)
            slot, saved = (ctx - 1) % config.window, state.ring_q[:, :, (ctx - 1) % config.window].clone()

            def hit_step(q=q, k=k, v=v, pos=pos, state=state, slot=slot, saved=saved):
                mac_triton.mac_step(q, q, k, v, state, pos, config, 1.0 / 128**0.5)
                state.ring_q[:, :, slot] = saved

            cases[("mac_all_hit", batch, ctx)] = hit_step
    configs = [  # BLOCK_N, stages, warps, programs per SM, MIN_CHUNK
        (128, 3, 8, 1, 128), (128, 3, 8, 2, 128), (128, 2, 8, 1, 128), (64, 3, 4, 2, 128), (64, 3, 4, 2, 64),
        (64, 4, 4, 2, 64), (64, 3, 8, 2, 64), (64, 3, 4, 1, 64), (32, 4, 4, 3, 32), (32, 4, 2, 4, 32), (128, 3, 4, 1, 128),
    ]
    for block_n, stages, warps, per_sm, min_chunk in configs:
        complete.WIDE = complete.NARROW = complete.AttendLaunch(block_n, min_chunk, per_sm, warps, stages)
        for (kernel, batch, ctx), fn in cases.items():
            try:
                us = graph_us(fn)
            except Exception as err:  # noqa: BLE001 - e.g. out of shared memory
                print(f"  {block_n, stages, warps, per_sm, min_chunk}: {type(err).__name__} {str(err)[:100]}")
                us = float("nan")
            rows.append(dict(kernel=kernel, batch=batch, ctx=ctx, block=block_n, warps=warps, per_sm=per_sm, stages=stages,
                             min_chunk=min_chunk, us=round(us, 2)))
        print("attend", (block_n, stages, warps, per_sm, min_chunk), [r["us"] for r in rows[-len(cases):]], flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "tune.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for batch in () if args.skip_match else (1, 16):
        best = sorted((r for r in rows if r["kernel"] == "match" and r["batch"] == batch), key=lambda r: r["us"])[:3]
        print("match batch", batch, [(r["block"], r["warps"], r["per_sm"], r["us"]) for r in best])
    sums = {}
    for r in rows:
        if r["kernel"] != "match":
            sums.setdefault((r["block"], r["stages"], r["warps"], r["per_sm"], r["min_chunk"]), []).append(r["us"])
    # ranked by the worst ratio to the best setting of each case
    best = [min(times[i] for times in sums.values()) for i in range(len(cases))]
    print("cases", list(cases))
    for key, times in sorted(sums.items(), key=lambda kv: max(t / b for t, b in zip(kv[1], best))):
        print("attend", key, times)

if __name__ == "__main__":
    main()
