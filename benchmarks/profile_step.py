"""Where the time of one decode step goes, kernel by kernel, on a CUDA GPU.

For a few benchmark points (same shapes and planted hits as ``bench_decode.py``, through
``harness``) it times the whole step as a CUDA-graph replay and each kernel of it with the
torch profiler (device time of eager launches, median over repeats). The difference
between the replay and the sum of the kernels is what the step spends between kernels
(launch and dependency gaps). Prints a table and writes ``profile.csv`` into ``--out``.

    python -m benchmarks.profile_step [--out benchmarks/results]
    ncu --section SpeedOfLight python -m benchmarks.profile_step --ncu "MAC 100% b16 8K"

``--ncu LABEL`` only runs that point's step a few times, eagerly, for Nsight Compute.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import mac_triton
from mac_core import MACConfig, MassRule, PaperRule

from .harness import environment, planted_state, ring_restoring_step, step_inputs, timed_us

# (label, Hkv, batch, context, hit rate or None for the full decode, acceptance rule)
PAPER, MASS = PaperRule(), MassRule(tau_m=0.5)
POINTS = [
    ("full b1 8K", 8, 1, 8192, None, PAPER),
    ("MAC 100% b1 8K", 8, 1, 8192, 1.0, PAPER),
    ("MAC mass 100% b1 8K", 8, 1, 8192, 1.0, MASS),
    ("MAC 100% b1 128K", 8, 1, 131072, 1.0, PAPER),
    ("MAC 0% b1 8K", 8, 1, 8192, 0.0, PAPER),
    ("full b16 8K", 8, 16, 8192, None, PAPER),
    ("MAC 100% b16 8K", 8, 16, 8192, 1.0, PAPER),
    ("MAC mass 100% b16 8K", 8, 16, 8192, 1.0, MASS),
    ("MAC 0% b16 8K", 8, 16, 8192, 0.0, PAPER),
]
REPEATS = 20
KERNELS = ("_match_kernel", "_attend_kernel", "_fresh_kernel", "_prefix_kernel", "_reduce_kernel")


def kernel_times(fn) -> dict[str, float]:
    """Median device µs per kernel name over ``REPEATS`` eager calls of ``fn``."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPEATS):
            fn()
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times.setdefault(event.name, []).append(event.device_time)
    return {name: statistics.median(ts) * len(ts) / REPEATS for name, ts in times.items()}  # per step


def short(name: str) -> str:
    for key in KERNELS:
        if key in name:
            return key.strip("_")
    return "copy (ring restore)" if "elementwise" in name or "copy" in name.lower() else name[:40]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--ncu", metavar="LABEL", choices=[p[0] for p in POINTS], help="only run this point's step (under ncu)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this script needs a CUDA GPU")
    device = torch.device("cuda")
    config = MACConfig(window=1024, band=256, tau=0.45)
    rows = []
    print(", ".join(f"{k} {v}" for k, v in environment().items()))
    for label, hkv, batch, ctx, rate, rule in POINTS if args.ncu is None else [p for p in POINTS if p[0] == args.ncu]:
        gen = torch.Generator(device=device).manual_seed(ctx + batch)
        positions, k, v, q_pre, q_post = step_inputs(hkv, batch, ctx, gen)
        if rate is None:
            def step():
                return mac_triton.full_step(q_post, k, v, positions)
        else:
            state, _ = planted_state(q_pre, config.window, ctx - 1, rate, gen)
            step = ring_restoring_step(q_pre, q_post, k, v, state, positions, dataclasses.replace(config, rule=rule))
        torch.cuda.synchronize()
        if args.ncu:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            return
        replay, _ = timed_us(step)
        kernels = {short(name): us for name, us in kernel_times(step).items()}
        total = sum(kernels.values())
        print(f"{label:18s} replay {replay:7.1f} µs = kernels {total:7.1f} + between {replay - total:5.1f}: "
              + ", ".join(f"{n} {us:.1f}" for n, us in kernels.items()))
        for name, us in kernels.items():
            rows.append(dict(point=label, kernel=name, us=round(us, 2), replay_us=round(replay, 2)))
        rows.append(dict(point=label, kernel="between kernels", us=round(replay - total, 2), replay_us=round(replay, 2)))
        del k, v
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "profile.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
