r"""The reduce kernel: one program per query head merges its partial states into the step's result.

Per (request, query head): ⊕ of its band units into ``C`` (with the cached row
``R_{j*}`` on a hit), ⊕ of its sink and tail units into ``rest``, and
``out = C ⊕ rest``. What else it does depends on the mode:

- where the band starts come from (``BAND_SOURCE``, as in :mod:`mac_triton.plan`): with
  the match keys it also decodes the match (candidate, ``j*``, distance), applies the rule
  (:mod:`mac_triton.accept`) or, in a two-phase step (``DECIDED``), reads the decide
  kernel's verdict and merges the second phase's prefix of rejected candidates into ``C``
  (``C = A(q_t, [S, P)) ⊕ band``: exact); it reports the decisions, ``w`` and the keys
  read, and resets the head's match key;
- what it does with the new row (``ROW_OUT``): :data:`ROW_NONE` (full decode),
  :data:`ROW_RETURN` (``C`` and ``rest`` returned, ``mac_triton.amend_complete``) or
  :data:`ROW_TO_RING` (``(q̃_t, R_t)`` and the row's chain depth written into the rings:
  ``split``: ``R_t = C``; ``subtract``: ``R_t = out ⊖ rest``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mac_core.numerics import removal_epsilon

from .accept import accept_candidate, mass_share
from .attend import Partials
from .decide import Decided
from .match import NO_CANDIDATE, decode_key
from .numerics import merge_weights, online_finish, online_merge, remove_weights
from .plan import _PLAN_FIELDS, BAND_FROM_MATCH, BAND_FROM_SPANS, NO_BAND

ROW_NONE: tl.constexpr = tl.constexpr("none")
ROW_RETURN: tl.constexpr = tl.constexpr("return")
ROW_TO_RING: tl.constexpr = tl.constexpr("ring")
_NO_CANDIDATE: tl.constexpr = tl.constexpr(NO_CANDIDATE)


class Reduced(NamedTuple):
    """The reduce kernel's results; fields a mode does not produce are ``None``.

    Attributes:
        out, lse: ``[B, Hq, D]`` output (in the requested dtype) and ``[B, Hq]`` float32 LSE.
        hit, matched_pos, distance, keys_read, candidate, mass_share: the match report
            (``BAND_FROM_MATCH``): ``[B, Hq]`` bool, int64, float32, int64, bool, float32;
            context: ``[B]`` int64 ``t + 1``.
        cached_o, cached_lse, rest_o, rest_lse: ``C`` and sinks ⊕ tail, float32 (``ROW_RETURN``).
        ill_conditioned, chain_depth: ``[B, Hq]`` bool and int64 of the written row (``ROW_TO_RING``).
    """

    out: torch.Tensor
    lse: torch.Tensor
    hit: torch.Tensor | None = None
    matched_pos: torch.Tensor | None = None
    distance: torch.Tensor | None = None
    keys_read: torch.Tensor | None = None
    candidate: torch.Tensor | None = None
    mass_share: torch.Tensor | None = None
    context: torch.Tensor | None = None
    cached_o: torch.Tensor | None = None
    cached_lse: torch.Tensor | None = None
    rest_o: torch.Tensor | None = None
    rest_lse: torch.Tensor | None = None
    ill_conditioned: torch.Tensor | None = None
    chain_depth: torch.Tensor | None = None


@triton.jit
def _reduce_kernel(
    part_o_ptr, part_lse_ptr, plan_ptr, key_ptr, radius_ptr,
    hit_ptr, matched_ptr, dist_ptr, keys_read_ptr, candidate_ptr, share_ptr, context_ptr,
    decided_hit_ptr, decided_share_ptr, prefix_o_ptr, prefix_lse_ptr, prefix_plan_ptr,
    ring_q_ptr, ring_o_ptr, ring_lse_ptr, ring_depth_ptr, depth_out_ptr, q_pre_ptr, out_ptr, lse_ptr,
    c_o_ptr, c_lse_ptr, rest_o_ptr, rest_lse_ptr, ill_ptr,
    stride_rqb, stride_rqh, stride_rqw, stride_rob, stride_roh, stride_row, stride_rlb, stride_rlh, stride_rdb, stride_rdh,
    stride_qb, stride_qh, stride_mb, stride_mh,
    Hkv, G, band, min_context, W, eps,
    BAND_SOURCE: tl.constexpr, ROW_OUT: tl.constexpr, SUBTRACT: tl.constexpr, RULE: tl.constexpr, DECIDED: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_U: tl.constexpr,
):
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

    if BAND_SOURCE != NO_BAND:  # C = R_{j*} ⊕ band on a hit, A(q_t, [S, P)) ⊕ band on a rejection
        if BAND_SOURCE == BAND_FROM_MATCH:
            radius_sq = tl.load(radius_ptr + h)
            candidate, matched, dist = decode_key(tl.load(key_ptr + bh), t, min_context, radius_sq)
        else:
            candidate = tl.load(hit_ptr + b * stride_mb + h * stride_mh) != 0
            matched = tl.load(matched_ptr + b * stride_mb + h * stride_mh).to(tl.int64)
            dist = tl.zeros((), tl.float32)
        slot = ((matched % W) + W) % W
        row_lse = tl.load(ring_lse_ptr + b * stride_rlb + h * stride_rlh + slot)
        row_o = tl.load(ring_o_ptr + b.to(tl.int64) * stride_rob + h * stride_roh + slot * stride_row + cols, mask=col_mask, other=0.0)
        prefix_lse = tl.full((), float("-inf"), tl.float32)
        prefix_o = tl.zeros([BLOCK_D], tl.float32)
        if DECIDED:  # the decide kernel's verdict, and phase 2's prefix [S, P) of a rejected candidate
            hit = tl.load(decided_hit_ptr + bh) != 0
            w = tl.load(decided_share_ptr + bh)
            p_row = prefix_plan_ptr + (b * Hkv + h // G) * _PLAN_FIELDS
            p_first = tl.load(p_row + 0)
            p_units = tl.load(p_row + 3)
            m_p = tl.full((), float("-inf"), tl.float32)
            den_p = tl.zeros((), tl.float32)
            acc_p = tl.zeros([BLOCK_D], tl.float32)
            for u0 in range(0, p_units, BLOCK_U):
                local = u0 + tl.arange(0, BLOCK_U)
                unit_mask = local < p_units
                part = (p_first + local).to(tl.int64) * G + lane
                lse = tl.load(prefix_lse_ptr + part, mask=unit_mask, other=float("-inf"))
                o = tl.load(prefix_o_ptr + part[:, None] * D + cols[None, :], mask=unit_mask[:, None] & col_mask[None, :], other=0.0)
                m_p, den_p, acc_p = online_merge(m_p, den_p, acc_p, lse, o)
            prefix_o, prefix_lse = online_finish(m_p, den_p, acc_p)
        else:
            _, _, fresh_lse = merge_weights(c_lse, rest_lse)  # what the step read with the current query
            w = mass_share(candidate, row_lse, fresh_lse)
            hit = accept_candidate(candidate, dist, 0.0, w, RULE)
        if BAND_SOURCE == BAND_FROM_MATCH:  # the match report; the key workspace is left clean for the next step
            start = tl.where(hit, tl.maximum(tl.maximum(matched + 1 - band, 0), g_sink_end), g_sink_end)
            tl.store(hit_ptr + bh, hit.to(tl.int8))
            tl.store(matched_ptr + bh, matched)
            tl.store(dist_ptr + bh, dist)
            tl.store(keys_read_ptr + bh, g_sink_end + (t + 1 - start))
            tl.store(candidate_ptr + bh, candidate.to(tl.int8))
            tl.store(share_ptr + bh, w)
            if h == 0:  # the request's context, t + 1 keys (written here: no launch of its own)
                tl.store(context_ptr + b, t + 1)
            tl.store(key_ptr + bh, _NO_CANDIDATE)
        reused_lse = tl.where(hit, row_lse, prefix_lse)
        reused_o = tl.where(hit, row_o, prefix_o)
        w_r, w_c, c_lse = merge_weights(reused_lse, c_lse)
        c_o = w_r * reused_o + w_c * c_o

    w_c, w_rest, out_lse = merge_weights(c_lse, rest_lse)
    out_o = w_c * c_o + w_rest * rest_o
    tl.store(out_ptr + bh.to(tl.int64) * D + cols, out_o, mask=col_mask)
    tl.store(lse_ptr + bh, out_lse)

    if ROW_OUT == ROW_RETURN:
        tl.store(c_o_ptr + bh.to(tl.int64) * D + cols, c_o, mask=col_mask)
        tl.store(c_lse_ptr + bh, c_lse)
        tl.store(rest_o_ptr + bh.to(tl.int64) * D + cols, rest_o, mask=col_mask)
        tl.store(rest_lse_ptr + bh, rest_lse)
    elif ROW_OUT == ROW_TO_RING:
        if SUBTRACT:  # R_t = out ⊖ (sinks ⊕ tail)
            c_out, c_rest, new_lse, ill = remove_weights(out_lse, rest_lse, eps)
            new_o = c_out * out_o - c_rest * rest_o
        else:  # R_t = C, never ill-conditioned
            new_o = c_o
            new_lse = c_lse
            ill = tl.zeros((), tl.int1)
        # the new row's chain depth: one link more than the reused row's, 0 after a miss
        depth = tl.where(hit, tl.load(ring_depth_ptr + b * stride_rdb + h * stride_rdh + slot) + 1, 0)
        slot = t % W
        q_pre = tl.load(q_pre_ptr + b * stride_qb + h * stride_qh + cols, mask=col_mask)
        tl.store(ring_q_ptr + b.to(tl.int64) * stride_rqb + h * stride_rqh + slot * stride_rqw + cols, q_pre, mask=col_mask)
        tl.store(ring_o_ptr + b.to(tl.int64) * stride_rob + h * stride_roh + slot * stride_row + cols, new_o, mask=col_mask)
        tl.store(ring_lse_ptr + b * stride_rlb + h * stride_rlh + slot, new_lse)
        tl.store(ring_depth_ptr + b * stride_rdb + h * stride_rdh + slot, depth)
        tl.store(depth_out_ptr + bh, depth.to(tl.int64))
        tl.store(ill_ptr + bh, ill.to(tl.int8))


def launch_reduce(
    partials: Partials, launch, *, band_source: str, row_out: str, out_dtype: torch.dtype, batch: int, q_heads: int,
    kv_heads: int, head_dim: int, band: int = 0, min_context: int = 0, keys=None, radius_sq=None, result=None,
    state=None, q_pre=None, subtract: bool = False, rule: str = "paper", decided: Decided | None = None,
    prefix: Partials | None = None,
) -> Reduced:
    """Merge a step's partial states (no validation, no host sync).

    Args:
        partials: the attend kernel's output for the same step.
        launch: the launch settings (``reduce_units``).
        band_source: as given to :func:`mac_triton.attend.launch_attend`; ``"spans"``
            reads the hits from ``result`` (a :class:`~mac_core.step.MatchResult`),
            ``"match"`` decodes ``keys`` with the squared radii ``radius_sq``.
        row_out: ``"none"``, ``"return"`` or ``"ring"`` (into ``state``, with ``q_pre``
            ``[B, Hq, D]`` as the ring's query; ``subtract`` picks the row rule).
        out_dtype: dtype of ``out``.
        batch, q_heads, kv_heads, head_dim: ``B, Hq, Hkv, D``.
        band, min_context: the configuration's (``"match"``).
        rule: the acceptance rule's name (:mod:`mac_triton.accept`), applied here in a
            one-phase step.
        decided, prefix: a two-phase step's verdict (:mod:`mac_triton.decide`) and its
            second phase's partial states (band source ``"prefix"``).

    Returns:
        :class:`Reduced`.
    """
    B, Hq, D = batch, q_heads, head_dim
    device = partials.o.device
    f32, i64 = torch.float32, torch.int64
    out = torch.empty(B, Hq, D, dtype=out_dtype, device=device)
    lse = torch.empty(B, Hq, dtype=f32, device=device)
    report = dict.fromkeys(("hit", "matched_pos", "distance", "keys_read", "candidate", "mass_share", "context"))
    hit_buf = matched_buf = None
    stride_mb = stride_mh = 0
    if band_source == BAND_FROM_MATCH.value:
        report = dict(
            hit=torch.empty(B, Hq, dtype=torch.int8, device=device), matched_pos=torch.empty(B, Hq, dtype=i64, device=device),
            distance=torch.empty(B, Hq, dtype=f32, device=device), keys_read=torch.empty(B, Hq, dtype=i64, device=device),
            candidate=torch.empty(B, Hq, dtype=torch.int8, device=device), mass_share=torch.empty(B, Hq, dtype=f32, device=device),
            context=torch.empty(B, dtype=i64, device=device),
        )
        hit_buf, matched_buf = report["hit"], report["matched_pos"]
    elif band_source == BAND_FROM_SPANS.value:
        hit_buf, matched_buf = result.hit.view(torch.int8), result.matched_pos
        if hit_buf.stride() != matched_buf.stride():
            hit_buf, matched_buf = hit_buf.contiguous(), matched_buf.contiguous()
        stride_mb, stride_mh = hit_buf.stride()
    returned = dict.fromkeys(("cached_o", "cached_lse", "rest_o", "rest_lse"))
    if row_out == ROW_RETURN.value:
        returned = dict(
            cached_o=torch.empty(B, Hq, D, dtype=f32, device=device), cached_lse=torch.empty(B, Hq, dtype=f32, device=device),
            rest_o=torch.empty(B, Hq, D, dtype=f32, device=device), rest_lse=torch.empty(B, Hq, dtype=f32, device=device),
        )
    written = dict.fromkeys(("ill_conditioned", "chain_depth"))
    if row_out == ROW_TO_RING.value:
        written = dict(ill_conditioned=torch.empty(B, Hq, dtype=torch.int8, device=device), chain_depth=torch.empty(B, Hq, dtype=i64, device=device))
    rings = (state.ring_q, state.ring_o, state.ring_lse, state.ring_depth) if state is not None else (None,) * 4
    ring_strides = (
        [*state.ring_q.stride()[:3], *state.ring_o.stride()[:3], *state.ring_lse.stride()[:2], *state.ring_depth.stride()[:2]]
        if state is not None else [0] * 10
    )
    q_strides = (q_pre.stride(0), q_pre.stride(1)) if q_pre is not None else (0, 0)
    two_phase = decided is not None
    _reduce_kernel[(B * Hq,)](
        partials.o, partials.lse, partials.plan, keys, radius_sq,
        hit_buf, matched_buf, report["distance"], report["keys_read"], report["candidate"], report["mass_share"], report["context"],
        decided.hit if two_phase else None, decided.mass_share if two_phase else None,
        prefix.o if two_phase else None, prefix.lse if two_phase else None, prefix.plan if two_phase else None,
        *rings, written["chain_depth"], q_pre, out, lse,
        returned["cached_o"], returned["cached_lse"], returned["rest_o"], returned["rest_lse"], written["ill_conditioned"],
        *ring_strides, *q_strides, stride_mb, stride_mh,
        kv_heads, Hq // kv_heads, band, min_context, state.window if state is not None else 1, removal_epsilon(f32),
        BAND_SOURCE=band_source, ROW_OUT=row_out, SUBTRACT=subtract, RULE=rule, DECIDED=two_phase,
        D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_U=launch.reduce_units, num_warps=4,
    )
    if report["hit"] is not None:
        report["hit"] = report["hit"].view(torch.bool)
        report["candidate"] = report["candidate"].view(torch.bool)
    if written["ill_conditioned"] is not None:
        written["ill_conditioned"] = written["ill_conditioned"].view(torch.bool)
    return Reduced(out, lse, **report, **returned, **written)
