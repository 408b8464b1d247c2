"""Decode-attention benchmark on a CUDA GPU: the Triton MAC step against full decoding.

Providers, all timed in the same run as CUDA-graph replays (``triton.testing.
do_bench_cudagraph``, median):

- ``mac``: :func:`mac_triton.mac_step` end to end (match + attention + merge + ring
  write), plus a one-slot copy that restores the ring slot the step overwrote, so that
  every replay sees the same planted ring (``harness.ring_restoring_step``; the copy is
  timed with the step);
- ``mac_mass``: the same step with the mass-aware rule (``MassRule(tau_m=0.5)``, decided
  inside the attend kernel, which then reads the rejected prefixes) on the same
  planted rings, at 95 % and 100 % hits: what the rule costs over the paper's, in the
  same run (every planted hit is accepted: ``w·d`` is tiny; the 5 % are no candidates);
- ``triton_full``: :func:`mac_triton.full_decode` (every head a miss);
- ``flashinfer``: ``BatchDecodeWithPagedKVCacheWrapper(backend="fa2")`` with tensor cores
  on and off (the faster is the baseline), paged ``HND`` cache with 16-token pages, when
  ``flashinfer`` imports;
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(enable_gqa=True)``;
- ``floor``: the KV bytes a full decode must read over the measured copy bandwidth.

Hits are planted exactly (``harness.planted_state``); the measured hit rate is checked
against the planted one. Shapes (:data:`SHAPES`): the paper's, Hq = 32, D = 128 with Hkv 8
and 4, ring 1024 (and 2048 for the comparison with the authors' kernel); and the real
model's, SmolLM2-135M's Hq = 9, Hkv = 3, D = 64 with the demo's ring of 256; bf16, band
256, lag 64. Every row carries the bytes its provider must move (a full decode: the keys
and values; a MAC step: the keys and values its KV groups read, the match scan of the rings
and the rows read and written, from the step's own statistics,
:meth:`mac_core.step.StepStats.bytes_moved`), the achieved TB/s and the share of that byte
floor at the measured copy bandwidth.

Usage (from the repository root): ``python -m benchmarks.bench_decode [--quick] [--out benchmarks/results]``.
Writes ``decode.csv`` and ``decode.md`` (every point) into ``--out``, then the headline table and
one plot per question from the CSV (``benchmarks/plots.py``).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

import mac_triton
from mac_core.numerics import softmax_scale
from mac_core import MACConfig, MassRule

from . import plots
from .harness import (
    BAND,
    HEAD_DIM,
    Q_HEADS,
    copy_bandwidth,
    environment,
    flashinfer_runners,
    floor_us,
    kv_bytes,
    match_only,
    planted_state,
    ring_restoring_step,
    sdpa_runner,
    step_inputs,
    timed_us,
)


MASS_RATES = (0.95, 1.0)  # where the issue bounds the mass rule's cost over the paper's
# the shapes (Hq, D): the paper's (an 8B Llama's attention) and the real model's (SmolLM2-135M)
SHAPES = {"paper": (Q_HEADS, HEAD_DIM), "smollm2": (9, 64)}


def bytes_columns(nbytes: float, us: float, bandwidth: float) -> dict:
    """The CSV's byte columns of a row: MB moved, achieved TB/s, and the byte floor's share of the time."""
    return dict(mbytes=round(nbytes / 1e6, 3), tb_per_s=round(nbytes / (us * 1e-6) / 1e12, 3), byte_floor_fraction=round(floor_us(nbytes, bandwidth) / us, 3))


def run_config(hkv, batch, ctx, window, hit_rates, rep_ms, bandwidth, providers_done, rows, check, shape="paper"):
    device = torch.device("cuda")
    q_heads, head_dim = SHAPES[shape]
    gen = torch.Generator(device=device).manual_seed(1234 + ctx + batch + hkv + window)
    t = ctx - 1
    positions, k, v, q_pre, q_post = step_inputs(hkv, batch, ctx, gen, q_heads, head_dim)
    scale = softmax_scale(head_dim)
    full_bytes = kv_bytes(batch, hkv, ctx, head_dim)
    floor = floor_us(full_bytes, bandwidth)
    base = dict(gpu=torch.cuda.get_device_name(), hkv=hkv, batch=batch, ctx=ctx, window=window, q_heads=q_heads, head_dim=head_dim,
                floor_us=round(floor, 2))
    results = {}

    key = (hkv, batch, ctx, q_heads, head_dim)
    if key not in providers_done:  # the full-decode providers do not depend on the window
        providers_done[key] = {}
        runners = {"triton_full": lambda: mac_triton.full_step(q_post, k, v, positions, scale), "sdpa": sdpa_runner(q_post, k, v, scale)}
        runners.update(flashinfer_runners(q_post, k, v, positions))
        if check:  # the baselines must agree with each other
            ref = mac_triton.full_step(q_post, k, v, positions, scale)[0].float()
            for name, fn in runners.items():
                o = fn()
                o = o[0] if isinstance(o, tuple) else o
                err = (o.float().reshape(ref.shape) - ref).abs().max().item()
                print(f"    check {name}: max |Δ| vs triton_full = {err:.2e}")
        for name, fn in runners.items():
            providers_done[key][name] = timed_us(fn, rep_ms)
    results.update(providers_done[key])
    fi_names = [n for n in results if n.startswith("flashinfer")]
    fi_best = min((results[n][0] for n in fi_names), default=float("nan"))

    for name, (us, mode) in providers_done[key].items():
        rows.append(dict(base, provider=name, hit_rate=0.0, measured_hit_rate="", median_us=round(us, 2), timing=mode,
                         speedup_vs_flashinfer=round(fi_best / us, 3), floor_fraction=round(floor / us, 3),
                         **bytes_columns(full_bytes, us, bandwidth)))

    config = MACConfig(window=window, band=BAND, tau=0.45)
    ring = planted_state(q_pre, window, t, 0.0, gen)[0].ring_q
    us, mode = timed_us(match_only(q_pre, ring, positions), rep_ms)  # the match alone: the all-hit floor
    ring_bytes = ring.numel() * ring.element_size()
    rows.append(dict(base, provider="mac_match_only", hit_rate="", measured_hit_rate="", median_us=round(us, 2), timing=mode,
                     speedup_vs_flashinfer="", floor_fraction=round(floor_us(ring_bytes, bandwidth) / us, 3),
                     **bytes_columns(ring_bytes, us, bandwidth)))
    results["match_only"] = (us, mode)
    del ring
    for rate in hit_rates:
        state, n_hit = planted_state(q_pre, window, t, rate, gen)
        step = ring_restoring_step(q_pre, q_post, k, v, state, positions, config)
        _, _, stats = step()
        measured = stats.hit.float().mean().item()
        keys = stats.keys_read.float().mean().item()
        if abs(measured - n_hit / (batch * q_heads)) > 1e-9:
            print(f"    WARNING planted {n_hit} hits, measured rate {measured:.4f}")
        us, mode = timed_us(step, rep_ms)
        moved = stats.bytes_moved(hkv, head_dim, window, k.element_size(), q_pre.element_size())
        rows.append(dict(base, provider="mac", hit_rate=rate, measured_hit_rate=round(measured, 4), median_us=round(us, 2),
                         timing=mode, speedup_vs_flashinfer=round(fi_best / us, 3), floor_fraction=round(floor / us, 3),
                         mean_keys_read=round(keys, 1), **bytes_columns(moved["kv"] + moved["scan"] + moved["rows"], us, bandwidth)))
        results[f"mac@{rate}"] = (us, mode)
        if rate in MASS_RATES and window == 1024 and shape == "paper":  # the mass-aware rule on the same planted rings
            mass_config = MACConfig(window=window, band=BAND, tau=0.45, rule=MassRule(tau_m=0.5))
            mass_step = ring_restoring_step(q_pre, q_post, k, v, state, positions, mass_config)
            _, _, mass_stats = mass_step()
            assert torch.equal(mass_stats.hit, stats.hit), "the mass rule should accept every planted hit"
            us, mode = timed_us(mass_step, rep_ms)
            moved = mass_stats.bytes_moved(hkv, head_dim, window, k.element_size(), q_pre.element_size())
            rows.append(dict(base, provider="mac_mass", hit_rate=rate, measured_hit_rate=round(mass_stats.hit.float().mean().item(), 4),
                             median_us=round(us, 2), timing=mode, speedup_vs_flashinfer=round(fi_best / us, 3),
                             floor_fraction=round(floor / us, 3), mean_keys_read=round(mass_stats.keys_read.float().mean().item(), 1),
                             **bytes_columns(moved["kv"] + moved["scan"] + moved["rows"], us, bandwidth)))
            results[f"mass@{rate}"] = (us, mode)
    del k, v
    torch.cuda.empty_cache()
    return results, fi_best, floor


CSV_FIELDS = ["gpu", "hkv", "batch", "ctx", "window", "q_heads", "head_dim", "provider", "hit_rate", "measured_hit_rate", "median_us",
              "timing", "speedup_vs_flashinfer", "floor_us", "floor_fraction", "mean_keys_read", "mbytes", "tb_per_s", "byte_floor_fraction"]


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset: Hkv 8, contexts 8K and 128K, hits 0, 0.95 and 1")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--rep-ms", type=int, default=100)
    parser.add_argument("--check", action="store_true", help="compare the baselines' outputs first")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    hkvs, batches, ctxs, hits = [8, 4], [1, 16], [8192, 32768, 131072], [0.0, 0.5, 0.95, 1.0]
    if args.quick:
        hkvs, ctxs, hits = [8], [8192, 131072], [0.0, 0.95, 1.0]
    plan = [(hkv, b, c, 1024, hits, "paper") for hkv in hkvs for b in batches for c in ctxs]
    # the authors' ring of 2048, beside their committed H100 figures (benchmarks/RESULTS.md)
    plan += [(8, b, c, 2048, [0.0, 0.95, 1.0], "paper") for b in batches for c in (ctxs[0], ctxs[-1])]
    # the real model's shape at its contexts and the end-to-end batches (the demo's ring of 256)
    plan += [(3, b, c, 256, hits, "smollm2") for b in (1, 16, 64) for c in ctxs[:2]]

    bandwidth = copy_bandwidth(torch.device("cuda"))
    versions = environment()
    print(f"{versions['gpu']}  copy bandwidth {bandwidth / 1e12:.2f} TB/s  " + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "gpu"))
    rows, providers_done, summary = [], {}, []
    from tqdm import tqdm

    for hkv, batch, ctx, window, rates, shape in tqdm(plan, desc="configs", file=sys.stdout):
        t0 = time.time()
        results, fi_best, floor_us = run_config(hkv, batch, ctx, window, rates, args.rep_ms, bandwidth, providers_done, rows, args.check, shape)
        summary.append((hkv, batch, ctx, window, results, fi_best, floor_us))
        print(f"  {shape} Hkv={hkv} B={batch} ctx={ctx} W={window}: " + ", ".join(f"{n} {u:.1f}" for n, (u, _) in results.items())
              + f"  [{time.time() - t0:.0f}s]", flush=True)
        write_csv(rows, out / "decode.csv")  # after every configuration: a run cut short keeps what it measured

    lines = [f"{versions['gpu']}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, "
             + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "gpu"), "",
             "| Hkv | B | ctx | W | floor µs | FlashInfer µs (best) | SDPA µs | Triton full µs (× FI, % floor) | "
             + " | ".join(f"MAC {r:g} µs (× FI)" for r in [0.0, 0.5, 0.95, 1.0]) + " |",
             "|" + "---|" * 12]
    for hkv, batch, ctx, window, res, fi_best, floor_us in summary:
        full = res.get("triton_full", (float("nan"),))[0]
        sdpa = res.get("sdpa", (float("nan"),))[0]
        cells = []
        for r in [0.0, 0.5, 0.95, 1.0]:
            us = res.get(f"mac@{r}", (None,))[0]
            cells.append(f"{us:.1f} ({fi_best / us:.2f}×)" if us else "–")
        lines.append(f"| {hkv} | {batch} | {ctx} | {window} | {floor_us:.1f} | {fi_best:.1f} | {sdpa:.1f} | "
                     f"{full:.1f} ({fi_best / full:.2f}×, {100 * floor_us / full:.0f} %) | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    (out / "decode.md").write_text(table + "\n")

    for path in plots.write_all(out):  # the headline table and one plot per question, from the CSV
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
