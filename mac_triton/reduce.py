r"""The reduce kernels: one program per query head merges its partial states into the step's result.

Per (request, query head): ⊕ of its band units into ``C`` (with the cached row
``R_{j*}`` on a hit), ⊕ of its sink and tail units into ``rest``, and
``out = C ⊕ rest``. One kernel per caller, over shared ``@triton.jit`` pieces
(:func:`fold_units`, :func:`ring_row`, :func:`write_row`, :func:`merge`):

- :func:`_full_reduce_kernel` (:func:`mac_triton.full_decode`): every unit into ``out``;
- :func:`_spans_reduce_kernel` (:func:`mac_triton.amend_complete`): the given decisions,
  ``C`` and ``rest`` returned beside ``out``;
- :func:`_step_reduce_kernel` (the fused decode step): decodes the match (candidate,
  ``j*``, distance) and applies the rule (:mod:`mac_triton.accept`), or, for a rule that
  verifies its candidates (``VERIFY``), reads the prefix kernel's verdict and gives a head
  that does not reuse its prefix (``C = A(q_t, [S, P)) ⊕ band``: exact, from the band
  units' states below its start and the prefix units); it reports the decisions, ``w``
  and the keys read, writes ``(q̃_t, R_t)`` and the row's chain depth into the rings
  (``split``: ``R_t = C``; ``subtract``: ``R_t = out ⊖ rest``) and leaves the workspace
  clean for the next step (the match keys).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mac_core.numerics import removal_epsilon

from .accept import accept_candidate, mass_share
from .attend import Partials
from .match import NO_CANDIDATE, decode_key
from .numerics import merge_weights, online_finish, online_merge, remove_weights
from .plan import (
    PLAN_BAND_UNITS, PLAN_FIRST, PLAN_PREFIX_FIRST, PLAN_PREFIX_UNITS, PLAN_SINK_END, PLAN_SINK_UNITS, PLAN_TAIL_END,
    PLAN_UNITS, band_start, plan_field,
)

_NO_CANDIDATE: tl.constexpr = tl.constexpr(NO_CANDIDATE)


class Reduced(NamedTuple):
    """The step reduce kernel's results (:func:`launch_step_reduce`).

    Attributes:
        out, lse: ``[B, Hq, D]`` output (in the requested dtype) and ``[B, Hq]`` float32 LSE.
        hit, matched_pos, distance, keys_read, candidate, mass_share: ``[B, Hq]`` bool,
            int64, float32, int64, bool, float32; context: ``[B]`` int64 ``t + 1``.
        ill_conditioned, chain_depth: ``[B, Hq]`` bool and int64 of the written row.
    """

    out: torch.Tensor
    lse: torch.Tensor
    hit: torch.Tensor
    matched_pos: torch.Tensor
    distance: torch.Tensor
    keys_read: torch.Tensor
    candidate: torch.Tensor
    mass_share: torch.Tensor
    context: torch.Tensor
    ill_conditioned: torch.Tensor
    chain_depth: torch.Tensor


@triton.jit
def fold_units(o_ptr, lse_ptr, first, n, lane, G, in_lo, in_hi, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_U: tl.constexpr):
    """⊕ of one head's (``lane`` of its group) partial states of units ``[first, first + n)``:
    ``(o_in, lse_in, o_out, lse_out)``, the units ``first + i`` with ``i ∈ [in_lo, in_hi)``
    and the others, each ``(0, −inf)`` when empty."""
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    m_in = tl.full((), float("-inf"), tl.float32)
    den_in = tl.zeros((), tl.float32)
    acc_in = tl.zeros([BLOCK_D], tl.float32)
    m_out = tl.full((), float("-inf"), tl.float32)
    den_out = tl.zeros((), tl.float32)
    acc_out = tl.zeros([BLOCK_D], tl.float32)
    for u0 in range(0, n, BLOCK_U):
        local = u0 + tl.arange(0, BLOCK_U)
        unit_mask = local < n
        part = (first + local).to(tl.int64) * G + lane
        lse = tl.load(lse_ptr + part, mask=unit_mask, other=float("-inf"))
        o = tl.load(o_ptr + part[:, None] * D + cols[None, :], mask=unit_mask[:, None] & col_mask[None, :], other=0.0)
        inside = (local >= in_lo) & (local < in_hi)
        m_in, den_in, acc_in = online_merge(m_in, den_in, acc_in, tl.where(inside, lse, float("-inf")), o)
        m_out, den_out, acc_out = online_merge(m_out, den_out, acc_out, tl.where(inside, float("-inf"), lse), o)
    o_in, lse_in = online_finish(m_in, den_in, acc_in)
    o_out, lse_out = online_finish(m_out, den_out, acc_out)
    return o_in, lse_in, o_out, lse_out


@triton.jit
def merge(o_a, lse_a, o_b, lse_b):
    """``(o, lse)`` of ``(o_a, lse_a) ⊕ (o_b, lse_b)``."""
    w_a, w_b, lse = merge_weights(lse_a, lse_b)
    return w_a * o_a + w_b * o_b, lse


@triton.jit
def ring_row(ring_o_ptr, ring_lse_ptr, b, h, slot, stride_rob, stride_roh, stride_row, stride_rlb, stride_rlh, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """The row ``(o [BLOCK_D], lse)`` in ring slot ``slot`` of head ``(b, h)``."""
    cols = tl.arange(0, BLOCK_D)
    o = tl.load(ring_o_ptr + b.to(tl.int64) * stride_rob + h * stride_roh + slot * stride_row + cols, mask=cols < D, other=0.0)
    return o, tl.load(ring_lse_ptr + b * stride_rlb + h * stride_rlh + slot)


@triton.jit
def write_row(
    ring_q_ptr, ring_o_ptr, ring_lse_ptr, ring_depth_ptr, b, h, slot, q_pre, o, lse, depth,
    stride_rqb, stride_rqh, stride_rqw, stride_rob, stride_roh, stride_row, stride_rlb, stride_rlh, stride_rdb, stride_rdh,
    D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Write ``(q̃, o, lse, depth)`` into ring slot ``slot`` of head ``(b, h)``."""
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    tl.store(ring_q_ptr + b.to(tl.int64) * stride_rqb + h * stride_rqh + slot * stride_rqw + cols, q_pre, mask=col_mask)
    tl.store(ring_o_ptr + b.to(tl.int64) * stride_rob + h * stride_roh + slot * stride_row + cols, o, mask=col_mask)
    tl.store(ring_lse_ptr + b * stride_rlb + h * stride_rlh + slot, lse)
    tl.store(ring_depth_ptr + b * stride_rdb + h * stride_rdh + slot, depth)


@triton.jit
def _full_reduce_kernel(part_o_ptr, part_lse_ptr, plan_ptr, out_ptr, lse_ptr, Hkv, G, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_U: tl.constexpr):
    bh = tl.program_id(0)
    grp = bh // G  # (b·Hq + h) // G = b·Hkv + h // G
    n = plan_field(plan_ptr, grp, PLAN_UNITS)
    o, lse, _, _ = fold_units(part_o_ptr, part_lse_ptr, plan_field(plan_ptr, grp, PLAN_FIRST), n, bh % G, G, 0, n, D, BLOCK_D, BLOCK_U)
    cols = tl.arange(0, BLOCK_D)
    tl.store(out_ptr + bh.to(tl.int64) * D + cols, o, mask=cols < D)
    tl.store(lse_ptr + bh, lse)


@triton.jit
def _spans_reduce_kernel(
    part_o_ptr, part_lse_ptr, plan_ptr, hit_ptr, matched_ptr, stride_mb, stride_mh,
    ring_o_ptr, ring_lse_ptr, stride_rob, stride_roh, stride_row, stride_rlb, stride_rlh, W,
    out_ptr, lse_ptr, c_o_ptr, c_lse_ptr, rest_o_ptr, rest_lse_ptr, Hkv, G,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_U: tl.constexpr,
):
    bh = tl.program_id(0)
    Hq = Hkv * G
    b = bh // Hq
    h = bh % Hq
    grp = bh // G
    n_sink = plan_field(plan_ptr, grp, PLAN_SINK_UNITS)
    c_o, c_lse, rest_o, rest_lse = fold_units(
        part_o_ptr, part_lse_ptr, plan_field(plan_ptr, grp, PLAN_FIRST), plan_field(plan_ptr, grp, PLAN_UNITS), h % G, G,
        n_sink, n_sink + plan_field(plan_ptr, grp, PLAN_BAND_UNITS), D, BLOCK_D, BLOCK_U,
    )
    hit = tl.load(hit_ptr + b * stride_mb + h * stride_mh) != 0
    matched = tl.load(matched_ptr + b * stride_mb + h * stride_mh).to(tl.int64)
    row_o, row_lse = ring_row(ring_o_ptr, ring_lse_ptr, b, h, ((matched % W) + W) % W, stride_rob, stride_roh, stride_row, stride_rlb, stride_rlh, D, BLOCK_D)
    c_o, c_lse = merge(row_o, tl.where(hit, row_lse, float("-inf")), c_o, c_lse)  # C = R_{j*} ⊕ band on a hit
    o, lse = merge(c_o, c_lse, rest_o, rest_lse)
    cols = tl.arange(0, BLOCK_D)
    at = bh.to(tl.int64) * D + cols
    tl.store(out_ptr + at, o, mask=cols < D)
    tl.store(lse_ptr + bh, lse)
    tl.store(c_o_ptr + at, c_o, mask=cols < D)
    tl.store(c_lse_ptr + bh, c_lse)
    tl.store(rest_o_ptr + at, rest_o, mask=cols < D)
    tl.store(rest_lse_ptr + bh, rest_lse)


@triton.jit
def _step_reduce_kernel(
    part_o_ptr, part_lse_ptr, plan_ptr, below_o_ptr, below_lse_ptr, key_ptr, radius_ptr, rule_radius_ptr,
    verdict_hit_ptr, verdict_share_ptr,
    hit_ptr, matched_ptr, dist_ptr, keys_read_ptr, candidate_ptr, share_ptr, context_ptr, depth_out_ptr, ill_ptr,
    ring_q_ptr, ring_o_ptr, ring_lse_ptr, ring_depth_ptr, q_pre_ptr, out_ptr, lse_ptr,
    stride_rqb, stride_rqh, stride_rqw, stride_rob, stride_roh, stride_row, stride_rlb, stride_rlh, stride_rdb, stride_rdh,
    stride_qb, stride_qh, Hkv, G, band, min_context, W, eps,
    RULE: tl.constexpr, VERIFY: tl.constexpr, SUBTRACT: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_U: tl.constexpr,
):
    bh = tl.program_id(0)
    Hq = Hkv * G
    b = bh // Hq
    h = bh % Hq
    grp = bh // G
    lane = h % G
    sink_end = plan_field(plan_ptr, grp, PLAN_SINK_END)
    t = plan_field(plan_ptr, grp, PLAN_TAIL_END) - 1
    first = plan_field(plan_ptr, grp, PLAN_FIRST)
    n_sink = plan_field(plan_ptr, grp, PLAN_SINK_UNITS)
    n_band = plan_field(plan_ptr, grp, PLAN_BAND_UNITS)
    c_o, c_lse, rest_o, rest_lse = fold_units(
        part_o_ptr, part_lse_ptr, first, plan_field(plan_ptr, grp, PLAN_UNITS), lane, G, n_sink, n_sink + n_band, D, BLOCK_D, BLOCK_U,
    )  # the band; sinks ⊕ tail
    candidate, matched, dist = decode_key(tl.load(key_ptr + bh), t, min_context, tl.load(radius_ptr + h))
    matched_slot = ((matched % W) + W) % W
    row_o, row_lse = ring_row(ring_o_ptr, ring_lse_ptr, b, h, matched_slot, stride_rob, stride_roh, stride_row, stride_rlb, stride_rlh, D, BLOCK_D)
    if VERIFY:  # the prefix kernel decided; a head that does not reuse has its prefix [S, P) instead of the row
        hit = tl.load(verdict_hit_ptr + bh) != 0
        w = tl.load(verdict_share_ptr + bh)
        below_o, below_lse, _, _ = fold_units(below_o_ptr, below_lse_ptr, first + n_sink, n_band, lane, G, 0, n_band, D, BLOCK_D, BLOCK_U)
        n_prefix = plan_field(plan_ptr, grp, PLAN_PREFIX_UNITS)
        prefix_o, prefix_lse, _, _ = fold_units(
            part_o_ptr, part_lse_ptr, plan_field(plan_ptr, grp, PLAN_PREFIX_FIRST), n_prefix, lane, G, 0, n_prefix, D, BLOCK_D, BLOCK_U,
        )
        prefix_o, prefix_lse = merge(prefix_o, prefix_lse, below_o, below_lse)
        reused_o = tl.where(hit, row_o, prefix_o)  # a head that does not reuse: its prefix, read by the prefix kernel
        reused_lse = tl.where(hit, row_lse, prefix_lse)
    else:
        _, fresh_lse = merge(c_o, c_lse, rest_o, rest_lse)  # what the step read with the current query
        w = mass_share(candidate, row_lse, fresh_lse)
        hit = accept_candidate(candidate, dist, tl.load(rule_radius_ptr + h), w, RULE)
        reused_o = row_o
        reused_lse = tl.where(hit, row_lse, float("-inf"))
    c_o, c_lse = merge(reused_o, reused_lse, c_o, c_lse)
    o, lse = merge(c_o, c_lse, rest_o, rest_lse)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    tl.store(out_ptr + bh.to(tl.int64) * D + cols, o, mask=col_mask)
    tl.store(lse_ptr + bh, lse)

    # the match report; the key workspace is left clean for the next step
    tl.store(hit_ptr + bh, hit.to(tl.int8))
    tl.store(matched_ptr + bh, matched)
    tl.store(dist_ptr + bh, dist)
    tl.store(keys_read_ptr + bh, sink_end + (t + 1 - band_start(hit, matched, band, sink_end)))
    tl.store(candidate_ptr + bh, candidate.to(tl.int8))
    tl.store(share_ptr + bh, w)
    if h == 0:  # the request's context, t + 1 keys (written here: no launch of its own)
        tl.store(context_ptr + b, t + 1)
    tl.store(key_ptr + bh, _NO_CANDIDATE)

    if SUBTRACT:  # R_t = out ⊖ (sinks ⊕ tail)
        c_out, c_rest, row_lse_new, ill = remove_weights(lse, rest_lse, eps)
        row_o_new = c_out * o - c_rest * rest_o
    else:  # R_t = C, never ill-conditioned
        row_o_new = c_o
        row_lse_new = c_lse
        ill = tl.zeros((), tl.int1)
    # the new row's chain depth: one link more than the reused row's, 0 after a miss
    depth = tl.where(hit, tl.load(ring_depth_ptr + b * stride_rdb + h * stride_rdh + matched_slot) + 1, 0)
    q_pre = tl.load(q_pre_ptr + b * stride_qb + h * stride_qh + cols, mask=col_mask)
    write_row(
        ring_q_ptr, ring_o_ptr, ring_lse_ptr, ring_depth_ptr, b, h, t % W, q_pre, row_o_new, row_lse_new, depth,
        stride_rqb, stride_rqh, stride_rqw, stride_rob, stride_roh, stride_row, stride_rlb, stride_rlh, stride_rdb, stride_rdh, D, BLOCK_D,
    )
    tl.store(depth_out_ptr + bh, depth.to(tl.int64))
    tl.store(ill_ptr + bh, ill.to(tl.int8))


def _ring_strides(state) -> dict:
    """The rings' batch, head (and slot) strides as the kernels' keyword arguments."""
    return dict(
        stride_rob=state.ring_o.stride(0), stride_roh=state.ring_o.stride(1), stride_row=state.ring_o.stride(2),
        stride_rlb=state.ring_lse.stride(0), stride_rlh=state.ring_lse.stride(1),
    )


def launch_full_reduce(partials: Partials, launch, *, out_dtype: torch.dtype, batch: int, q_heads: int, kv_heads: int, head_dim: int):
    """``(out [B, Hq, D] in out_dtype, lse [B, Hq] float32)`` of a full decode's partial states."""
    device = partials.o.device
    out = torch.empty(batch, q_heads, head_dim, dtype=out_dtype, device=device)
    lse = torch.empty(batch, q_heads, dtype=torch.float32, device=device)
    _full_reduce_kernel[(batch * q_heads,)](
        part_o_ptr=partials.o, part_lse_ptr=partials.lse, plan_ptr=partials.plan, out_ptr=out, lse_ptr=lse,
        Hkv=kv_heads, G=q_heads // kv_heads, D=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_U=launch.reduce_units,
        num_warps=4,
    )
    return out, lse


def launch_spans_reduce(partials: Partials, launch, *, result, state, batch: int, q_heads: int, kv_heads: int, head_dim: int):
    """``(out, C, rest)``, each ``(o [B, Hq, D], lse [B, Hq])`` float32, of given decisions
    (``result``: a :class:`~mac_core.step.MatchResult`) over the rings of ``state``."""
    device = partials.o.device
    B, Hq, D = batch, q_heads, head_dim
    summaries = [(torch.empty(B, Hq, D, device=device), torch.empty(B, Hq, device=device)) for _ in range(3)]
    hit, matched = result.hit.view(torch.int8), result.matched_pos
    if hit.stride() != matched.stride():
        hit, matched = hit.contiguous(), matched.contiguous()
    (out, lse), (c_o, c_lse), (rest_o, rest_lse) = summaries
    _spans_reduce_kernel[(B * Hq,)](
        part_o_ptr=partials.o, part_lse_ptr=partials.lse, plan_ptr=partials.plan, hit_ptr=hit, matched_ptr=matched,
        stride_mb=hit.stride(0), stride_mh=hit.stride(1), ring_o_ptr=state.ring_o, ring_lse_ptr=state.ring_lse,
        **_ring_strides(state), W=state.window, out_ptr=out, lse_ptr=lse, c_o_ptr=c_o, c_lse_ptr=c_lse,
        rest_o_ptr=rest_o, rest_lse_ptr=rest_lse, Hkv=kv_heads, G=Hq // kv_heads,
        D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_U=launch.reduce_units, num_warps=4,
    )
    return summaries


def launch_step_reduce(
    partials: Partials, launch, *, q_pre, state, workspace, config, out_dtype: torch.dtype, kv_heads: int,
) -> Reduced:
    """Merge a decode step's partial states, decide (a one-phase rule) and write the rings
    (no validation, no host sync).

    Args:
        partials: :func:`mac_triton.attend.launch_attend`'s output for the same step (band source ``"match"``;
            with ``verdicts`` for a verifying rule).
        launch: the launch settings (``reduce_units``).
        q_pre: ``[B, Hq, D]`` pre-RoPE queries (the rings' new rows).
        state: the rings, written in place.
        workspace: the step's :class:`~mac_triton.decode.DecodeWorkspace` (match keys and
            radii), its keys left clean for the next step.
        config: the :class:`~mac_core.config.MACConfig` (band, min_context, row rule, rule).
        out_dtype: dtype of ``out``.
        kv_heads: ``Hkv``.

    Returns:
        :class:`Reduced`.
    """
    B, Hq, D = q_pre.shape
    device = q_pre.device
    f32, i64, i8 = torch.float32, torch.int64, torch.int8
    res = Reduced(
        out=torch.empty(B, Hq, D, dtype=out_dtype, device=device), lse=torch.empty(B, Hq, dtype=f32, device=device),
        hit=torch.empty(B, Hq, dtype=i8, device=device), matched_pos=torch.empty(B, Hq, dtype=i64, device=device),
        distance=torch.empty(B, Hq, dtype=f32, device=device), keys_read=torch.empty(B, Hq, dtype=i64, device=device),
        candidate=torch.empty(B, Hq, dtype=i8, device=device), mass_share=torch.empty(B, Hq, dtype=f32, device=device),
        context=torch.empty(B, dtype=i64, device=device), ill_conditioned=torch.empty(B, Hq, dtype=i8, device=device),
        chain_depth=torch.empty(B, Hq, dtype=i64, device=device),
    )
    verdicts = partials.verdicts
    _step_reduce_kernel[(B * Hq,)](
        part_o_ptr=partials.o, part_lse_ptr=partials.lse, plan_ptr=partials.plan, below_o_ptr=partials.below_o,
        below_lse_ptr=partials.below_lse, key_ptr=workspace.keys, radius_ptr=workspace.radius_sq,
        rule_radius_ptr=workspace.rule_radius_sq, verdict_hit_ptr=verdicts.hit if verdicts else None,
        verdict_share_ptr=verdicts.mass_share if verdicts else None,
        hit_ptr=res.hit, matched_ptr=res.matched_pos, dist_ptr=res.distance, keys_read_ptr=res.keys_read,
        candidate_ptr=res.candidate, share_ptr=res.mass_share, context_ptr=res.context, depth_out_ptr=res.chain_depth,
        ill_ptr=res.ill_conditioned, ring_q_ptr=state.ring_q, ring_o_ptr=state.ring_o, ring_lse_ptr=state.ring_lse,
        ring_depth_ptr=state.ring_depth, q_pre_ptr=q_pre, out_ptr=res.out, lse_ptr=res.lse,
        stride_rqb=state.ring_q.stride(0), stride_rqh=state.ring_q.stride(1), stride_rqw=state.ring_q.stride(2),
        **_ring_strides(state), stride_rdb=state.ring_depth.stride(0), stride_rdh=state.ring_depth.stride(1),
        stride_qb=q_pre.stride(0), stride_qh=q_pre.stride(1), Hkv=kv_heads, G=Hq // kv_heads, band=config.band,
        min_context=config.min_context, W=state.window, eps=removal_epsilon(f32),
        RULE=config.rule.name, VERIFY=verdicts is not None, SUBTRACT=config.row_update == "subtract",
        D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_U=launch.reduce_units, num_warps=4,
    )
    return res._replace(
        hit=res.hit.view(torch.bool), candidate=res.candidate.view(torch.bool), ill_conditioned=res.ill_conditioned.view(torch.bool)
    )
