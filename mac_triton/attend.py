r"""The attend kernel: flash-decoding partial states of every unit of the plan.

One program per SM (or two; :class:`~mac_triton.launch.Launch`). Each program walks its
share of the plan (:mod:`mac_triton.plan`); for each unit it loads the keys and values
once for all ``g`` query heads of the group (one ``tl.dot`` of ``[g, D] × [D, BLOCK_N]``)
and keeps a partial state per head; band units mask the keys below each head's own band
start. Partial states go to a workspace that :mod:`mac_triton.reduce` merges.

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

from .launch import Launch, num_sms, upcast_dots
from mac_core.numerics import LOG2E

from .numerics import LN2, tanh
from .plan import _PLAN_FIELDS, BAND_FROM_PREFIX, BAND_FROM_SPANS, BAND_SOURCES, PLAN_FIELDS, band_bounds, keys_at, pick, pieces, plan_units, segment_cost


class Partials(NamedTuple):
    """The attend kernel's output, the reduce kernel's input.

    Attributes:
        o: ``[units, G, D]`` float32 partial outputs (one per unit and head of its group).
        lse: ``[units, G]`` float32 partial LSEs.
        plan: ``[B·Hkv, PLAN_FIELDS]`` int64 per group: first unit, sink units, band units,
            units, ``S``, ``t + 1``.
    """

    o: torch.Tensor
    lse: torch.Tensor
    plan: torch.Tensor


@triton.jit
def _attend_kernel(
    q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, plan_ptr,
    pos_ptr, key_ptr, radius_ptr, band_start_ptr, sink_end_ptr, band_end_ptr, tail_end_ptr, stride_sb, stride_sh,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    indptr_ptr, indices_ptr,
    NG, Hkv, G, band, sinks, min_context, n_split, scale_log2, cap_log2,
    BAND_SOURCE: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, NG_BLOCK: tl.constexpr, G_BLOCK: tl.constexpr, MIN_CHUNK: tl.constexpr,
    UNIT_COST: tl.constexpr, SOFTCAP: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    first, n_sink, n_band, n_units, sink_end, band_lo, band_end, tail_end, offset, chunk, total = plan_units(
        pos_ptr, key_ptr, radius_ptr, band_start_ptr, sink_end_ptr, band_end_ptr, tail_end_ptr, stride_sb, stride_sh,
        NG, Hkv, G, band, sinks, min_context, n_split, BAND_SOURCE, NG_BLOCK, G_BLOCK, MIN_CHUNK, UNIT_COST,
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
        # each head's own band (band units mask the keys outside it)
        head_start, head_end = band_bounds(
            b, heads, lane_mask, g_sink_end, g_band_end, g_tail_end, key_ptr, radius_ptr, band_start_ptr,
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
                if seg == 1:
                    head_lo = tl.maximum(head_start, lo).to(tl.int32)
                    head_hi = tl.minimum(head_end, hi).to(tl.int32)
                else:
                    head_lo = lo + tl.zeros([G_PAD], tl.int32)
                    head_hi = hi + tl.zeros([G_PAD], tl.int32)
                _attend_unit(
                    q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, b, kvh, heads, lane_mask, head_lo, head_hi, lo, hi, unit, G,
                    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, scale_log2, cap_log2,
                    indptr_ptr, indices_ptr, PAGED, PAGE_SIZE, SOFTCAP, D, BLOCK_D, G_PAD, BLOCK_N, UPCAST,
                )
            units_before += pieces(seg_keys_at, seg_len, chunk)
            seg_offset += segment_cost(seg_len, UNIT_COST)
        grp += 1
        grp_start = seg_offset


@triton.jit
def _attend_unit(
    q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, b, kvh, heads, lane_mask, head_lo, head_hi, lo, hi, unit, G,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, scale_log2, cap_log2,
    indptr_ptr, indices_ptr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, SOFTCAP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    """Flash-decoding partial states of the group's heads over keys ``[lo, hi)`` (head ``i``
    only over ``[head_lo[i], head_hi[i])``), stored as unit ``unit``: K/V tiles loaded once
    for all heads.

    Key ``t`` sits at ``page · stride_(k|v)b + slot · stride_(k|v)t``: a contiguous cache is
    one page per request (``page = b``, ``slot = t``); a paged one looks ``page`` up in the
    table (``indices[indptr[b] + t // PAGE_SIZE]``, ``slot = t % PAGE_SIZE``). The page size is
    a compile-time constant (a shift and a mask for powers of two, not integer divisions); for
    pages of several keys the next tile's page numbers are loaded before this tile's keys are
    used, so the dependent load (table, then keys) overlaps the tile's arithmetic.

    ``SOFTCAP`` caps the base-2 scores ``s₂`` at ``cap_log2 = log2(e)·c``:
    ``s₂ ← C₂·tanh(s₂ / C₂)``, which is ``log2(e)·c·tanh(scale·q·k / c)``."""
    lanes = tl.arange(0, G_PAD)
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
    for n0 in range(lo, hi, BLOCK_N):
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
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2  # [G_PAD, BLOCK_N] base-2 scores
        if SOFTCAP:  # capped before the mask below, which must stay −inf
            s = cap_log2 * tanh(s * (1.0 / cap_log2))
        valid = key_mask[None, :] & (keys[None, :] >= head_lo[:, None]) & (keys[None, :] < head_hi[:, None])
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
    lse = (m_safe + tl.log2(den)) * LN2  # natural log; −inf when no key was valid
    part = (unit * G + lanes).to(tl.int64)
    tl.store(part_lse_ptr + part, lse, mask=lane_mask)
    tl.store(part_o_ptr + part[:, None] * D + cols[None, :], acc * inv[:, None], mask=lane_mask[:, None] & col_mask[None, :])


def launch_attend(
    q_post, k_cache, v_cache, positions, launch: Launch, scale: float, *, band_source: str, band: int = 0, sinks: int = 0,
    spans=None, keys=None, radius_sq=None, min_context: int = 0, prefix_end=None, softcap: float | None = None,
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
            ``sinks`` and ``min_context``; ``"prefix"`` reads the ``[B·Hq]`` int64
            ``prefix_end`` of the decide kernel (``mac_triton.decide``) with ``band`` and
            ``sinks``; ``"full"`` attends over ``[0, t+1)``.
        softcap: ``None`` or the soft-cap ``c`` of the scores (``MACConfig.softcap``).

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
    max_units = n_split + 3 * NG  # each segment adds at most one piece to the programs' ranges
    # tiles of at most 32 KB (float32 K/V or wide heads get fewer keys per tile)
    block_n = max(16, min(launch.block_n, 32768 // (triton.next_power_of_2(D) * k_cache.element_size())))
    partials = Partials(
        o=torch.empty(max_units, G, D, dtype=torch.float32, device=device),
        lse=torch.empty(max_units, G, dtype=torch.float32, device=device),
        plan=torch.empty(NG, PLAN_FIELDS, dtype=torch.int64, device=device),
    )
    span_ptrs, (stride_sb, stride_sh) = (None,) * 4, (0, 0)
    if band_source == BAND_FROM_SPANS.value:
        span_ptrs = _same_strides(spans.band_start, spans.sink_end, spans.band_end, spans.tail_end)
        stride_sb, stride_sh = span_ptrs[0].stride()
    elif band_source == BAND_FROM_PREFIX.value:
        span_ptrs = (prefix_end, None, None, None)
    k, k_strides, table, page_size = _kv_operand(k_cache)
    v, v_strides, _, _ = _kv_operand(v_cache)
    _attend_kernel[(n_split,)](
        q_post, k, v, partials.o, partials.lse, partials.plan,
        positions, keys, radius_sq, *span_ptrs, stride_sb, stride_sh,
        q_post.stride(0), q_post.stride(1), *k_strides, *v_strides, *table,
        NG, Hkv, G, band, sinks, min_context, n_split, scale * LOG2E, 0.0 if softcap is None else softcap * LOG2E,
        BAND_SOURCE=band_source, PAGED=isinstance(k_cache, PagedKV), PAGE_SIZE=page_size, NG_BLOCK=triton.next_power_of_2(NG), G_BLOCK=triton.next_power_of_2(G),
        MIN_CHUNK=launch.min_chunk, UNIT_COST=launch.unit_cost, SOFTCAP=softcap is not None,
        D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), G_PAD=max(16, triton.next_power_of_2(G)), BLOCK_N=block_n,  # tl.dot needs K >= 16
        UPCAST=upcast_dots(k_cache.dtype), num_warps=launch.warps, num_stages=launch.stages,
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
