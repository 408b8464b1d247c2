"""Drift of MAC-Attention from full attention along a 2,000-step correlated stream.

Hits reuse rows built on earlier reused rows, so errors chain until the next miss (docs/spec.md#spec-chains).
This test measures the error along the stream (per block of 250 steps) and along the reuse
chain (by chain depth: 0 for a miss, ``depth(j*) + 1`` for a hit) and asserts that

* every miss is exact and leaves an exact row (misses restore exactness);
* the error stays bounded along the stream: later blocks are no worse than earlier ones;
* the error grows with chain depth no faster than a random walk (``∝ sqrt(depth)``).

Run with ``-s`` to see the figures.
"""

import math

import torch

from mac_ref import MACConfig, apply_rope, attend, causal_attention, run_stream, synthetic_stream
from tolerances import assert_close, rel_rms, tolerance

PROMPT, STEPS, BLOCK = 48, 2000, 250
Q_HEADS, KV_HEADS, HEAD_DIM = 4, 2, 32
CONFIG = MACConfig(window=256, band=32, tau=0.45)


def chain_depths(hit: list[list[bool]], matched: list[list[int]], prompt: int) -> list[list[int]]:
    """``depth[h][s]``: reuse links since the last exact row (prefill rows and misses are depth 0)."""
    depths = []
    for hit_h, matched_h in zip(hit, matched):
        depth = [0] * prompt  # prefill rows are exact
        for is_hit, j in zip(hit_h, matched_h):
            depth.append(depth[j] + 1 if is_hit else 0)
        depths.append(depth[prompt:])
    return depths


def test_drift_is_bounded_and_misses_restore_exactness():
    T = PROMPT + STEPS
    q, k, v = synthetic_stream(1, Q_HEADS, KV_HEADS, T, HEAD_DIM, reuse=0.7, noise=0.05, max_lag=64, seed=0)
    result = run_stream(q, k, v, PROMPT, CONFIG)
    q_post = apply_rope(q, torch.arange(T))
    o_ref, _ = causal_attention(q_post, k, v)
    out, ref = result.out[0, :, PROMPT:].double(), o_ref[0, :, PROMPT:]  # [Hq, S, D]
    hit = result.stats.hit[:, 0].T  # [Hq, S]
    stats = result.stats
    assert 0.5 < stats.hit_rate < 0.9

    # misses are exact, and so are the rows they leave (the chain restarts from them)
    assert_close(out[~hit], ref[~hit], "exact", torch.float32, msg="miss outputs")
    W = CONFIG.window
    last = torch.arange(T - W, T)
    row_exact = attend(q_post[:, :, last], k, v, 0, (last + 1 - CONFIG.band).clamp(min=0))  # [1, Hq, W]
    miss_rows = ~hit[:, -W:]  # [Hq, W]
    ring_lse = result.state.ring_lse[0][:, last % W]
    ring_o = result.state.ring_o[0][:, last % W]
    assert_close(ring_lse[miss_rows], row_exact.lse[0][miss_rows], "exact", torch.float32, msg="miss rows lse")
    assert_close(ring_o[miss_rows], row_exact.o[0][miss_rows], "exact", torch.float32, msg="miss rows o")

    # error along the stream, per block of steps
    bound = tolerance("mac_drift", torch.float32)
    print(f"\nMAC vs full attention: {STEPS} steps, hit rate {stats.hit_rate:.3f}, KV reads skipped {stats.skipped_fraction():.3f}")
    print(f"{'steps':>11} {'hit rate':>8} {'rel RMS':>9} {'RMS':>9} {'max err':>9}")
    block_rel, block_rms = [], []
    for start in range(0, STEPS, BLOCK):
        o, r = out[:, start : start + BLOCK], ref[:, start : start + BLOCK]
        block_rel.append(rel_rms(o, r))
        block_rms.append((o - r).pow(2).mean().sqrt().item())
        max_err = (o - r).abs().max().item()
        hits = hit[:, start : start + BLOCK].float().mean().item()
        print(f"{start:>5}-{start + BLOCK - 1:<5} {hits:>8.2f} {block_rel[-1]:>9.2e} {block_rms[-1]:>9.2e} {max_err:>9.2e}")
        assert block_rel[-1] <= bound.rel_rms and max_err <= bound.atol
    half = len(block_rel) // 2
    assert max(block_rel[half:]) <= 1.5 * max(block_rel[:half]), "relative error grows along the stream"
    assert max(block_rms[half:]) <= 1.5 * max(block_rms[:half]), "absolute error grows along the stream"

    # error along the reuse chain
    depth = torch.tensor(chain_depths(hit.tolist(), stats.matched_pos[:, 0].T.tolist(), PROMPT))  # [Hq, S]
    rel_err = (out - ref).norm(dim=-1) / ref.norm(dim=-1)  # [Hq, S]
    print(f"{'depth':>11} {'count':>8} {'mean rel':>9} {'/sqrt(d)':>9}")
    first = rel_err[depth == 1].mean().item()
    for lo, hi in [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 10**9)]:
        in_bucket = (depth >= lo) & (depth < hi)
        if not in_bucket.any():
            continue
        mean_rel = rel_err[in_bucket].mean().item()
        mean_depth = depth[in_bucket].double().mean().item()
        per_sqrt = mean_rel / math.sqrt(mean_depth) if lo > 0 else float("nan")
        print(f"{lo:>5}-{min(hi, depth.max().item() + 1) - 1:<5} {int(in_bucket.sum()):>8} {mean_rel:>9.2e} {per_sqrt:>9.2e}")
        if lo > 0 and in_bucket.sum() >= 20:
            assert mean_rel <= 2.0 * first * math.sqrt(mean_depth), f"error grows faster than sqrt(depth) at {lo}"
    assert depth.max() > 8  # long chains were exercised
