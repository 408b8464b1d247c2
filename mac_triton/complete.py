r"""Amend + Complete in Triton: one split-KV decode-attention pass per step.

Twin of :func:`mac_ref.complete.amend_complete` (same signature, returns ``(out, C)``):

.. math::
    C = R_{j^*} \oplus A(q_t, [P, N)) \;\text{(hit)}, \qquad C = A(q_t, [S, N)) \;\text{(miss)}, \qquad
    \text{out} = A(q_t, [0, S)) \oplus C \oplus A(q_t, [N, t+1)).

Three kernels, no host synchronisation (so a step can be captured in a CUDA graph):

1. **plan** (one program): per GQA group ``(b, h_kv)`` the union of its heads' spans,
   ``[0, S)`` sinks, ``[min_h P_h, N)`` band, ``[N, t+1)`` tail, is cut into *units* of
   ``chunk`` keys; ``chunk`` is chosen from the total keys of the whole batch so that
   there are about ``UNITS_PER_PROGRAM`` units per program. Work is therefore split by
   span length: a long miss span becomes many units, a hit's short band one or two,
   whatever the longest head is. In the fused decode step the plan kernel also decodes
   the match keys (hit, ``j*``, distance, band start, keys read).
2. **attend** (a persistent grid of a few programs per SM): each unit loads its
   ``chunk`` keys and values once for all ``g`` query heads of the group (one ``tl.dot``
   of ``[g, D] × [D, BLOCK_N]``) and keeps a flash-decoding partial state per head; band
   units mask keys below each head's own band start. Partial states go to a workspace.
3. **reduce** (one program per query head): ⊕ of the head's band units into ``C`` (with
   the cached row ``R_{j*}`` on a hit), ⊕ of its sink and tail units into ``out``, and,
   in the decode step, the ring write of ``(q̃_t, R_t)`` (``split``: ``R_t = C``;
   ``subtract``: ``R_t = out ⊖ (sinks ⊕ tail)``).

Precision: scores and the online softmax in float32 (base-2 exponentials inside the
attend kernel, natural-log LSEs everywhere outside it); bf16/fp16 operands feed the
tensor cores with float32 accumulation, the probabilities are rounded to the value dtype
before ``p·V`` (as in FlashAttention); float32 inputs (and everything under the
interpreter) use IEEE float32 dots. ``BLOCK_N = 64`` keys per tile, ``MIN_CHUNK = 128``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mac_ref.amend import Spans
from mac_ref.match import MatchResult
from mac_ref.state import LayerState
from mac_ref.summary import Summary, removal_epsilon

from ._common import (
    check_kernel_dtype,
    interpreting,
    merge_weights,
    num_sms,
    online_finish,
    online_merge,
    remove_weights,
    upcast_dots,
)
from .match import _NO_CANDIDATE, decode_key

BLOCK_N = 64
MIN_CHUNK = 128
UNITS_PER_PROGRAM = 8
PROGRAMS_PER_SM = 2
PLAN_FIELDS = 8  # per group: first unit, sink units, band units, tail units, S, band lo, N, t + 1
LOG2E = 1.4426950408889634

# where the plan kernel takes each head's band start from
SOURCE_SPANS = 0  # a Spans tuple (mac_ref.amend.step_spans)
SOURCE_KEYS = 1  # the match keys: the fused decode step
SOURCE_NONE = 2  # no band: full attention


@triton.jit
def _plan_kernel(
    pos_ptr, key_ptr, radius_ptr, hit_ptr, matched_ptr, dist_ptr, keys_read_ptr, band_start_ptr,
    span_band_start_ptr, span_sink_ptr, span_band_end_ptr, span_tail_end_ptr, stride_sb, stride_sh,
    plan_ptr, meta_ptr,
    NG, Hkv, G, band, sinks, min_context, target_units,
    SOURCE: tl.constexpr, NG_BLOCK: tl.constexpr, G_BLOCK: tl.constexpr, MIN_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    groups = tl.arange(0, NG_BLOCK)[:, None]  # [NG, 1]
    lanes = tl.arange(0, G_BLOCK)[None, :]  # [1, G]
    mask = (groups < NG) & (lanes < G)
    heads = groups * G + lanes  # b·Hq + h
    b = groups // Hkv
    t = tl.load(pos_ptr + b, mask=groups < NG, other=0).to(tl.int64)  # [NG, 1]
    if SOURCE == 0:
        h = (groups % Hkv) * G + lanes
        span_offs = b * stride_sb + h * stride_sh
        start = tl.load(span_band_start_ptr + span_offs, mask=mask, other=0)
        sink_end = tl.max(tl.load(span_sink_ptr + span_offs, mask=mask, other=0), axis=1)
        band_end = tl.max(tl.load(span_band_end_ptr + span_offs, mask=mask, other=0), axis=1)
        tail_end = tl.max(tl.load(span_tail_end_ptr + span_offs, mask=mask, other=0), axis=1)
    else:
        band_end_2d = tl.maximum(t + 1 - band, 0)  # N = E(t)
        sink_end_2d = tl.minimum(band_end_2d, sinks)  # S = min(F, N)
        start = sink_end_2d + tl.zeros([NG_BLOCK, G_BLOCK], tl.int64)
        if SOURCE == 1:
            key = tl.load(key_ptr + heads, mask=mask, other=_NO_CANDIDATE)
            radius_sq = tl.load(radius_ptr + (groups % Hkv) * G + lanes, mask=mask, other=0.0)
            hit, matched, dist = decode_key(key, t, min_context, radius_sq)
            matched_end = tl.maximum(matched + 1 - band, 0)  # P = E(j*)
            start = tl.where(hit, tl.maximum(matched_end, sink_end_2d), sink_end_2d)
            tl.store(hit_ptr + heads, hit.to(tl.int8), mask=mask)
            tl.store(matched_ptr + heads, matched, mask=mask)
            tl.store(dist_ptr + heads, dist, mask=mask)
        tl.store(band_start_ptr + heads, start, mask=mask)
        tl.store(keys_read_ptr + heads, sink_end_2d + (t + 1 - start), mask=mask)
        sink_end = tl.max(sink_end_2d, axis=1)
        band_end = tl.max(band_end_2d, axis=1)
        tail_end = tl.max(t + 1, axis=1)
    band_lo = tl.min(tl.where(mask, start, 2**62), axis=1)  # [NG]: the union of the group's bands
    valid = tl.arange(0, NG_BLOCK) < NG
    sink_len = tl.where(valid, sink_end, 0)
    band_len = tl.where(valid, band_end - band_lo, 0)
    tail_len = tl.where(valid, tail_end - band_end, 0)
    total = tl.sum(sink_len + band_len + tail_len, axis=0)
    chunk = tl.maximum(tl.cdiv(total, target_units), MIN_CHUNK)
    chunk = tl.cdiv(chunk, BLOCK_N) * BLOCK_N
    n_sink = tl.cdiv(sink_len, chunk)
    n_band = tl.cdiv(band_len, chunk)
    n_tail = tl.cdiv(tail_len, chunk)
    n_units = n_sink + n_band + n_tail
    first = tl.cumsum(n_units, axis=0) - n_units
    row = plan_ptr + tl.arange(0, NG_BLOCK) * 8
    tl.store(row + 0, first.to(tl.int32), mask=valid)
    tl.store(row + 1, n_sink.to(tl.int32), mask=valid)
    tl.store(row + 2, n_band.to(tl.int32), mask=valid)
    tl.store(row + 3, n_tail.to(tl.int32), mask=valid)
    tl.store(row + 4, sink_end.to(tl.int32), mask=valid)
    tl.store(row + 5, band_lo.to(tl.int32), mask=valid)
    tl.store(row + 6, band_end.to(tl.int32), mask=valid)
    tl.store(row + 7, tail_end.to(tl.int32), mask=valid)
    tl.store(meta_ptr + 0, tl.sum(n_units, axis=0).to(tl.int32))
    tl.store(meta_ptr + 1, chunk.to(tl.int32))


@triton.jit
def _attend_kernel(
    q_ptr, k_ptr, v_ptr, band_start_ptr, plan_ptr, meta_ptr, part_o_ptr, part_lse_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, stride_sb, stride_sh,
    NG, Hkv, G, scale_log2,
    D: tl.constexpr, BLOCK_D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, NG_BLOCK: tl.constexpr,
    UPCAST: tl.constexpr,
):
    n_units = tl.load(meta_ptr + 0)
    chunk = tl.load(meta_ptr + 1)
    groups = tl.arange(0, NG_BLOCK)
    group_first = tl.load(plan_ptr + groups * 8, mask=groups < NG, other=2**30)  # [NG]
    lanes = tl.arange(0, G_PAD)
    lane_mask = lanes < G
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    for unit in range(tl.program_id(0), n_units, tl.num_programs(0)):
        grp = tl.sum((group_first <= unit).to(tl.int32), axis=0) - 1  # the last group starting at or before unit
        row = plan_ptr + grp * 8
        local = unit - tl.load(row + 0)
        n_sink = tl.load(row + 1)
        n_band = tl.load(row + 2)
        sink_end = tl.load(row + 4)
        band_lo = tl.load(row + 5)
        band_end = tl.load(row + 6)
        tail_end = tl.load(row + 7)
        in_sink = local < n_sink
        in_band = (local >= n_sink) & (local < n_sink + n_band)
        seg_lo = tl.where(in_sink, 0, tl.where(in_band, band_lo, band_end))
        seg_hi = tl.where(in_sink, sink_end, tl.where(in_band, band_end, tail_end))
        seg_index = tl.where(in_sink, local, tl.where(in_band, local - n_sink, local - n_sink - n_band))
        lo = seg_lo + seg_index * chunk
        hi = tl.minimum(lo + chunk, seg_hi)

        b = grp // Hkv
        kvh = grp % Hkv
        heads = kvh * G + lanes  # [G_PAD] query heads of the group
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + cols[None, :],
            mask=lane_mask[:, None] & col_mask[None, :], other=0.0,
        )  # [G_PAD, D]
        if UPCAST:
            q = q.to(tl.float32)
        # each head's own first key: its band start inside band units, the unit start elsewhere
        head_start = tl.load(band_start_ptr + b * stride_sb + heads * stride_sh, mask=lane_mask, other=0)
        head_lo = tl.where(in_band, tl.maximum(head_start, lo), lo).to(tl.int32)  # [G_PAD]

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
    part_o_ptr, part_lse_ptr, plan_ptr, pos_ptr, hit_ptr, matched_ptr,
    ring_q_ptr, ring_o_ptr, ring_lse_ptr, q_pre_ptr, out_ptr, lse_ptr, c_o_ptr, c_lse_ptr, ill_ptr,
    stride_rqb, stride_rqh, stride_rqw, stride_rob, stride_roh, stride_row, stride_rlb, stride_rlh,
    stride_qb, stride_qh, stride_mb, stride_mh,
    Hq, Hkv, G, W, eps,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_U: tl.constexpr,
    HAS_ROWS: tl.constexpr, ROW_OUT: tl.constexpr, SUBTRACT: tl.constexpr,
):
    """ROW_OUT: 0 no row, 1 row to c_o/c_lse, 2 row (and q̃_t) written into the ring."""
    bh = tl.program_id(0)
    b = bh // Hq
    h = bh % Hq
    lane = h % G
    grp = b * Hkv + h // G
    row = plan_ptr + grp * 8
    first = tl.load(row + 0)
    n_sink = tl.load(row + 1)
    n_band = tl.load(row + 2)
    n_units = n_sink + n_band + tl.load(row + 3)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D

    m_band = tl.full((), float("-inf"), tl.float32)
    den_band = tl.zeros((), tl.float32)
    acc_band = tl.zeros([BLOCK_D], tl.float32)
    m_rest = tl.full((), float("-inf"), tl.float32)
    den_rest = tl.zeros((), tl.float32)
    acc_rest = tl.zeros([BLOCK_D], tl.float32)
    for u0 in range(0, n_units, BLOCK_U):
        local = u0 + tl.arange(0, BLOCK_U)
        unit_mask = local < n_units
        part = (first + local).to(tl.int64) * G + lane
        lse = tl.load(part_lse_ptr + part, mask=unit_mask, other=float("-inf"))
        o = tl.load(part_o_ptr + part[:, None] * D + cols[None, :], mask=unit_mask[:, None] & col_mask[None, :], other=0.0)
        in_band = (local >= n_sink) & (local < n_sink + n_band)
        m_band, den_band, acc_band = online_merge(m_band, den_band, acc_band, tl.where(in_band, lse, float("-inf")), o)
        m_rest, den_rest, acc_rest = online_merge(m_rest, den_rest, acc_rest, tl.where(in_band, float("-inf"), lse), o)
    c_o, c_lse = online_finish(m_band, den_band, acc_band)  # the band
    rest_o, rest_lse = online_finish(m_rest, den_rest, acc_rest)  # sinks ⊕ tail

    if HAS_ROWS:  # C = R_{j*} ⊕ band on a hit
        hit = tl.load(hit_ptr + b * stride_mb + h * stride_mh) != 0
        matched = tl.load(matched_ptr + b * stride_mb + h * stride_mh).to(tl.int64)
        slot = ((matched % W) + W) % W
        reused_lse = tl.load(ring_lse_ptr + b * stride_rlb + h * stride_rlh + slot)
        reused_o = tl.load(ring_o_ptr + b.to(tl.int64) * stride_rob + h * stride_roh + slot * stride_row + cols, mask=col_mask, other=0.0)
        reused_lse = tl.where(hit, reused_lse, float("-inf"))
        reused_o = tl.where(hit, reused_o, 0.0)
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
        else:  # R_t = C
            row_o = c_o
            row_lse = c_lse
        if ROW_OUT == 1:
            tl.store(c_o_ptr + bh.to(tl.int64) * D + cols, row_o, mask=col_mask)
            tl.store(c_lse_ptr + bh, row_lse)
        else:
            t = tl.load(pos_ptr + b).to(tl.int64)
            slot = t % W
            q_pre = tl.load(q_pre_ptr + b * stride_qb + h * stride_qh + cols, mask=col_mask)
            tl.store(ring_q_ptr + b.to(tl.int64) * stride_rqb + h * stride_rqh + slot * stride_rqw + cols, q_pre, mask=col_mask)
            tl.store(ring_o_ptr + b.to(tl.int64) * stride_rob + h * stride_roh + slot * stride_row + cols, row_o, mask=col_mask)
            tl.store(ring_lse_ptr + b * stride_rlb + h * stride_rlh + slot, row_lse)


def attend_spans(
    q_post, k_cache, v_cache, positions, *, source, band=0, sinks=0, spans: Spans | None = None,
    keys=None, min_context=0, radius_sq=None, state: LayerState | None = None, result: MatchResult | None = None,
    q_pre=None, out_dtype=torch.float32, row_out=0, subtract=False, scale=None,
):
    """Launch plan → attend → reduce for one step (no validation, no host sync).

    ``source`` picks where the band starts come from (:data:`SOURCE_SPANS` with ``spans``,
    :data:`SOURCE_KEYS` with the match ``keys`` and the ``[Hq]`` squared radii ``radius_sq``,
    :data:`SOURCE_NONE`: full attention).
    ``row_out``: 0 no row, 1 return ``C`` (or the subtract row), 2 write ``(q̃_t, R_t)``
    into ``state``'s rings.

    Returns:
        dict with ``out [B, Hq, D]`` (``out_dtype``), ``lse [B, Hq]`` float32 and, as they
        apply, ``row_o``, ``row_lse``, ``hit``, ``matched_pos``, ``distance``,
        ``keys_read``, ``ill_conditioned``.
    """
    B, Hq, D = q_post.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    NG = B * Hkv
    device = q_post.device
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    n_programs = num_sms(device) * PROGRAMS_PER_SM
    target_units = n_programs * UNITS_PER_PROGRAM
    max_units = target_units + 3 * NG  # Σ ceil(len/chunk) ≤ Σ len/chunk + #segments
    i64, f32 = torch.int64, torch.float32

    plan = torch.empty(NG, PLAN_FIELDS, dtype=torch.int32, device=device)
    meta = torch.empty(2, dtype=torch.int32, device=device)
    part_o = torch.empty(max_units, G, D, dtype=f32, device=device)
    part_lse = torch.empty(max_units, G, dtype=f32, device=device)
    unused = meta  # stands for the pointers a mode does not read
    res = {}
    if source == SOURCE_SPANS:
        band_start = spans.band_start
        span_tensors = (spans.band_start, spans.sink_end, spans.band_end, spans.tail_end)
        if len({s.stride() for s in span_tensors}) != 1:
            span_tensors = tuple(s.contiguous() for s in span_tensors)
            band_start = span_tensors[0]
        stride_sb, stride_sh = band_start.stride()
        hit_buf, matched_buf, dist_buf, keys_read_buf = band_start, band_start, band_start, band_start  # unused
    else:
        band_start = torch.empty(B, Hq, dtype=i64, device=device)
        span_tensors = (band_start,) * 4  # unused
        stride_sb, stride_sh = band_start.stride()
        keys_read_buf = torch.empty(B, Hq, dtype=i64, device=device)
        res["keys_read"] = keys_read_buf
        if source == SOURCE_KEYS:
            hit_buf = torch.empty(B, Hq, dtype=torch.int8, device=device)
            matched_buf = torch.empty(B, Hq, dtype=i64, device=device)
            dist_buf = torch.empty(B, Hq, dtype=f32, device=device)
            res.update(hit=hit_buf.view(torch.bool), matched_pos=matched_buf, distance=dist_buf)
        else:
            hit_buf = matched_buf = dist_buf = keys_read_buf  # unused
    _plan_kernel[(1,)](
        positions, keys if keys is not None else band_start, radius_sq if radius_sq is not None else unused,
        hit_buf, matched_buf, dist_buf, keys_read_buf, band_start,
        *span_tensors, stride_sb, stride_sh, plan, meta,
        NG, Hkv, G, band, sinks, min_context, target_units,
        SOURCE=source, NG_BLOCK=triton.next_power_of_2(NG), G_BLOCK=triton.next_power_of_2(G),
        MIN_CHUNK=MIN_CHUNK, BLOCK_N=BLOCK_N,
    )
    _attend_kernel[(n_programs,)](
        q_post, k_cache, v_cache, band_start, plan, meta, part_o, part_lse,
        q_post.stride(0), q_post.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], stride_sb, stride_sh,
        NG, Hkv, G, scale * LOG2E,
        D=D, BLOCK_D=triton.next_power_of_2(D), G_PAD=max(16, triton.next_power_of_2(G)), BLOCK_N=BLOCK_N,
        NG_BLOCK=triton.next_power_of_2(NG), UPCAST=upcast_dots(k_cache.dtype),
        num_warps=4, num_stages=3,
    )

    out = torch.empty(B, Hq, D, dtype=out_dtype, device=device)
    lse = torch.empty(B, Hq, dtype=f32, device=device)
    res.update(out=out, lse=lse)
    has_rows = source != SOURCE_NONE
    if has_rows:
        hit_in, matched_in = (result.hit, result.matched_pos) if source == SOURCE_SPANS else (res["hit"], res["matched_pos"])
        hit_in = hit_in.view(torch.int8)
        if hit_in.stride() != matched_in.stride():
            hit_in, matched_in = hit_in.contiguous(), matched_in.contiguous()
        ring_q, ring_o, ring_lse = state.ring_q, state.ring_o, state.ring_lse
        W = state.window
    else:
        hit_in = matched_in = lse  # unused
        ring_q, ring_o, ring_lse = out.view(B, Hq, 1, D), out.view(B, Hq, 1, D), lse.view(B, Hq, 1)  # unused
        W = 1
    row_o = torch.empty(B, Hq, D, dtype=f32, device=device) if row_out == 1 else out
    row_lse = torch.empty(B, Hq, dtype=f32, device=device) if row_out == 1 else lse
    ill = torch.zeros(B, Hq, dtype=torch.int8, device=device)
    if row_out == 1:
        res.update(row_o=row_o, row_lse=row_lse)
    res["ill_conditioned"] = ill.view(torch.bool)
    if row_out == 2 and (ring_q.stride(-1) != 1 or ring_o.stride(-1) != 1):
        raise ValueError("state rings must be contiguous in the head dimension")
    q_ring_src = q_pre if q_pre is not None else q_post
    _reduce_kernel[(B * Hq,)](
        part_o, part_lse, plan, positions, hit_in, matched_in,
        ring_q, ring_o, ring_lse, q_ring_src, out, lse, row_o, row_lse, ill,
        *ring_q.stride()[:3], *ring_o.stride()[:3], *ring_lse.stride()[:2],
        q_ring_src.stride(0), q_ring_src.stride(1), matched_in.stride(0), matched_in.stride(1),
        Hq, Hkv, G, W, removal_epsilon(torch.float32),
        D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_U=16,
        HAS_ROWS=has_rows, ROW_OUT=row_out, SUBTRACT=subtract,
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
    B = q_post.shape[0]
    positions = spans.tail_end[:, 0] - 1 if B else spans.tail_end.new_zeros(0)
    res = attend_spans(
        q_post, k_cache, v_cache, positions, source=SOURCE_SPANS, spans=spans, state=state, result=result,
        out_dtype=torch.float32, row_out=1, scale=scale,
    )
    return Summary(res["out"], res["lse"]), Summary(res["row_o"], res["row_lse"])
