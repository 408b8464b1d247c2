r"""The attend kernel: flash-decoding partial states of every unit of the plan.

One program per SM (or two; :class:`~mac_triton.launch.Launch`). Each program walks its
share of the plan (:mod:`mac_triton.plan`); for each unit it loads the keys and values
once for all ``g`` query heads of the group (one ``tl.dot`` of ``[g, D] × [D, BLOCK_N]``)
and keeps a partial state per head; band units mask the keys below each head's own band
start. Partial states go to a workspace that :mod:`mac_triton.reduce` merges.

**A rule that verifies its candidates** (``verify``) decides from the LSE of the fresh
part, sinks, band and tail; a head that does not reuse (a rejected candidate, or a head
without one) then also needs its prefix ``[S, P)``. Such a step does not take the plan
above: its fresh parts are short (a band is at most the window's lag, the tail ``r`` keys)
and its long spans are prefixes, so each group's keys are streamed once, in two launches
that share nothing but their outputs (no program waits for another):

- the fresh kernel runs three programs per group, which read the group's sinks, band and
  tail, one unit each (a head without a candidate has an empty band: its start is ``N``; with
  ``per_group``, every head of a group where one has none); its band unit keeps a second
  partial state per head over the keys of the group's band below the head's own start
  (``[lo, P)``: read anyway for the group's other heads). Its programs are many and short,
  so they run side by side: in one program per SM walking the plan, a step whose groups
  mostly reuse left each SM waiting on one short unit's loads after another (on an H100
  at batch 64 its attend kernel streamed 17 % of the keys at about 1.3 TB/s,
  ``benchmarks/RESULTS.md``);
- the prefix kernel runs ``max_pieces`` programs per group; each decides the group from
  its stored units (:func:`mac_triton.decide.decide_group`: every program of a group
  takes the same decision, the first writes it) and, when some head does not reuse,
  reads its piece of ``[S, lo)``, the group's prefix split into up to ``max_pieces``
  pieces of at least ``4 · Launch.min_chunk`` keys. The reduce kernel merges it all.

Soft-capping (``MACConfig.softcap``, Gemma 2's) caps each score in base 2: with
``C₂ = log2(e)·c``, ``s₂ = C₂·tanh(log2(e)·scale·q·k / C₂) = log2(e)·c·tanh(scale·q·k / c)``,
the base-2 form of the capped score; a compile-time flag, so the uncapped kernel is unchanged.

Precision: scores and the online softmax in float32, base-2 exponentials inside the
kernel, natural-log LSEs in the partial states; bf16/fp16 operands feed the tensor cores
with float32 accumulation and the probabilities are rounded to the value dtype before
``p·V`` (as in FlashAttention); float32 inputs (and everything under the interpreter) use
IEEE float32 dots.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mac_core.kv import PagedKV

from mac_core.numerics import LOG2E
from mac_core.state import LayerState

from .decide import Verdicts, decide_group
from .launch import Launch, num_sms, upcast_dots
from .numerics import LN2, tanh
from .plan import (
    _PLAN_FIELDS, BAND_FROM_MATCH, BAND_FROM_SPANS, BAND_SOURCES, PLAN_BAND_START, PLAN_BAND_UNITS, PLAN_FIELDS, PLAN_FIRST,
    PLAN_PREFIX_FIRST, PLAN_PREFIX_UNITS, PLAN_SINK_END, PLAN_SINK_UNITS, PLAN_TAIL_END, PLAN_UNITS, all_lanes, band_start,
    group_heads, head_band_start, head_match, keys_at, pick, pieces, plan_field, plan_units, request_bounds, segment_cost,
)


class Partials(NamedTuple):
    """The attend kernel's output, the reduce kernel's input.

    Attributes:
        o: ``[units, G, D]`` float32 partial outputs (one per unit and head of its group).
        lse: ``[units, G]`` float32 partial LSEs.
        plan: ``[B·Hkv, PLAN_FIELDS]`` int64 per group (:mod:`mac_triton.plan`'s ``PLAN_*`` fields).
        below_o, below_lse: a verifying step's partial states of each band unit over the
            keys below each head's own band start (``None`` otherwise): what a head that does
            not reuse adds to its prefix units.
        verdicts: a verifying step's :class:`~mac_triton.decide.Verdicts` (``None`` otherwise).
    """

    o: torch.Tensor
    lse: torch.Tensor
    plan: torch.Tensor
    below_o: torch.Tensor | None = None
    below_lse: torch.Tensor | None = None
    verdicts: Verdicts | None = None


class Verify(NamedTuple):
    """What a verifying step's prefix kernel needs beyond the match.

    Attributes:
        rule: the rule's name (:mod:`mac_triton.accept`); ``per_group``: its group-aware variant.
        rule_radius_sq: ``[Hq]`` float32 squared radii of the rule (``2D(1 − τ_m)² s_h²``).
        state: the rings (the matched rows' LSEs).
    """

    rule: str
    per_group: bool
    rule_radius_sq: torch.Tensor
    state: LayerState


@triton.jit
def _attend_kernel(
    q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, plan_ptr,
    pos_ptr, key_ptr, radius_ptr, band_start_ptr, sink_end_ptr, band_end_ptr, tail_end_ptr, stride_sb, stride_sh,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    indptr_ptr, indices_ptr,
    NG, Hkv, G, band, sinks, min_context, n_split, scale_log2, cap_log2,
    BAND_SOURCE: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, NG_BLOCK: tl.constexpr, G_BLOCK: tl.constexpr, MIN_CHUNK: tl.constexpr,
    UNIT_COST: tl.constexpr, SOFTCAP: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    first, n_sink, n_band, n_units, sink_end, band_lo, band_end, tail_end, offset, chunk, total = plan_units(
        pos_ptr, key_ptr, radius_ptr, band_start_ptr, sink_end_ptr, band_end_ptr, tail_end_ptr, stride_sb, stride_sh,
        NG, Hkv, G, band, sinks, min_context, n_split, BAND_SOURCE, NG_BLOCK, G_BLOCK, MIN_CHUNK, UNIT_COST,
    )
    groups = tl.arange(0, NG_BLOCK)
    in_plan = groups < NG
    lanes = tl.arange(0, G_PAD)
    lane_mask = lanes < G
    Hq = Hkv * G
    pid = tl.program_id(0)
    if pid == 0:  # the reduce kernel reads the plan
        row = plan_ptr + groups * _PLAN_FIELDS
        tl.store(row + PLAN_FIRST, first, mask=in_plan)
        tl.store(row + PLAN_SINK_UNITS, n_sink, mask=in_plan)
        tl.store(row + PLAN_BAND_UNITS, n_band, mask=in_plan)
        tl.store(row + PLAN_UNITS, n_units, mask=in_plan)
        tl.store(row + PLAN_SINK_END, sink_end, mask=in_plan)
        tl.store(row + PLAN_BAND_START, band_lo, mask=in_plan)
        tl.store(row + PLAN_TAIL_END, tail_end, mask=in_plan)
        tl.store(row + PLAN_PREFIX_UNITS, tl.zeros([NG_BLOCK], tl.int64), mask=in_plan)
    range_lo = pid * chunk  # this program's share [range_lo, range_hi) of the concatenation
    range_hi = tl.minimum(range_lo + chunk, total)
    grp = tl.sum((offset <= range_lo).to(tl.int32), axis=0) - 1  # the group holding range_lo
    grp_start = pick(offset, groups, grp)
    while (grp < NG) & (grp_start < range_hi):
        g_first = pick(first, groups, grp)
        g_sink_end = pick(sink_end, groups, grp)
        g_band_lo = pick(band_lo, groups, grp)
        g_band_end = pick(band_end, groups, grp)
        g_tail_end = pick(tail_end, groups, grp)
        b = grp // Hkv
        kvh = grp % Hkv
        heads = kvh * G + lanes  # [G_PAD] query heads of the group
        # each head's own band start (band units mask the keys below it)
        head_start = head_band_start(
            b, heads, lane_mask, g_sink_end, g_tail_end, key_ptr, radius_ptr, band_start_ptr,
            stride_sb, stride_sh, Hq, band, min_context, BAND_SOURCE,
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
            seg_keys_at = keys_at(seg_offset, seg_len, UNIT_COST)  # the segment's keys in the concatenation
            piece_lo = tl.maximum(seg_keys_at, range_lo)
            piece_hi = tl.minimum(seg_keys_at + seg_len, range_hi)
            if piece_lo < piece_hi:
                unit = units_before + pid - seg_keys_at // chunk
                lo = (seg_lo + piece_lo - seg_keys_at).to(tl.int32)
                hi = (seg_lo + piece_hi - seg_keys_at).to(tl.int32)
                if seg == 1:  # the band: each head from its own start
                    head_lo = tl.maximum(head_start, lo).to(tl.int32)
                else:
                    head_lo = lo + tl.zeros([G_PAD], tl.int32)
                _attend_unit(
                    q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, None, None, b, kvh, heads, lane_mask,
                    head_lo, hi + tl.zeros([G_PAD], tl.int32), head_lo, lo, hi, unit, G,
                    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, scale_log2, cap_log2,
                    indptr_ptr, indices_ptr, PAGED, PAGE_SIZE, SOFTCAP, False, D, BLOCK_D, G_PAD, BLOCK_N, UPCAST,
                )
            units_before += pieces(seg_keys_at, seg_len, chunk)
            seg_offset += segment_cost(seg_len, UNIT_COST)
        grp += 1
        grp_start = seg_offset


@triton.jit
def _fresh_kernel(
    q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, below_o_ptr, below_lse_ptr, plan_ptr, pos_ptr, key_ptr, radius_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    indptr_ptr, indices_ptr, prefix_base, max_pieces, Hkv, G, band, sinks, min_context, scale_log2, cap_log2,
    PER_GROUP: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, SOFTCAP: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    grp = tl.program_id(0)
    b, kvh, Hq, _, lane_mask, heads = group_heads(grp, Hkv, G, G_PAD)
    sink_end, band_end, tail_end = request_bounds(b, grp >= 0, pos_ptr, None, None, None, 0, band, sinks, BAND_FROM_MATCH)
    candidate, matched, _ = head_match(b, heads, lane_mask, tail_end, key_ptr, radius_ptr, Hq, min_context)
    if PER_GROUP:  # a group with a head that has no candidate cannot reuse: every head of it misses
        candidate = candidate & all_lanes(candidate, lane_mask)
    # a candidate's band starts at max(E(j*), S); a head without one reads nothing here: its prefix [S, N) is the prefix kernel's
    start = tl.where(candidate, band_start(candidate, matched, band, sink_end), band_end)  # [G_PAD]
    band_lo = tl.min(tl.where(lane_mask, start, band_end), axis=0)  # the union of the group's bands (N when none)
    first = grp.to(tl.int64) * 3  # the group's units: sinks, band, tail
    seg = tl.program_id(1)  # which of them this program reads: the three side by side
    if seg == 0:
        row = plan_ptr + grp * _PLAN_FIELDS
        tl.store(row + PLAN_FIRST, first)
        tl.store(row + PLAN_SINK_UNITS, 1)
        tl.store(row + PLAN_BAND_UNITS, 1)
        tl.store(row + PLAN_UNITS, 3)
        tl.store(row + PLAN_SINK_END, sink_end)
        tl.store(row + PLAN_BAND_START, band_lo)
        tl.store(row + PLAN_TAIL_END, tail_end)
        tl.store(row + PLAN_PREFIX_FIRST, prefix_base + grp.to(tl.int64) * max_pieces)
    zeros = tl.zeros([G_PAD], tl.int32)
    S = sink_end.to(tl.int32)
    lo = band_lo.to(tl.int32)
    N = band_end.to(tl.int32)
    t1 = tail_end.to(tl.int32)
    if seg == 1:  # the band: each head from its own start, the keys below it kept apart
        head_lo = tl.maximum(start, lo).to(tl.int32)
        _attend_unit(
            q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, below_o_ptr, below_lse_ptr, b, kvh, heads, lane_mask,
            head_lo, N + zeros, head_lo, lo, N, first + 1, G,
            stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, scale_log2, cap_log2,
            indptr_ptr, indices_ptr, PAGED, PAGE_SIZE, SOFTCAP, True, D, BLOCK_D, G_PAD, BLOCK_N, UPCAST,
        )
    else:  # the sinks [0, S) or the tail [N, t + 1)
        seg_lo = tl.where(seg == 0, 0, N)
        seg_hi = tl.where(seg == 0, S, t1)
        _attend_unit(
            q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, None, None, b, kvh, heads, lane_mask,
            seg_lo + zeros, seg_hi + zeros, seg_lo + zeros, seg_lo, seg_hi, first + seg, G,
            stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, scale_log2, cap_log2,
            indptr_ptr, indices_ptr, PAGED, PAGE_SIZE, SOFTCAP, False, D, BLOCK_D, G_PAD, BLOCK_N, UPCAST,
        )


@triton.jit
def _prefix_kernel(
    q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, plan_ptr, key_ptr, radius_ptr, rule_radius_ptr, ring_lse_ptr,
    stride_rlb, stride_rlh, W, hit_ptr, candidate_ptr, share_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    indptr_ptr, indices_ptr, Hkv, G, min_context, min_piece, scale_log2, cap_log2,
    RULE: tl.constexpr, PER_GROUP: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, SOFTCAP: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, BLOCK_U: tl.constexpr,
):
    grp = tl.program_id(0)
    piece = tl.program_id(1)
    max_pieces = tl.num_programs(1)
    b, kvh, Hq, lanes, lane_mask, heads = group_heads(grp, Hkv, G, G_PAD)
    g_first = plan_field(plan_ptr, grp, PLAN_FIRST)
    sink_end = plan_field(plan_ptr, grp, PLAN_SINK_END)
    band_lo = plan_field(plan_ptr, grp, PLAN_BAND_START)
    # every program of the group takes the same decision from the same stored units; the first writes it
    rejected = decide_group(
        part_lse_ptr, g_first, plan_field(plan_ptr, grp, PLAN_UNITS), b, heads, lanes, lane_mask,
        plan_field(plan_ptr, grp, PLAN_TAIL_END) - 1, key_ptr, radius_ptr, rule_radius_ptr, ring_lse_ptr,
        stride_rlb, stride_rlh, hit_ptr, candidate_ptr, share_ptr, Hq, G, min_context, W, piece == 0, RULE, PER_GROUP, BLOCK_U,
    )
    # a rejected candidate's prefix [S, P): [lo, P) is in its band units' states below its start; [S, lo) is read here
    prefix_len = band_lo - sink_end
    n_pieces = tl.minimum(tl.cdiv(prefix_len, min_piece), max_pieces)
    n_pieces = tl.where((tl.max(rejected.to(tl.int32), axis=0) > 0) & (prefix_len > 0), n_pieces, 0)
    if piece == 0:
        tl.store(plan_ptr + grp * _PLAN_FIELDS + PLAN_PREFIX_UNITS, n_pieces.to(tl.int64))
    if piece < n_pieces:
        piece_len = tl.cdiv(prefix_len, n_pieces)
        lo = (sink_end + piece * piece_len).to(tl.int32)
        hi = tl.minimum(lo + piece_len, band_lo).to(tl.int32)
        hi_all = hi + tl.zeros([G_PAD], tl.int32)
        _attend_unit(
            q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, part_o_ptr, part_lse_ptr, b, kvh, heads, lane_mask,
            tl.where(rejected, lo, hi_all), hi_all, hi_all, lo, hi, plan_field(plan_ptr, grp, PLAN_PREFIX_FIRST) + piece, G,
            stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, scale_log2, cap_log2,
            indptr_ptr, indices_ptr, PAGED, PAGE_SIZE, SOFTCAP, False, D, BLOCK_D, G_PAD, BLOCK_N, UPCAST,
        )


@triton.jit
def _attend_unit(
    q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, below_o_ptr, below_lse_ptr, b, kvh, heads, lane_mask,
    head_lo, head_hi, below_hi, lo, hi, unit, G,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, scale_log2, cap_log2,
    indptr_ptr, indices_ptr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, SOFTCAP: tl.constexpr, BELOW: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    """Flash-decoding partial states of the group's heads over keys ``[lo, hi)`` (head ``i``
    only over ``[head_lo[i], head_hi[i])``), stored as unit ``unit``: K/V tiles loaded once
    for all heads. With ``BELOW``, a second state per head over ``[lo, below_hi[i])`` (the
    keys below its band start) goes to ``below_o`` / ``below_lse``; only the tiles up to the
    highest ``below_hi`` keep it (a second online softmax per tile made the tile about twice
    as slow on an H100: ``benchmarks/RESULTS.md``), the rest take the plain loop.

    Key ``t`` sits at ``page · stride_(k|v)b + slot · stride_(k|v)t``: a contiguous cache is
    one page per request (``page = b``, ``slot = t``); a paged one looks ``page`` up in the
    table (``indices[indptr[b] + t // PAGE_SIZE]``, ``slot = t % PAGE_SIZE``). The page size is
    a compile-time constant (a shift and a mask for powers of two, not integer divisions); for
    pages of several keys the next tile's page numbers are loaded before this tile's keys are
    used, so the dependent load (table, then keys) overlaps the tile's arithmetic.

    ``SOFTCAP`` caps the base-2 scores ``s₂`` at ``cap_log2 = log2(e)·c``:
    ``s₂ ← C₂·tanh(s₂ / C₂)``, which is ``log2(e)·c·tanh(scale·q·k / c)``."""
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + cols[None, :],
        mask=lane_mask[:, None] & col_mask[None, :], other=0.0,
    )  # [G_PAD, D]
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    table_row = 0
    next_page = tl.zeros([BLOCK_N], tl.int64)
    if PAGED:
        table_row = tl.load(indptr_ptr + b).to(tl.int64)  # request b's first entry in indices
        if PAGE_SIZE > 1:
            first_keys = lo + tl.arange(0, BLOCK_N)
            next_page = tl.load(indices_ptr + table_row + first_keys // PAGE_SIZE, mask=first_keys < hi, other=0).to(tl.int64)
    m = tl.full([G_PAD], float("-inf"), tl.float32)  # running max, base 2
    den = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    below_m = tl.full([G_PAD], float("-inf"), tl.float32)
    below_den = tl.zeros([G_PAD], tl.float32)
    below_acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    # the tiles that hold keys below some head's start keep the second state; the loop splits there, so
    # the tiles above (a miss's whole prefix, most of a band) cost what a tile without it costs
    split = lo
    if BELOW:
        split = tl.minimum(lo + tl.cdiv(tl.max(tl.where(lane_mask, below_hi, lo), axis=0) - lo, BLOCK_N) * BLOCK_N, hi)
        for n0 in range(lo, split, BLOCK_N):
            keys, key_mask, s, v, m, den, acc, next_page = _fold_tile(
                q, k_base, v_base, n0, hi, b, table_row, next_page, indices_ptr, cols, col_mask, head_lo, head_hi, m, den, acc,
                stride_kb, stride_kt, stride_vb, stride_vt, scale_log2, cap_log2, PAGED, PAGE_SIZE, SOFTCAP, BLOCK_N, UPCAST,
            )
            below = key_mask[None, :] & (keys[None, :] < below_hi[:, None])
            below_m, below_den, below_acc = _online_tile(below_m, below_den, below_acc, tl.where(below, s, float("-inf")), v, UPCAST)
    for n0 in range(split, hi, BLOCK_N):
        _, _, _, _, m, den, acc, next_page = _fold_tile(
            q, k_base, v_base, n0, hi, b, table_row, next_page, indices_ptr, cols, col_mask, head_lo, head_hi, m, den, acc,
            stride_kb, stride_kt, stride_vb, stride_vt, scale_log2, cap_log2, PAGED, PAGE_SIZE, SOFTCAP, BLOCK_N, UPCAST,
        )
    part = (unit * G + tl.arange(0, G_PAD)).to(tl.int64)
    _store_state(part_o_ptr, part_lse_ptr, part, m, den, acc, lane_mask, D, BLOCK_D)
    if BELOW:
        _store_state(below_o_ptr, below_lse_ptr, part, below_m, below_den, below_acc, lane_mask, D, BLOCK_D)


@triton.jit
def _fold_tile(
    q, k_base, v_base, n0, hi, b, table_row, next_page, indices_ptr, cols, col_mask, head_lo, head_hi, m, den, acc,
    stride_kb, stride_kt, stride_vb, stride_vt, scale_log2, cap_log2,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    """Load the tile at ``n0`` and fold it into each head's state over ``[head_lo, head_hi)``:
    ``(keys, key_mask, scores [G_PAD, BLOCK_N], V, m, den, acc, next_page)``."""
    keys, key_mask, k, v, next_page = _load_tile(
        k_base, v_base, n0, hi, b, table_row, next_page, indices_ptr, cols, col_mask, stride_kb, stride_kt, stride_vb, stride_vt,
        PAGED, PAGE_SIZE, BLOCK_N,
    )
    s, v = tile_scores(q, k, v, scale_log2, cap_log2, SOFTCAP, UPCAST)  # base-2 scores
    valid = key_mask[None, :] & (keys[None, :] >= head_lo[:, None]) & (keys[None, :] < head_hi[:, None])
    m, den, acc = _online_tile(m, den, acc, tl.where(valid, s, float("-inf")), v, UPCAST)
    return keys, key_mask, s, v, m, den, acc, next_page


@triton.jit
def _load_tile(
    k_base, v_base, n0, hi, b, table_row, next_page, indices_ptr, cols, col_mask, stride_kb, stride_kt, stride_vb, stride_vt,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The key tile at ``[n0, min(n0 + BLOCK_N, hi))``: ``(keys, key_mask, K, V, next_page)``,
    with the next tile's page numbers loaded ahead (pages of several keys)."""
    keys = n0 + tl.arange(0, BLOCK_N)
    key_mask = keys < hi
    if PAGED:
        if PAGE_SIZE == 1:  # a page per key: no look-ahead (on the H200 it cost more than it hid)
            page = tl.load(indices_ptr + table_row + keys, mask=key_mask, other=0).to(tl.int64)
            slot = tl.zeros([BLOCK_N], tl.int64)
        else:
            page = next_page
            ahead = keys + BLOCK_N
            next_page = tl.load(indices_ptr + table_row + ahead // PAGE_SIZE, mask=ahead < hi, other=0).to(tl.int64)
            slot = (keys % PAGE_SIZE).to(tl.int64)
    else:
        page = b.to(tl.int64) + tl.zeros([BLOCK_N], tl.int64)
        slot = keys.to(tl.int64)
    k_offs = (page * stride_kb + slot * stride_kt)[:, None]
    v_offs = (page * stride_vb + slot * stride_vt)[:, None]
    k = tl.load(k_base + k_offs + cols[None, :], mask=key_mask[:, None] & col_mask[None, :], other=0.0)
    v = tl.load(v_base + v_offs + cols[None, :], mask=key_mask[:, None] & col_mask[None, :], other=0.0)
    return keys, key_mask, k, v, next_page


@triton.jit
def tile_scores(q, k, v, scale_log2, cap_log2, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr):
    """Base-2 scores ``[rows, BLOCK_N]`` of queries ``q [rows, D]`` against a key tile
    ``k [BLOCK_N, D]`` (capped with ``SOFTCAP``, before any mask: a masked score must stay
    −inf), and the tile's values in the dtype ``p·V`` takes (float32 with ``UPCAST``)."""
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale_log2
    if SOFTCAP:
        s = cap_log2 * tanh(s * (1.0 / cap_log2))
    return s, v


@triton.jit
def _online_tile(m, den, acc, s, v, UPCAST: tl.constexpr):
    """Fold a tile of base-2 scores ``s [G_PAD, BLOCK_N]`` (−inf where masked) and its
    values into a running softmax state ``(max, denominator, accumulator)``."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    den = den * alpha + tl.sum(p, axis=1)
    if UPCAST:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, den, acc * alpha[:, None] + pv


@triton.jit
def _store_state(o_ptr, lse_ptr, part, m, den, acc, lane_mask, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a running state as a partial summary ``(o, natural-log LSE)``; −inf when no key was valid."""
    cols = tl.arange(0, BLOCK_D)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    inv = tl.where(den > 0, 1.0 / den, 0.0)
    tl.store(lse_ptr + part, (m_safe + tl.log2(den)) * LN2, mask=lane_mask)
    tl.store(o_ptr + part[:, None] * D + cols[None, :], acc * inv[:, None], mask=lane_mask[:, None] & (cols < D)[None, :])


def launch_attend(
    q_post, k_cache, v_cache, positions, launch: Launch, scale: float, *, band_source: str, band: int = 0, sinks: int = 0,
    spans=None, keys=None, radius_sq=None, min_context: int = 0, softcap: float | None = None, verify: Verify | None = None,
) -> Partials:
    """Plan and attend one step (no validation, no host sync).

    Args:
        q_post: ``[B, Hq, D]`` post-RoPE queries.
        k_cache, v_cache: ``[B, Hkv, T, D]``, or two :class:`~mac_core.kv.PagedKV` of one table.
        positions: ``[B]`` int64 positions ``t``.
        launch: the launch settings.
        scale: softmax scale.
        band_source: one of :data:`mac_triton.plan.BAND_SOURCES`; ``"spans"`` reads
            ``spans`` (a :class:`~mac_core.step.Spans`), ``"match"`` the ``[B·Hq]`` int64
            match ``keys``, the ``[Hq]`` float32 squared radii ``radius_sq``, ``band``,
            ``sinks`` and ``min_context``; ``"full"`` attends over ``[0, t+1)``.
        softcap: ``None`` or the soft-cap ``c`` of the scores (``MACConfig.softcap``).
        verify: for a rule that decides after the fresh part (band source ``"match"``), a
            :class:`Verify`: the fresh kernel reads each group's sinks, band and tail, keeping
            the band's keys below each head's start apart, and the prefix kernel decides each
            group and reads the prefixes of the heads that do not reuse (two launches).

    Returns:
        :class:`Partials`.
    """
    if band_source not in BAND_SOURCES:
        raise ValueError(f"band_source must be one of {BAND_SOURCES}, got {band_source!r}")
    B, Hq, D = q_post.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    NG = B * Hkv
    device = q_post.device
    n_split = num_sms(device) * launch.programs_per_sm
    # stream-K: each segment adds at most one piece to the programs' ranges; a verifying step: three units a group
    planned = 3 * NG if verify is not None else n_split + 3 * NG
    max_pieces = triton.cdiv(launch.prefix_per_sm * num_sms(device), NG)  # pieces of a group's prefix
    units = planned + (NG * max_pieces if verify is not None else 0)
    # tiles of at most 32 KB (float32 K/V or wide heads get fewer keys per tile)
    block_n = max(16, min(launch.block_n, 32768 // (triton.next_power_of_2(D) * k_cache.element_size())))
    f32 = torch.float32
    partials = Partials(
        o=torch.empty(units, G, D, dtype=f32, device=device),
        lse=torch.empty(units, G, dtype=f32, device=device),
        plan=torch.empty(NG, PLAN_FIELDS, dtype=torch.int64, device=device),
    )
    if verify is not None:
        partials = partials._replace(
            below_o=torch.empty(planned, G, D, dtype=f32, device=device), below_lse=torch.empty(planned, G, dtype=f32, device=device),
            verdicts=Verdicts.empty(B * Hq, device),
        )
    span_ptrs, (stride_sb, stride_sh) = (None,) * 4, (0, 0)
    if band_source == BAND_FROM_SPANS.value:
        span_ptrs = _same_strides(spans.band_start, spans.sink_end, spans.band_end, spans.tail_end)
        stride_sb, stride_sh = span_ptrs[0].stride()
    k, (stride_kb, stride_kh, stride_kt), (indptr, indices), page_size = _kv_operand(k_cache)
    v, (stride_vb, stride_vh, stride_vt), _, _ = _kv_operand(v_cache)
    cache = dict(
        q_ptr=q_post, k_ptr=k, v_ptr=v, part_o_ptr=partials.o, part_lse_ptr=partials.lse, plan_ptr=partials.plan,
        stride_qb=q_post.stride(0), stride_qh=q_post.stride(1), stride_kb=stride_kb, stride_kh=stride_kh, stride_kt=stride_kt,
        stride_vb=stride_vb, stride_vh=stride_vh, stride_vt=stride_vt, indptr_ptr=indptr, indices_ptr=indices,
        Hkv=Hkv, G=G, min_context=min_context, scale_log2=scale * LOG2E, cap_log2=0.0 if softcap is None else softcap * LOG2E,
        PAGED=isinstance(k_cache, PagedKV), PAGE_SIZE=page_size, SOFTCAP=softcap is not None,
        D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), G_PAD=max(16, triton.next_power_of_2(G)), BLOCK_N=block_n,  # tl.dot needs K >= 16
        UPCAST=upcast_dots(k_cache.dtype), num_stages=launch.stages,
    )  # what both kernels read the same way
    if verify is None:
        _attend_kernel[(n_split,)](
            **cache, num_warps=launch.warps, pos_ptr=positions, key_ptr=keys, radius_ptr=radius_sq, band_start_ptr=span_ptrs[0],
            sink_end_ptr=span_ptrs[1], band_end_ptr=span_ptrs[2], tail_end_ptr=span_ptrs[3], stride_sb=stride_sb, stride_sh=stride_sh,
            NG=NG, band=band, sinks=sinks, n_split=n_split, BAND_SOURCE=band_source, NG_BLOCK=triton.next_power_of_2(NG),
            G_BLOCK=triton.next_power_of_2(G), MIN_CHUNK=launch.min_chunk, UNIT_COST=launch.unit_cost,
        )
        return partials
    _fresh_kernel[(NG, 3)](
        **cache, num_warps=launch.prefix_warps, below_o_ptr=partials.below_o, below_lse_ptr=partials.below_lse, pos_ptr=positions,
        key_ptr=keys, radius_ptr=radius_sq, prefix_base=planned, max_pieces=max_pieces, band=band, sinks=sinks, PER_GROUP=verify.per_group,
    )
    ring_lse = verify.state.ring_lse
    _prefix_kernel[(NG, max_pieces)](
        **cache, num_warps=launch.prefix_warps, key_ptr=keys, radius_ptr=radius_sq, rule_radius_ptr=verify.rule_radius_sq, ring_lse_ptr=ring_lse,
        stride_rlb=ring_lse.stride(0), stride_rlh=ring_lse.stride(1), W=verify.state.window,
        hit_ptr=partials.verdicts.hit, candidate_ptr=partials.verdicts.candidate, share_ptr=partials.verdicts.mass_share,
        min_piece=launch.min_chunk * 4, RULE=verify.rule, PER_GROUP=verify.per_group, BLOCK_U=launch.reduce_units,
    )
    return partials


def _kv_operand(cache):
    """``(tensor, (page, head, slot) strides, (indptr, indices), page size)`` of a cache; a
    contiguous one is a page per request, with no table."""
    if isinstance(cache, PagedKV):
        page_stride, head_stride, slot_stride = cache.strides()
        return cache.pages, (page_stride, head_stride, slot_stride), (cache.table.indptr, cache.table.indices), cache.page_size
    return cache, (cache.stride(0), cache.stride(1), cache.stride(2)), (None, None), 1


def _same_strides(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Tensors the kernel indexes with one pair of strides (made contiguous where they differ)."""
    if len({t.stride() for t in tensors}) == 1:
        return tensors
    return tuple(t.contiguous() for t in tensors)
