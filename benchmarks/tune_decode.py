"""Sweep the launch parameters of the Triton decode kernels on a CUDA GPU.

Times the match scan alone (``MatchLaunch``: slots per tile, warps, programs per SM; at
the paper's shape, Hq 32, D 128, ring 1024, and the real model's, Hq 9, D 64, ring 256,
with the achieved TB/s of the rings' bytes) and the attention kernels on full decodes and
on MAC steps with planted hits, at the benchmark's shapes (Hq = 32, Hkv = 8, D = 128,
bf16), CUDA-graph medians. The settings are
*passed* to the launchers (``launch=``), never written into ``mac_triton``. By default it
sweeps tiles, warps, stages, programs per SM and the fewest keys per program (one setting
for every batch size); ``--sweep FIELD=V1,V2,...`` varies one field of the current
``mac_triton.launch.WIDE`` and ``NARROW``, e.g. ``--sweep unit_cost=0,128,256,512,1024,2048``.
Prints the settings ranked by their worst ratio to the best and writes ``tune.csv`` into
``--out``. The defaults in ``mac_triton.launch`` come from runs of this script (see
``benchmarks/RESULTS.md``).

    python -m benchmarks.tune_decode [--skip-match | --match-only] [--sweep FIELD=V1,V2,...]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
from pathlib import Path

import torch

import mac_triton
from mac_core import MACConfig
from mac_triton.launch import NARROW, WIDE, Launch, MatchLaunch, launch_for

from .harness import match_only, planted_state, ring_restoring_step, timed_us

# the match scan's cases: (batch, Hq, D, ring W)
MATCH_CASES = [(1, 32, 128, 1024), (16, 32, 128, 1024), (16, 9, 64, 256), (64, 9, 64, 256)]
MATCH_SETTINGS = list(itertools.product((32, 64, 128, 256), (2, 4, 8), (4, 16)))  # block_w, warps, programs per SM (splits at batch 1)
# (batch, context, hit rates; None: the full decode), Hkv 8
ATTEND_CASES = [(1, 8192, (None, 1.0)), (1, 131072, (None, 1.0, 0.95, 0.5)), (16, 8192, (None, 1.0)), (16, 131072, (None, 0.95, 0.5))]
SHAPES = [  # block_n, min_chunk, programs per SM, warps, stages
    (128, 128, 1, 8, 3), (128, 128, 2, 8, 3), (128, 128, 1, 8, 2), (64, 128, 2, 4, 3), (64, 64, 2, 4, 3),
    (64, 64, 2, 4, 4), (64, 64, 2, 8, 3), (64, 64, 1, 4, 3), (32, 32, 3, 4, 4), (32, 32, 4, 2, 4), (128, 128, 1, 4, 3),
]


def graph_us(fn) -> float:
    return timed_us(fn, rep_ms=40)[0]


def attend_cases(gen, config: MACConfig) -> dict:
    """``{(kernel, batch, ctx): make(launch) -> fn}`` for the attention sweep."""
    device = gen.device
    cases = {}
    for batch, ctx, rates in ATTEND_CASES:
        k = torch.randn(batch, 8, ctx, 128, generator=gen, device=device).bfloat16()
        v = torch.randn(batch, 8, ctx, 128, generator=gen, device=device).bfloat16()
        q = torch.randn(batch, 32, 128, generator=gen, device=device).bfloat16()
        pos = torch.full((batch,), ctx - 1, dtype=torch.int64, device=device)
        for rate in rates:
            if rate is None:
                cases[("full", batch, ctx)] = lambda launch, q=q, k=k, v=v, pos=pos: (lambda: mac_triton.full_step(q, k, v, pos, launch=launch))
                continue
            state, _ = planted_state(q, config.window, ctx - 1, rate, gen)
            cases[(f"mac_{rate:g}", batch, ctx)] = (
                lambda launch, q=q, k=k, v=v, pos=pos, state=state: ring_restoring_step(q, q, k, v, state, pos, config, launch)
            )
    return cases


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--skip-match", action="store_true", help="only the attention kernels")
    parser.add_argument("--match-only", action="store_true", help="only the match scan")
    parser.add_argument("--sweep", metavar="FIELD=V1,V2,...",
                        help="vary one field of the current WIDE and NARROW settings (e.g. unit_cost=0,256,512) "
                             "instead of sweeping tiles, warps and stages")  # fmt: skip
    args = parser.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []

    for batch, q_heads, head_dim, window in () if args.skip_match else MATCH_CASES:  # the match scan
        q = torch.randn(batch, q_heads, head_dim, generator=gen, device=device).bfloat16()
        ring = torch.randn(batch, q_heads, window, head_dim, generator=gen, device=device).bfloat16()
        pos = torch.full((batch,), 131071, dtype=torch.int64, device=device)
        for block_w, warps, per_sm in MATCH_SETTINGS:
            if block_w > window:
                continue
            us = graph_us(match_only(q, ring, pos, MatchLaunch(block_w, warps, per_sm)))
            rows.append(dict(kernel="match", batch=batch, ctx=window, q_heads=q_heads, head_dim=head_dim, block_n=block_w,
                             warps=warps, programs_per_sm=per_sm, us=round(us, 2), tb_per_s=round(ring.nbytes / us / 1e6, 3)))  # fmt: skip
    cases = {} if args.match_only else attend_cases(gen, MACConfig(window=1024, band=256, tau=0.45))
    if args.match_only:
        candidates = []
    elif args.sweep is None:  # one setting for every batch size
        launches = [dataclasses.replace(WIDE, block_n=n, min_chunk=m, programs_per_sm=p, warps=w, stages=st) for n, m, p, w, st in SHAPES]
        candidates = [(launch, launch) for launch in launches]
    else:  # one field of the current settings
        field, values = args.sweep.split("=")
        candidates = [(dataclasses.replace(WIDE, **{field: int(v)}), dataclasses.replace(NARROW, **{field: int(v)})) for v in values.split(",")]
    for index, (wide, narrow) in enumerate(candidates):
        for (kernel, batch, ctx), make in cases.items():
            launch = narrow if launch_for(batch * 8, 128) is NARROW else wide  # the candidate for this batch size
            try:
                us = graph_us(make(launch))
            except Exception as err:  # noqa: BLE001 - e.g. out of shared memory
                print(f"  {launch}: {type(err).__name__} {str(err)[:100]}")
                us = float("nan")
            rows.append(dict(kernel=kernel, batch=batch, ctx=ctx, candidate=index, **dataclasses.asdict(launch), us=round(us, 2)))
        print(wide, narrow, [r["us"] for r in rows[-len(cases):]], flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "tune.csv", "w", newline="") as f:
        fields = ["kernel", "batch", "ctx", "q_heads", "head_dim", "candidate", *(f.name for f in dataclasses.fields(Launch)), "us", "tb_per_s"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    for batch, q_heads, head_dim, window in () if args.skip_match else MATCH_CASES:
        mine = [r for r in rows if r["kernel"] == "match" and (r["batch"], r["q_heads"], r["head_dim"], r["ctx"]) == (batch, q_heads, head_dim, window)]
        now = next(r for r in mine if (r["block_n"], r["warps"], r["programs_per_sm"]) == dataclasses.astuple(mac_triton.match_launch_for(head_dim)))
        best = sorted(mine, key=lambda r: r["us"])[:3]
        print(f"match B {batch} Hq {q_heads} D {head_dim} W {window}: default {now['us']} µs ({now['tb_per_s']} TB/s); best",
              [(r["block_n"], r["warps"], r["programs_per_sm"], r["us"], r["tb_per_s"]) for r in best])
    times = [[r["us"] for r in rows if r.get("candidate") == i] for i in range(len(candidates))]
    if candidates:  # ranked by the worst ratio to the best candidate of each case
        best = [min(t[c] for t in times) for c in range(len(cases))]
        print("cases", list(cases))
        for i in sorted(range(len(candidates)), key=lambda i: max(t / b for t, b in zip(times[i], best))):
            print(f"WIDE={candidates[i][0]} NARROW={candidates[i][1]}: {times[i]}")


if __name__ == "__main__":
    main()
