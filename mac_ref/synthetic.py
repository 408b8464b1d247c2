"""Synthetic decode streams with controllable query reuse (for demos, tests and benchmarks).

Real decoding revisits similar queries: a repeated phrase, a loop in generated text. Here
each pre-RoPE query is, with probability ``reuse``, a noisy copy of a query at most
``max_lag`` tokens back, and otherwise a fresh draw; entries are roughly unit-variance, the
scale the paper's threshold ``(1 − τ)·sqrt(2D)`` assumes. Keys are made from their own
token's query direction plus noise and rotated by RoPE, so attention has structure (a
query attends most to keys of tokens like it) rather than being uniform. As in trained
models, the keys' energy sits mostly in the slowly rotating (low-frequency) RoPE pairs,
which carry meaning rather than position: that is what makes reusing an earlier query's
attention over far-away keys accurate.
"""

from __future__ import annotations

import torch

from mac_core.rope import apply_rope


def synthetic_stream(
    batch: int,
    q_heads: int,
    kv_heads: int,
    length: int,
    head_dim: int,
    *,
    reuse: float = 0.7,
    noise: float = 0.05,
    max_lag: int = 64,
    seed: int = 0,
    dtype=torch.float32,
    rope_base: float = 10000.0,
):
    """Draw a stream of pre-RoPE queries and post-RoPE keys and values.

    Args:
        batch, q_heads, kv_heads, length, head_dim: shapes ``B, Hq, Hkv, T, D``.
        reuse: probability that a token's query is a noisy copy of a recent one.
        noise: standard deviation of the copy noise, per entry.
        max_lag: copies come from ``1 … max_lag`` tokens back.
        seed: seed of the torch generator that draws every value.
        dtype: dtype of the returned tensors.

    Returns:
        ``(q_pre [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, D])``.
    """
    if not 0.0 <= reuse <= 1.0:
        raise ValueError(f"reuse must lie in [0, 1], got {reuse}")
    if q_heads % kv_heads != 0:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, q_heads, length, head_dim)
    q = torch.randn(shape, generator=gen, dtype=torch.float64)
    copy = torch.rand(batch, q_heads, length, generator=gen, dtype=torch.float64) < reuse
    lag = torch.randint(1, max_lag + 1, (batch, q_heads, length), generator=gen)
    jitter = noise * torch.randn(shape, generator=gen, dtype=torch.float64)
    for t in range(1, length):  # sequential: a copy may copy a copy
        src = (t - lag[:, :, t]).clamp(min=0)  # [B, Hq]
        copied = q.gather(2, src[..., None, None].expand(-1, -1, 1, head_dim)).squeeze(2) + jitter[:, :, t]
        q[:, :, t] = torch.where(copy[:, :, t, None], copied, q[:, :, t])

    group = q_heads // kv_heads
    k_pre = q.view(batch, kv_heads, group, length, head_dim).mean(2)  # the group's query direction
    k_pre = k_pre + 0.5 * torch.randn(k_pre.shape, generator=gen, dtype=torch.float64)
    slowness = torch.arange(head_dim // 2, dtype=torch.float64) / (head_dim // 2)  # 0: fastest pair, →1: slowest
    k_pre = k_pre * (0.05 + 3.0 * slowness**4).repeat(2)  # rotate-half pairs i and i + D/2
    k = apply_rope(k_pre, torch.arange(length), rope_base)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)
