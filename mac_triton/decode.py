r"""The decode step in Triton: match → amend + complete → row update, fused into three
launches with no host synchronisation; and the full-attention decode baseline.

Twin of :func:`mac_ref.decode.decode_step` (same signature, same :class:`StepStats`,
same validation through :func:`mac_ref.decode.check_step_inputs`). The stages map onto
kernels as follows:

===========================  ==============================================================
mac_ref                      mac_triton
===========================  ==============================================================
``match``                    ``match._match_kernel`` → one int64 key per head (1 launch)
``step_spans``               ``complete._plan``, evaluated inside both kernels below
``amend_complete``           ``complete._attend_kernel`` (split-KV partials per unit)
``update_row`` + ``write``   ``complete._reduce_kernel`` (⊕ partials, cached row, ring write,
                             match report)
===========================  ==============================================================

Differences: float32 arithmetic only (float64 inputs are a ``TypeError``); the ring
write happens inside the reduce kernel rather than through ``LayerState.write``;
``subtract`` rows use the sinks ⊕ tail partials of this same pass (the reference
recomputes them), so they agree to rounding. :func:`mac_step` is the part a CUDA graph
can capture (validation and ``state.next_pos`` stay outside).
"""

from __future__ import annotations

import math

import torch

from mac_ref.config import MACConfig
from mac_ref.decode import StepStats, check_step_inputs
from mac_ref.rope import apply_rope
from mac_ref.state import LayerState

from ._common import check_kernel_dtype
from .complete import SOURCE_KEYS, SOURCE_NONE, attend_spans, check_attention_inputs
from .match import match_keys, radius_sq_per_head

FULL_BAND = 2**30  # a band longer than any context: no row, every key in the "tail"


def mac_step(q_pre, q_post, k_cache, v_cache, state: LayerState, positions, config: MACConfig, scale: float) -> dict:
    """The kernels of one decode step, without checks (graph-capturable); writes the rings.

    Args:
        q_pre, q_post: ``[B, Hq, D]`` pre- and post-RoPE queries.
        k_cache, v_cache: ``[B, Hkv, T, D]``.
        state: rings, updated in place (``next_pos`` is left to the caller).
        positions: ``[B]`` int64 positions ``t``.
        config: the MAC configuration.
        scale: softmax scale.

    Returns:
        dict with ``out`` (``q_pre``'s dtype), ``lse``, ``hit``, ``matched_pos``,
        ``distance``, ``keys_read``, ``ill_conditioned`` and ``chain_depth``.
    """
    keys = match_keys(q_pre, state.ring_q, positions, state.ring_depth, config.max_chain)
    return attend_spans(
        q_post, k_cache, v_cache, positions, source=SOURCE_KEYS, band=config.band, sinks=config.sinks, keys=keys,
        min_context=config.min_context, radius_sq=radius_sq_per_head(config, q_pre.shape[1], q_pre.shape[2], q_pre.device),
        state=state, q_pre=q_pre,
        out_dtype=q_pre.dtype, row_out=2, subtract=config.row_update == "subtract", scale=scale,
    )


def decode_step(q_pre, k_cache, v_cache, state: LayerState, positions, config: MACConfig, q_post=None):
    """One MAC-Attention decode step for a batch of requests (updates ``state`` in place).

    Same contract as :func:`mac_ref.decode.decode_step`.

    Args:
        q_pre: ``[B, Hq, D]`` pre-RoPE queries (float16 / bfloat16 / float32).
        k_cache, v_cache: ``[B, Hkv, T, D]`` post-RoPE keys and values.
        state: the layer's rings (``ring_q`` in the queries' dtype, rows float32).
        positions: ``[B]`` int64, must equal ``state.next_pos``.
        config: the MAC configuration (``row_update`` ``"split"`` or ``"subtract"``).
        q_post: ``[B, Hq, D]`` post-RoPE queries; by default RoPE of ``q_pre``.

    Returns:
        ``(out [B, Hq, D] in q_pre's dtype, lse [B, Hq] float32, StepStats)``.
    """
    check_step_inputs(q_pre, k_cache, v_cache, state, positions, config, q_post)
    check_kernel_dtype("q_pre", q_pre)
    if state.ring_q.dtype != q_pre.dtype:
        raise TypeError(f"state.ring_q must have q_pre's dtype {q_pre.dtype}, got {state.ring_q.dtype}")
    if state.ring_o.dtype != torch.float32 or state.ring_lse.dtype != torch.float32:
        raise TypeError(
            f"state.ring_o and state.ring_lse must be float32 for mac_triton, got {state.ring_o.dtype} and {state.ring_lse.dtype}"
        )
    positions = positions.to(torch.int64)
    scale = config.softmax_scale(q_pre.shape[-1])
    if q_post is None:
        q_post = apply_rope(q_pre, positions[:, None], config.rope_base)
    check_attention_inputs(q_post, k_cache, v_cache)

    res = mac_step(q_pre, q_post, k_cache, v_cache, state, positions, config, scale)
    state.next_pos = positions + 1
    stats = StepStats(
        hit=res["hit"],
        matched_pos=res["matched_pos"],
        distance=res["distance"],
        keys_read=res["keys_read"],
        context=positions + 1,
        ill_conditioned=res["ill_conditioned"],
        chain_depth=res["chain_depth"],
    )
    return res["out"], res["lse"], stats


def full_decode(q_post, k_cache, v_cache, positions, scale: float | None = None):
    """Full-attention decode over keys ``[0, t+1)`` with the same kernels (every head a miss).

    The baseline MAC-Attention is measured against, and the path a miss takes.

    Args:
        q_post: ``[B, Hq, D]`` post-RoPE queries.
        k_cache, v_cache: ``[B, Hkv, T, D]``.
        positions: ``[B]`` int32/int64 positions ``t`` (``t < T``).
        scale: softmax scale, ``1/sqrt(D)`` by default.

    Returns:
        ``(out [B, Hq, D] in q_post's dtype, lse [B, Hq] float32)``.
    """
    check_attention_inputs(q_post, k_cache, v_cache)
    B, Hq, D = q_post.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[0] != B or k_cache.shape[-1] != D:
        raise ValueError(f"k_cache and v_cache must be [B={B}, Hkv, T, D={D}], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if Hq % k_cache.shape[1] != 0:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the KV heads ({k_cache.shape[1]})")
    if positions.shape != (B,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be a [B={B}] int32/int64 tensor, got {tuple(positions.shape)} {positions.dtype}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    res = attend_spans(
        q_post, k_cache, v_cache, positions, source=SOURCE_NONE, band=FULL_BAND, out_dtype=q_post.dtype, scale=scale
    )
    return res["out"], res["lse"]
