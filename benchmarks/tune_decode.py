"""Sweep the launch parameters of the Triton decode kernels on a CUDA GPU.

Times the match scan alone (``BLOCK_W``, warps, programs per SM) and the full decode
(``BLOCK_N``, pipeline stages, warps, programs per SM, units per program) at the
benchmark's shapes (Hq = 32, Hkv = 8, D = 128, bf16), CUDA-graph medians. Prints the
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

import mac_triton  # noqa: E402, F401
from mac_triton.match import match_keys  # noqa: E402

complete = sys.modules["mac_triton.complete"]
match = sys.modules["mac_triton.match"]


def graph_us(fn) -> float:
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []

    # the match scan
    for batch in (1, 16):
        q = torch.randn(batch, 32, 128, generator=gen, device=device).bfloat16()
        ring = torch.randn(batch, 32, 1024, 128, generator=gen, device=device).bfloat16()
        pos = torch.full((batch,), 131071, dtype=torch.int64, device=device)
        for block_w, warps, per_sm in itertools.product((16, 32, 64), (2, 4, 8), (4, 8, 16)):
            match.BLOCK_W, match.MATCH_WARPS, match.PROGRAMS_PER_SM = block_w, warps, per_sm
            us = graph_us(lambda: match_keys(q, ring, pos))
            rows.append(dict(kernel="match", batch=batch, ctx=1024, block=block_w, warps=warps, per_sm=per_sm, stages="", units="", us=round(us, 2)))
        match.key_workspace(device, batch * 32).fill_(match.NO_CANDIDATE)

    # the full decode
    shapes = [(1, 8192), (1, 131072), (16, 8192), (16, 131072)]
    data = {}
    for batch, ctx in shapes:
        k = torch.randn(batch, 8, ctx, 128, generator=gen, device=device).bfloat16()
        v = torch.randn(batch, 8, ctx, 128, generator=gen, device=device).bfloat16()
        q = torch.randn(batch, 32, 128, generator=gen, device=device).bfloat16()
        data[(batch, ctx)] = (q, k, v, torch.full((batch,), ctx - 1, dtype=torch.int64, device=device))
    configs = [
        (64, 3, 4, 2, 4), (64, 3, 4, 2, 2), (64, 3, 4, 2, 8), (64, 2, 4, 3, 4), (64, 4, 4, 1, 4), (64, 3, 8, 2, 4),
        (32, 4, 4, 3, 4), (32, 3, 4, 4, 4), (32, 4, 2, 4, 4), (128, 2, 4, 1, 4), (128, 2, 8, 1, 4), (128, 3, 8, 1, 2),
        (64, 3, 4, 2, 16), (32, 4, 4, 3, 8),
    ]
    for block_n, stages, warps, per_sm, units in configs:
        complete.BLOCK_N, complete.ATTEND_STAGES, complete.ATTEND_WARPS = block_n, stages, warps
        complete.PROGRAMS_PER_SM, complete.UNITS_PER_PROGRAM = per_sm, units
        for (batch, ctx), (q, k, v, pos) in data.items():
            try:
                us = graph_us(lambda: mac_triton.full_decode(q, k, v, pos))
            except Exception as err:  # noqa: BLE001 - e.g. out of shared memory
                print(f"  {block_n, stages, warps, per_sm, units}: {type(err).__name__} {str(err)[:100]}")
                us = float("nan")
            rows.append(dict(kernel="full", batch=batch, ctx=ctx, block=block_n, warps=warps, per_sm=per_sm, stages=stages, units=units, us=round(us, 2)))
        print("full", (block_n, stages, warps, per_sm, units), [r["us"] for r in rows[-4:]], flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "tune.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for batch in (1, 16):
        best = sorted((r for r in rows if r["kernel"] == "match" and r["batch"] == batch), key=lambda r: r["us"])[:3]
        print("match batch", batch, [(r["block"], r["warps"], r["per_sm"], r["us"]) for r in best])
    sums = {}
    for r in rows:
        if r["kernel"] == "full":
            key = (r["block"], r["stages"], r["warps"], r["per_sm"], r["units"])
            sums.setdefault(key, []).append(r["us"])
    for key, times in sorted(sums.items(), key=lambda kv: max(t / min(s[i] for s in sums.values()) for i, t in enumerate(kv[1]))):
        print("full", key, times)


if __name__ == "__main__":
    main()
