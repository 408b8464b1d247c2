"""Inputs and comparisons shared by the mac_triton differential tests (``test_triton_*.py``).

The kernels run on the CUDA device when there is one and Triton is compiling, else on
the CPU under ``TRITON_INTERPRET=1`` (set by ``conftest.py``); the reference ``mac_ref``
runs on the same device with the same inputs.
"""

from __future__ import annotations

import os

import torch

import mac_ref
from mac_ref import MACConfig
from tolerances import assert_close

DEVICE = torch.device("cpu" if os.environ.get("TRITON_INTERPRET", "0") == "1" or not torch.cuda.is_available() else "cuda")


def stream_inputs(batch, q_heads, kv_heads, length, head_dim, dtype, seed, reuse=0.7, max_lag=8):
    """A synthetic stream (``mac_ref.synthetic_stream``) on :data:`DEVICE` in ``dtype``."""
    q, k, v = mac_ref.synthetic_stream(
        batch, q_heads, kv_heads, length, head_dim, reuse=reuse, noise=0.05, max_lag=max_lag, seed=seed, dtype=dtype
    )
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def prefilled_step(batch, q_heads, kv_heads, head_dim, dtype, seed, positions, config: MACConfig, reuse=0.7):
    """State, cache and the queries of one decode step at ``positions [B]`` (ragged allowed).

    The cache is NaN past each request's position, so a read beyond ``t`` shows.
    Returns ``(q_pre, q_post, k, v, state, positions)``.
    """
    length = int(max(positions)) + 1
    q, k, v = stream_inputs(batch, q_heads, kv_heads, length, head_dim, dtype, seed, reuse=reuse)
    positions = torch.tensor(positions, dtype=torch.int64, device=DEVICE)
    _, _, state = mac_ref.prefill(q, k, v, positions, config)
    rows = torch.arange(batch, device=DEVICE)
    q_pre = q[rows, :, positions]  # [B, Hq, D]
    q_post = mac_ref.apply_rope(q_pre, positions[:, None], config.rope_base)
    index = torch.arange(length, device=DEVICE)
    beyond = index[None, :] > positions[:, None]  # [B, T]
    k = k.masked_fill(beyond[:, None, :, None], float("nan"))
    v = v.masked_fill(beyond[:, None, :, None], float("nan"))
    return q_pre, q_post, k, v, state, positions


def random_decode_inputs(batch, q_heads, kv_heads, head_dim, dtype, seed, positions):
    """Plain normal ``q_post [B, Hq, D]``, ``k, v [B, Hkv, max t + 1, D]`` on :data:`DEVICE`
    (no prefill: for long contexts), the cache NaN past each request's position."""
    gen = torch.Generator().manual_seed(seed)
    length = int(max(positions)) + 1
    q_post = torch.randn(batch, q_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=gen).to(dtype).to(DEVICE)
    positions = torch.tensor(positions, dtype=torch.int64, device=DEVICE)
    beyond = torch.arange(length, device=DEVICE)[None, :] > positions[:, None]  # [B, T]
    k = k.masked_fill(beyond[:, None, :, None], float("nan"))
    v = v.masked_fill(beyond[:, None, :, None], float("nan"))
    return q_post, k, v, positions


def assert_summary_close(actual, expected, dtype, msg=""):
    """``o`` within the ``triton`` band of ``dtype``, LSE within float32 rounding."""
    assert_close(actual.o, expected.o, "triton", dtype, msg=f"{msg} o")
    assert_close(actual.lse, expected.lse, "triton_lse", dtype, msg=f"{msg} lse")


def assert_states_close(actual, expected, dtype, config: MACConfig, msg=""):
    """Rings after the same steps: queries and chain depths bitwise, rows in the ``triton``
    band (the ``triton_subtract`` band under the subtract rule)."""
    assert torch.equal(actual.ring_q, expected.ring_q), f"{msg} ring_q differs"
    assert torch.equal(actual.ring_depth, expected.ring_depth), f"{msg} ring_depth differs"
    assert torch.equal(actual.next_pos, expected.next_pos), f"{msg} next_pos differs"
    operation = "triton_subtract" if config.row_update == "subtract" else "triton"
    assert_close(actual.ring_o, expected.ring_o, operation, dtype, msg=f"{msg} ring_o")
    assert_close(actual.ring_lse, expected.ring_lse, "triton_lse", dtype, msg=f"{msg} ring_lse")
