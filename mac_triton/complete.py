r"""Amend + Complete in Triton: one split-KV decode-attention pass per step.

Twin of :func:`mac_ref.complete.amend_complete` (same signature, returns ``(out, C)``):

.. math::
    C = R_{j^*} \oplus A(q_t, [P, N)) \;\text{(hit)}, \qquad C = A(q_t, [S, N)) \;\text{(miss)}, \qquad
    \text{out} = A(q_t, [0, S)) \oplus C \oplus A(q_t, [N, t+1)).

Two kernels, no host synchronisation and no planning launch (so a step can be captured
in a CUDA graph and costs few launches):

1. **plan** (a ``@triton.jit`` helper that every program evaluates identically from the
   positions and the match keys): per GQA group ``(b, h_kv)`` the union of its heads'
   spans, ``[0, S)`` sinks, ``[min_h P_h, N)`` band, ``[N, t+1)`` tail. The segments of
   the whole batch are laid end to end, each weighing its keys plus a fixed ``unit_cost``
   (a unit's latency: loads of the plan, the query and the first tile, the partial
   state's store, in key-equivalents), and the concatenation is split evenly over the
   programs (stream-K style): program ``p`` takes ``[p·chunk, (p+1)·chunk)`` of it, and
   each piece of a segment's keys it takes is a *unit* with its own partial state. Work
   is therefore split by span length: a long miss span is shared by many programs, a
   hit's short band is one piece of one program, whatever the longest head is; and a
   program that gets many short hit segments gets fewer keys (without the fixed cost, the
   programs holding the hits of a 95 % step at batch 16 took 1.8× longer than those
   holding the misses: ``benchmarks/RESULTS.md``).
2. **attend** (one program per SM): each unit loads its keys and values once for all
   ``g`` query heads of the group (one ``tl.dot`` of ``[g, D] × [D, BLOCK_N]``) and keeps
   a flash-decoding partial state per head; band units mask keys below each head's own
   band start. Partial states go to a workspace.
3. **reduce** (one program per query head): ⊕ of the head's band units into ``C`` (with
   the cached row ``R_{j*}`` on a hit), ⊕ of its sink and tail units into ``out``, and,
   in the decode step, the match report (hit, ``j*``, distance, keys read) and the ring
   write of ``(q̃_t, R_t)`` (``split``: ``R_t = C``; ``subtract``: ``R_t = out ⊖ (sinks ⊕
   tail)``).

Precision: scores and the online softmax in float32 (base-2 exponentials inside the
attend kernel, natural-log LSEs everywhere outside it); bf16/fp16 operands feed the
tensor cores with float32 accumulation, the probabilities are rounded to the value dtype
before ``p·V`` (as in FlashAttention); float32 inputs (and everything under the
interpreter) use IEEE float32 dots.

Launch parameters (:func:`launch_for`): with many GQA groups (batch 16) tiles of 128
keys, at least 128 keys per program, one 8-warp program per SM, 16 partial states per
reduce iteration; with few groups (batch 1: a group's keys are spread over many programs,
whose latency then dominates) tiles of 64 keys, at least 64 keys per program, two 4-warp
programs per SM, 64 partial states per reduce iteration. Tiles are capped at 32 KB (64
keys for float32 heads of 128).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mac_ref.amend import Spans
from mac_ref.match import MatchResult
from mac_ref.state import LayerState
from mac_ref.summary import Summary, removal_epsilon

from ._common import (
    check_kernel_dtype,
    merge_weights,
    num_sms,
    online_finish,
    online_merge,
    remove_weights,
    upcast_dots,
)
from .match import _NO_CANDIDATE, decode_key


@dataclass(frozen=True)
class Launch:
    """Launch parameters of the attend and reduce kernels."""

    block_n: int  # keys per tile (fewer where a tile would pass 32 KB)
    min_chunk: int  # fewest keys per program
    unit_cost: int  # a unit's fixed cost in keys when the work is split (see _plan)
    programs_per_sm: int
    warps: int
    stages: int
    reduce_units: int  # partial states the reduce kernel merges per iteration


# the best of benchmarks/tune_decode.py on an H200 (Hq 32, Hkv 8, D 128, bf16; full decodes
# and all-hit MAC steps at batch 1 and 16, contexts 8K and 128K); see benchmarks/RESULTS.md
# (a group's miss span is split into hundreds of units at batch 1, a handful at batch 16)
WIDE = Launch(block_n=128, min_chunk=128, unit_cost=512, programs_per_sm=1, warps=8, stages=3, reduce_units=16)
NARROW = Launch(block_n=64, min_chunk=64, unit_cost=256, programs_per_sm=2, warps=4, stages=3, reduce_units=64)
NARROW_MAX_GROUPS = 32  # GQA groups (B·Hkv) up to which NARROW is used (measured: 4 and 8 vs 64 and 128)


def launch_for(groups: int) -> Launch:
    """The launch parameters for a step of ``groups = B·Hkv`` GQA groups."""
    return NARROW if groups <= NARROW_MAX_GROUPS else WIDE


PLAN_FIELDS = 6  # per group, as the reduce kernel reads it: first unit, sink units, band units, units, S, t + 1
_PLAN_FIELDS = tl.constexpr(PLAN_FIELDS)
LOG2E = 1.4426950408889634

# where the plan takes each head's band start from
SOURCE_SPANS = 0  # a Spans tuple (mac_ref.amend.step_spans)
SOURCE_KEYS = 1  # the match keys: the fused decode step
SOURCE_NONE = 2  # no band: full attention


@triton.jit
def _request_bounds(b, mask, pos_ptr, span_sink_ptr, span_band_end_ptr, span_tail_end_ptr, stride_sb, band, sinks, SOURCE: tl.constexpr):
    """``(S, N, t + 1)`` of requests ``b``: sinks end, band end ``E(t)``, tail end (int64)."""
    if SOURCE == 0:
        sink_end = tl.load(span_sink_ptr + b * stride_sb, mask=mask, other=0).to(tl.int64)
        band_end = tl.load(span_band_end_ptr + b * stride_sb, mask=mask, other=0).to(tl.int64)
        tail_end = tl.load(span_tail_end_ptr + b * stride_sb, mask=mask, other=0).to(tl.int64)
    else:
        tail_end = tl.load(pos_ptr + b, mask=mask, other=0).to(tl.int64) + 1
        band_end = tl.maximum(tail_end - band, 0)  # N = E(t) = max(t + 1 − r, 0)
        sink_end = tl.minimum(band_end, sinks)  # S = min(F, N)
    return sink_end, band_end, tail_end


@triton.jit
def _band_starts(
    b, h, mask, sink_end, tail_end, key_ptr, radius_ptr, span_start_ptr, stride_sb, stride_sh,
    Hq, band, min_context, SOURCE: tl.constexpr,
):
    """Each head's band start: ``max(E(j*), S)`` on a hit, ``S`` on a miss (int64)."""
    if SOURCE == 0:
        start = tl.load(span_start_ptr + b * stride_sb + h * stride_sh, mask=mask, other=0).to(tl.int64)
    elif SOURCE == 1:
        key = tl.load(key_ptr + b * Hq + h, mask=mask, other=_NO_CANDIDATE)
        radius_sq = tl.load(radius_ptr + h, mask=mask, other=0.0)
        hit, matched, dist = decode_key(key, tail_end - 1, min_context, radius_sq)
        start = tl.where(hit, tl.maximum(tl.maximum(matched + 1 - band, 0), sink_end), sink_end)
    else:
        start = sink_end + tl.zeros(h.shape, tl.int64)
    return start


@triton.jit
def _plan(
    pos_ptr, key_ptr, radius_ptr, span_start_ptr, span_sink_ptr, span_band_end_ptr, span_tail_end_ptr, stride_sb, stride_sh,
    NG, Hkv, G, band, sinks, min_context, n_split,
    SOURCE: tl.constexpr, NG_BLOCK: tl.constexpr, G_BLOCK: tl.constexpr, MIN_CHUNK: tl.constexpr,
    UNIT_COST: tl.constexpr,
):
    """The step's work plan, computed identically by every program (no plan launch).

    Per GQA group ``(b, h_kv)``: sinks ``[0, S)``, band ``[lo, N)`` with ``lo`` the
    smallest band start of its heads, tail ``[N, t+1)``. The segments of all groups are
    laid end to end, each costing ``UNIT_COST`` (a unit's fixed latency, in keys) plus its
    keys, and program ``p`` of ``n_split`` takes the cost range ``[p·chunk, (p+1)·chunk)``
    of that concatenation (stream-K style: every program gets the same cost, whatever the
    spans' lengths; many short hit segments weigh more than their keys). Each piece of a
    segment's keys that a program takes is one *unit* with its own partial state. Returns
    ``[NG_BLOCK]`` vectors (first unit, sink units, band units, units, S, lo, N, t+1,
    offset in the concatenation), ``chunk`` and the total cost.
    """
    groups = tl.arange(0, NG_BLOCK)
    valid = groups < NG
    b = groups // Hkv
    sink_end, band_end, tail_end = _request_bounds(
        b, valid, pos_ptr, span_sink_ptr, span_band_end_ptr, span_tail_end_ptr, stride_sb, band, sinks, SOURCE
    )
    lanes = tl.arange(0, G_BLOCK)[None, :]
    mask = valid[:, None] & (lanes < G)
    h = (groups % Hkv)[:, None] * G + lanes
    start = _band_starts(
        b[:, None], h, mask, sink_end[:, None], tail_end[:, None], key_ptr, radius_ptr, span_start_ptr,
        stride_sb, stride_sh, Hkv * G, band, min_context, SOURCE,
    )  # [NG, G]
    band_lo = tl.min(tl.where(mask, start, 2**62), axis=1)  # the union of the group's bands
    sink_len = tl.where(valid, sink_end, 0)
    band_len = tl.where(valid, band_end - band_lo, 0)
    tail_len = tl.where(valid, tail_end - band_end, 0)
    group_cost = _cost(sink_len, UNIT_COST) + _cost(band_len, UNIT_COST) + _cost(tail_len, UNIT_COST)
    offset = tl.cumsum(group_cost, axis=0) - group_cost  # where each group starts in the concatenation
    total = tl.sum(group_cost, axis=0)
    chunk = tl.maximum(tl.cdiv(total, n_split), MIN_CHUNK)  # cost per program
    band_at = offset + _cost(sink_len, UNIT_COST)
    tail_at = band_at + _cost(band_len, UNIT_COST)
    n_sink = _pieces(_keys_at(offset, sink_len, UNIT_COST), sink_len, chunk)
    n_band = _pieces(_keys_at(band_at, band_len, UNIT_COST), band_len, chunk)
    n_units = n_sink + n_band + _pieces(_keys_at(tail_at, tail_len, UNIT_COST), tail_len, chunk)
    first = tl.cumsum(n_units, axis=0) - n_units
    offset = tl.where(valid, offset, 2**60)  # no program maps to a padding group
    return first, n_sink, n_band, n_units, sink_end, band_lo, band_end, tail_end, offset, chunk, total


@triton.jit
def _cost(length, UNIT_COST: tl.constexpr):
    """Cost of a segment of ``length`` keys in the concatenation (an empty one costs nothing)."""
    return tl.where(length > 0, length + UNIT_COST, 0)


@triton.jit
def _keys_at(at, length, UNIT_COST: tl.constexpr):
    """Where the keys of a segment placed at ``at`` start: after its fixed cost."""
    return at + tl.where(length > 0, UNIT_COST, 0)


@triton.jit
def _pieces(start, length, chunk):
    """Units of a segment at ``[start, start + length)`` of the concatenation: the number of
    program ranges ``[p·chunk, (p+1)·chunk)`` it meets."""
    return tl.where(length > 0, (start + length - 1) // chunk - start // chunk + 1, 0)


@triton.jit
def _pick(values, groups, grp):
    """``values[grp]`` of a register vector."""
    return tl.sum(tl.where(groups == grp, values, 0), axis=0)


@triton.jit
def _attend_kernel(
    q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, plan_ptr,
    pos_ptr, key_ptr, radius_ptr, span_start_ptr, span_sink_ptr, span_band_end_ptr, span_tail_end_ptr, stride_sb, stride_sh,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    NG, Hkv, G, band, sinks, min_context, n_split, scale_log2,
    SOURCE: tl.constexpr, NG_BLOCK: tl.constexpr, G_BLOCK: tl.constexpr, MIN_CHUNK: tl.constexpr,
    UNIT_COST: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    first, n_sink, n_band, n_units, sink_end, band_lo, band_end, tail_end, offset, chunk, total = _plan(
        pos_ptr, key_ptr, radius_ptr, span_start_ptr, span_sink_ptr, span_band_end_ptr, span_tail_end_ptr, stride_sb, stride_sh,
        NG, Hkv, G, band, sinks, min_context, n_split, SOURCE, NG_BLOCK, G_BLOCK, MIN_CHUNK, UNIT_COST,
    )
    groups = tl.arange(0, NG_BLOCK)
    lanes = tl.arange(0, G_PAD)
    lane_mask = lanes < G
    Hq = Hkv * G
    pid = tl.program_id(0)
    if pid == 0:  # the reduce kernel reads the plan: the match keys are reset before it ends
        row = plan_ptr + groups * _PLAN_FIELDS
        in_plan = groups < NG
        tl.store(row + 0, first, mask=in_plan)
        tl.store(row + 1, n_sink, mask=in_plan)
        tl.store(row + 2, n_band, mask=in_plan)
        tl.store(row + 3, n_units, mask=in_plan)
        tl.store(row + 4, sink_end, mask=in_plan)
        tl.store(row + 5, tail_end, mask=in_plan)
    range_lo = pid * chunk  # this program's share [range_lo, range_hi) of the concatenation
    range_hi = tl.minimum(range_lo + chunk, total)
    grp = tl.sum((offset <= range_lo).to(tl.int32), axis=0) - 1  # the group holding range_lo
    grp_start = _pick(offset, groups, grp)
    while (grp < NG) & (grp_start < range_hi):
        g_first = _pick(first, groups, grp)
        g_sink_end = _pick(sink_end, groups, grp)
        g_band_lo = _pick(band_lo, groups, grp)
        g_band_end = _pick(band_end, groups, grp)
        g_tail_end = _pick(tail_end, groups, grp)
        b = grp // Hkv
        kvh = grp % Hkv
        heads = kvh * G + lanes  # [G_PAD] query heads of the group
        # each head's own band start (band units mask the keys before it)
        head_start = _band_starts(
            b, heads, lane_mask, g_sink_end, g_tail_end, key_ptr, radius_ptr, span_start_ptr,
            stride_sb, stride_sh, Hq, band, min_context, SOURCE,
        )
        seg_offset = grp_start
        units_before = g_first
        for seg in tl.static_range(3):  # sinks, band, tail
            if seg == 0:
                seg_lo, seg_hi = 0, g_sink_end
            elif seg == 1:
                seg_lo, seg_hi = g_band_lo, g_band_end
            else:
                seg_lo, seg_hi = g_band_end, g_tail_end
            seg_len = seg_hi - seg_lo
            keys_at = _keys_at(seg_offset, seg_len, UNIT_COST)  # the segment's keys in the concatenation
            piece_lo = tl.maximum(keys_at, range_lo)
            piece_hi = tl.minimum(keys_at + seg_len, range_hi)
            if piece_lo < piece_hi:
                unit = units_before + pid - keys_at // chunk
                lo = (seg_lo + piece_lo - keys_at).to(tl.int32)
                hi = (seg_lo + piece_hi - keys_at).to(tl.int32)
                if seg == 1:
                    head_lo = tl.maximum(head_start, lo).to(tl.int32)
                else:
                    head_lo = lo + tl.zeros([G_PAD], tl.int32)
                _attend_unit(
                    q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, b, kvh, heads, lane_mask, head_lo, lo, hi, unit, G,
                    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, scale_log2,
                    D, BLOCK_D, G_PAD, BLOCK_N, UPCAST,
                )
            units_before += _pieces(keys_at, seg_len, chunk)
            seg_offset += _cost(seg_len, UNIT_COST)
        grp += 1
        grp_start = seg_offset


@triton.jit
def _attend_unit(
    q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, b, kvh, heads, lane_mask, head_lo, lo, hi, unit, G,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, scale_log2,
    D: tl.constexpr, BLOCK_D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    """Flash-decoding partial states of the group's heads over keys ``[lo, hi)`` (head ``i``
    from ``head_lo[i]``), stored as unit ``unit``: K/V tiles loaded once for all heads."""
    lanes = tl.arange(0, G_PAD)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + cols[None, :],
        mask=lane_mask[:, None] & col_mask[None, :], other=0.0,
    )  # [G_PAD, D]
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kvh * stride_vh
    m = tl.full([G_PAD], float("-inf"), tl.float32)  # running max, base 2
    den = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_mask = keys < hi
        kv_offs = keys[:, None].to(tl.int64)
        k = tl.load(k_base + kv_offs * stride_kt + cols[None, :], mask=key_mask[:, None] & col_mask[None, :], other=0.0)
        v = tl.load(v_base + kv_offs * stride_vt + cols[None, :], mask=key_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2  # [G_PAD, BLOCK_N] base-2 scores
        valid = key_mask[None, :] & (keys[None, :] >= head_lo[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        den = den * alpha + tl.sum(p, axis=1)
        if UPCAST:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    inv = tl.where(den > 0, 1.0 / den, 0.0)
    lse = (m_safe + tl.log2(den)) * 0.6931471805599453  # natural log; −inf when no key was valid
    part = (unit * G + lanes).to(tl.int64)
    tl.store(part_lse_ptr + part, lse, mask=lane_mask)
    tl.store(part_o_ptr + part[:, None] * D + cols[None, :], acc * inv[:, None], mask=lane_mask[:, None] & col_mask[None, :])


@triton.jit
def _reduce_kernel(
    part_o_ptr, part_lse_ptr, plan_ptr, key_ptr, radius_ptr,
    hit_ptr, matched_ptr, dist_ptr, keys_read_ptr,
    ring_q_ptr, ring_o_ptr, ring_lse_ptr, ring_depth_ptr, depth_out_ptr, q_pre_ptr, out_ptr, lse_ptr, c_o_ptr, c_lse_ptr, ill_ptr,
    stride_rqb, stride_rqh, stride_rqw, stride_rob, stride_roh, stride_row, stride_rlb, stride_rlh, stride_rdb, stride_rdh,
    stride_qb, stride_qh, stride_mb, stride_mh,
    Hkv, G, band, min_context, W, eps,
    SOURCE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_U: tl.constexpr, ROW_OUT: tl.constexpr,
    SUBTRACT: tl.constexpr,
):
    """One query head: ⊕ of its units (where: the plan the attend kernel stored), the cached
    row, the outputs; ROW_OUT: 0 no row,
    1 row to ``c_o``/``c_lse``, 2 row, ``q̃_t`` and the row's chain depth into the ring. With
    SOURCE == 1 it also reports the match (hit, j*, distance, keys read) and resets the
    head's match key."""
    Hq = Hkv * G
    bh = tl.program_id(0)
    b = bh // Hq
    h = bh % Hq
    lane = h % G
    row = plan_ptr + (b * Hkv + h // G) * _PLAN_FIELDS  # the group's plan, stored by the attend kernel
    g_first = tl.load(row + 0)
    g_sink = tl.load(row + 1)
    g_band = tl.load(row + 2)
    g_units = tl.load(row + 3)
    g_sink_end = tl.load(row + 4)
    t = tl.load(row + 5) - 1
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D

    m_band = tl.full((), float("-inf"), tl.float32)
    den_band = tl.zeros((), tl.float32)
    acc_band = tl.zeros([BLOCK_D], tl.float32)
    m_rest = tl.full((), float("-inf"), tl.float32)
    den_rest = tl.zeros((), tl.float32)
    acc_rest = tl.zeros([BLOCK_D], tl.float32)
    for u0 in range(0, g_units, BLOCK_U):
        local = u0 + tl.arange(0, BLOCK_U)
        unit_mask = local < g_units
        part = (g_first + local).to(tl.int64) * G + lane
        lse = tl.load(part_lse_ptr + part, mask=unit_mask, other=float("-inf"))
        o = tl.load(part_o_ptr + part[:, None] * D + cols[None, :], mask=unit_mask[:, None] & col_mask[None, :], other=0.0)
        in_band = (local >= g_sink) & (local < g_sink + g_band)
        m_band, den_band, acc_band = online_merge(m_band, den_band, acc_band, tl.where(in_band, lse, float("-inf")), o)
        m_rest, den_rest, acc_rest = online_merge(m_rest, den_rest, acc_rest, tl.where(in_band, float("-inf"), lse), o)
    c_o, c_lse = online_finish(m_band, den_band, acc_band)  # the band
    rest_o, rest_lse = online_finish(m_rest, den_rest, acc_rest)  # sinks ⊕ tail

    if SOURCE != 2:  # C = R_{j*} ⊕ band on a hit
        if SOURCE == 1:
            key = tl.load(key_ptr + bh)
            hit, matched, dist = decode_key(key, t, min_context, tl.load(radius_ptr + h))
            start = tl.where(hit, tl.maximum(tl.maximum(matched + 1 - band, 0), g_sink_end), g_sink_end)
            tl.store(hit_ptr + bh, hit.to(tl.int8))
            tl.store(matched_ptr + bh, matched)
            tl.store(dist_ptr + bh, dist)
            tl.store(keys_read_ptr + bh, g_sink_end + (t + 1 - start))
            tl.store(key_ptr + bh, _NO_CANDIDATE)  # the key workspace is left clean for the next step
        else:
            hit = tl.load(hit_ptr + b * stride_mb + h * stride_mh) != 0
            matched = tl.load(matched_ptr + b * stride_mb + h * stride_mh).to(tl.int64)
        slot = ((matched % W) + W) % W
        reused_lse = tl.load(ring_lse_ptr + b * stride_rlb + h * stride_rlh + slot)
        reused_o = tl.load(ring_o_ptr + b.to(tl.int64) * stride_rob + h * stride_roh + slot * stride_row + cols, mask=col_mask, other=0.0)
        reused_lse = tl.where(hit, reused_lse, float("-inf"))
        reused_o = tl.where(hit, reused_o, 0.0)
        if ROW_OUT == 2:  # the new row's chain depth: one link more than the reused row's, 0 after a miss
            depth = tl.where(hit, tl.load(ring_depth_ptr + b * stride_rdb + h * stride_rdh + slot) + 1, 0)
        w_r, w_c, c_lse = merge_weights(reused_lse, c_lse)
        c_o = w_r * reused_o + w_c * c_o

    w_c, w_rest, out_lse = merge_weights(c_lse, rest_lse)
    out_o = w_c * c_o + w_rest * rest_o
    tl.store(out_ptr + bh.to(tl.int64) * D + cols, out_o, mask=col_mask)
    tl.store(lse_ptr + bh, out_lse)

    if ROW_OUT != 0:
        if SUBTRACT:  # R_t = out ⊖ (sinks ⊕ tail)
            c_out, c_rest, row_lse, ill = remove_weights(out_lse, rest_lse, eps)
            row_o = c_out * out_o - c_rest * rest_o
            tl.store(ill_ptr + bh, ill.to(tl.int8))
        else:  # R_t = C, never ill-conditioned
            row_o = c_o
            row_lse = c_lse
            tl.store(ill_ptr + bh, tl.zeros((), tl.int8))
        if ROW_OUT == 1:
            tl.store(c_o_ptr + bh.to(tl.int64) * D + cols, row_o, mask=col_mask)
            tl.store(c_lse_ptr + bh, row_lse)
        else:
            slot = t % W
            q_pre = tl.load(q_pre_ptr + b * stride_qb + h * stride_qh + cols, mask=col_mask)
            tl.store(ring_q_ptr + b.to(tl.int64) * stride_rqb + h * stride_rqh + slot * stride_rqw + cols, q_pre, mask=col_mask)
            tl.store(ring_o_ptr + b.to(tl.int64) * stride_rob + h * stride_roh + slot * stride_row + cols, row_o, mask=col_mask)
            tl.store(ring_lse_ptr + b * stride_rlb + h * stride_rlh + slot, row_lse)
            tl.store(ring_depth_ptr + b * stride_rdb + h * stride_rdh + slot, depth)
            tl.store(depth_out_ptr + bh, depth.to(tl.int64))


def attend_spans(
    q_post, k_cache, v_cache, positions, *, source, band=0, sinks=0, spans: Spans | None = None,
    keys=None, min_context=0, radius_sq=None, state: LayerState | None = None, result: MatchResult | None = None,
    q_pre=None, out_dtype=torch.float32, row_out=0, subtract=False, scale=None,
):
    """Launch attend → reduce for one step (no validation, no host sync).

    ``source`` picks where the band starts come from (:data:`SOURCE_SPANS` with ``spans``
    and ``result``, :data:`SOURCE_KEYS` with the match ``keys`` and the ``[Hq]`` squared
    radii ``radius_sq``, :data:`SOURCE_NONE`: full attention). ``row_out``: 0 no row,
    1 return ``C`` (or the subtract row), 2 write ``(q̃_t, R_t)`` into ``state``'s rings.

    Returns:
        dict with ``out [B, Hq, D]`` (``out_dtype``), ``lse [B, Hq]`` float32 and, as they
        apply, ``row_o``, ``row_lse``, ``hit``, ``matched_pos``, ``distance``,
        ``keys_read``, ``ill_conditioned``, ``chain_depth``.
    """
    B, Hq, D = q_post.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    NG = B * Hkv
    device = q_post.device
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    launch = launch_for(NG)
    n_split = num_sms(device) * launch.programs_per_sm
    max_units = n_split + 3 * NG  # each segment adds at most one piece to the programs' ranges
    # tiles of at most 32 KB (float32 K/V or wide heads get fewer keys per tile)
    block_n = max(16, min(launch.block_n, 32768 // (triton.next_power_of_2(D) * k_cache.element_size())))
    i64, f32 = torch.int64, torch.float32

    out = torch.empty(B, Hq, D, dtype=out_dtype, device=device)
    lse = torch.empty(B, Hq, dtype=f32, device=device)
    part_o = torch.empty(max_units, G, D, dtype=f32, device=device)
    part_lse = torch.empty(max_units, G, dtype=f32, device=device)
    plan = torch.empty(NG, PLAN_FIELDS, dtype=i64, device=device)
    unused = lse  # stands for the pointers a mode does not read
    res = {"out": out, "lse": lse}
    if source == SOURCE_SPANS:
        span_tensors = (spans.band_start, spans.sink_end, spans.band_end, spans.tail_end)
        if len({s.stride() for s in span_tensors}) != 1:
            span_tensors = tuple(s.contiguous() for s in span_tensors)
        stride_sb, stride_sh = span_tensors[0].stride()
        hit_buf, matched_buf = result.hit.view(torch.int8), result.matched_pos
        if hit_buf.stride() != matched_buf.stride():
            hit_buf, matched_buf = hit_buf.contiguous(), matched_buf.contiguous()
        dist_buf = keys_read_buf = unused
    else:
        span_tensors, (stride_sb, stride_sh) = (unused,) * 4, (0, 0)
        if source == SOURCE_KEYS:
            hit_buf = torch.empty(B, Hq, dtype=torch.int8, device=device)
            matched_buf = torch.empty(B, Hq, dtype=i64, device=device)
            dist_buf = torch.empty(B, Hq, dtype=f32, device=device)
            keys_read_buf = torch.empty(B, Hq, dtype=i64, device=device)
            res.update(hit=hit_buf.view(torch.bool), matched_pos=matched_buf, distance=dist_buf, keys_read=keys_read_buf)
        else:
            hit_buf = matched_buf = dist_buf = keys_read_buf = unused
    plan_args = (
        positions, keys if keys is not None else unused, radius_sq if radius_sq is not None else unused,
        *span_tensors, stride_sb, stride_sh,
    )
    plan_meta = dict(
        SOURCE=source, NG_BLOCK=triton.next_power_of_2(NG), G_BLOCK=triton.next_power_of_2(G), MIN_CHUNK=launch.min_chunk,
        UNIT_COST=launch.unit_cost,
    )
    _attend_kernel[(n_split,)](
        q_post, k_cache, v_cache, part_o, part_lse, plan, *plan_args,
        q_post.stride(0), q_post.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        NG, Hkv, G, band, sinks, min_context, n_split, scale * LOG2E,
        D=D, BLOCK_D=triton.next_power_of_2(D), G_PAD=max(16, triton.next_power_of_2(G)), BLOCK_N=block_n,
        UPCAST=upcast_dots(k_cache.dtype), num_warps=launch.warps, num_stages=launch.stages, **plan_meta,
    )

    if source != SOURCE_NONE:
        ring_q, ring_o, ring_lse, ring_depth = state.ring_q, state.ring_o, state.ring_lse, state.ring_depth
        W = state.window
        if row_out == 2 and (ring_q.stride(-1) != 1 or ring_o.stride(-1) != 1 or ring_depth.stride(-1) != 1):
            raise ValueError("state rings must be contiguous in their last dimension")
    else:
        ring_q, ring_o, ring_lse = out.view(B, Hq, 1, D), out.view(B, Hq, 1, D), lse.view(B, Hq, 1)  # unused
        ring_depth = lse.view(B, Hq, 1)
        W = 1
    row_o = torch.empty(B, Hq, D, dtype=f32, device=device) if row_out == 1 else out
    row_lse = torch.empty(B, Hq, dtype=f32, device=device) if row_out == 1 else lse
    ill = torch.empty(B, Hq, dtype=torch.int8, device=device) if row_out != 0 else lse  # written with the row
    if row_out == 1:
        res.update(row_o=row_o, row_lse=row_lse)
    if row_out != 0:
        res["ill_conditioned"] = ill.view(torch.bool)
    depth_out = torch.empty(B, Hq, dtype=i64, device=device) if row_out == 2 else lse  # written with the ring row
    if row_out == 2:
        res["chain_depth"] = depth_out
    q_ring_src = q_pre if q_pre is not None else q_post
    _reduce_kernel[(B * Hq,)](
        part_o, part_lse, plan, plan_args[1], plan_args[2],
        hit_buf, matched_buf, dist_buf, keys_read_buf,
        ring_q, ring_o, ring_lse, ring_depth, depth_out, q_ring_src, out, lse, row_o, row_lse, ill,
        *ring_q.stride()[:3], *ring_o.stride()[:3], *ring_lse.stride()[:2], *ring_depth.stride()[:2],
        q_ring_src.stride(0), q_ring_src.stride(1), hit_buf.stride(0) if hit_buf.dim() == 2 else 0,
        hit_buf.stride(1) if hit_buf.dim() == 2 else 0,
        Hkv, G, band, min_context, W, removal_epsilon(torch.float32),
        SOURCE=source, D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_U=launch.reduce_units, ROW_OUT=row_out, SUBTRACT=subtract,
        num_warps=4,
    )
    return res


def check_attention_inputs(q_post, k_cache, v_cache) -> None:
    """Kernel dtypes, one dtype for K and V, and ``D`` contiguous."""
    check_kernel_dtype("q_post", q_post)
    check_kernel_dtype("k_cache", k_cache)
    check_kernel_dtype("v_cache", v_cache)
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache and v_cache must share a dtype, got {k_cache.dtype} and {v_cache.dtype}")
    for name, x in (("q_post", q_post), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dimension")


def amend_complete(
    q_post, k_cache, v_cache, state: LayerState, result: MatchResult, spans: Spans, scale: float
) -> tuple[Summary, Summary]:
    """Amend then complete in one split-KV pass (see :func:`mac_ref.complete.amend_complete`).

    Args:
        q_post: ``[B, Hq, D]`` post-RoPE queries.
        k_cache, v_cache: ``[B, Hkv, T, D]``.
        state: the rings; the row of ``result.matched_pos`` is read on hits.
        result: the match outcome.
        spans: from :func:`mac_ref.amend.step_spans` (``sink_end``, ``band_end`` and
            ``tail_end`` are per request: equal over a request's heads).
        scale: softmax scale.

    Returns:
        ``(out, C)``: ``Summary(o [B, Hq, D], lse [B, Hq])`` each, float32; ``C`` is the
        ``split`` rule's new row.
    """
    check_attention_inputs(q_post, k_cache, v_cache)
    res = attend_spans(
        q_post, k_cache, v_cache, spans.tail_end, source=SOURCE_SPANS, spans=spans, state=state, result=result,
        out_dtype=torch.float32, row_out=1, scale=scale,
    )
    return Summary(res["out"], res["lse"]), Summary(res["row_o"], res["row_lse"])
