r"""The decide kernel: between the two phases of a step whose rule verifies its candidates.

Phase 1 (:mod:`mac_triton.attend`, band source ``"match"``) read every head's sinks, band
and tail with the current query, for the distance test's candidates. One program per GQA
group then takes, per head, the LSE of all its phase-1 partial states (``ℓ_fresh``), the
matched row's LSE, ``w = σ(ℓ_row − ℓ_fresh)`` and the rule's verdict
(:func:`mac_triton.accept.accept_candidate`; with ``per_group`` a group keeps its hits only
if all of its heads accept). It writes the decisions and, per head, where phase 2 must stop
reading: ``P = max(E(j*), S)`` for a rejected candidate (its prefix ``[S, P)`` is the part
a miss reads that phase 1 did not), ``S`` for everyone else (nothing more to read).
Phase 2 is the attend kernel with band source ``"prefix"``; the reduce kernel merges both.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .accept import accept_candidate, mass_share
from .attend import Partials
from .match import NO_CANDIDATE, decode_key
from .plan import _PLAN_FIELDS

_NO_CANDIDATE: tl.constexpr = tl.constexpr(NO_CANDIDATE)


class Decided(NamedTuple):
    """The decide kernel's results, each ``[B·Hq]``.

    Attributes:
        hit: int8 (1: the row is reused).
        candidate: int8 (1: the distance test passed).
        mass_share: float32 ``w`` (0 where there is no candidate).
        prefix_end: int64 where phase 2 stops reading for the head (``S``: nothing to read).
    """

    hit: torch.Tensor
    candidate: torch.Tensor
    mass_share: torch.Tensor
    prefix_end: torch.Tensor


@triton.jit
def _decide_kernel(
    part_lse_ptr, plan_ptr, key_ptr, radius_ptr, rule_radius_ptr, ring_lse_ptr,
    hit_ptr, candidate_ptr, share_ptr, prefix_end_ptr,
    stride_rlb, stride_rlh, Hkv, G, band, min_context, W,
    RULE: tl.constexpr, PER_GROUP: tl.constexpr, G_PAD: tl.constexpr, BLOCK_U: tl.constexpr,
):
    grp = tl.program_id(0)
    b = grp // Hkv
    Hq = Hkv * G
    lanes = tl.arange(0, G_PAD)
    lane_mask = lanes < G
    heads = (grp % Hkv) * G + lanes  # [G_PAD]
    row = plan_ptr + grp * _PLAN_FIELDS
    g_first = tl.load(row + 0)
    g_units = tl.load(row + 3)
    sink_end = tl.load(row + 4)
    t = tl.load(row + 5) - 1

    m = tl.full([G_PAD], float("-inf"), tl.float32)  # ℓ_fresh: log-sum-exp of every phase-1 part, per head
    den = tl.zeros([G_PAD], tl.float32)
    for u0 in range(0, g_units, BLOCK_U):
        local = u0 + tl.arange(0, BLOCK_U)
        part = (g_first + local).to(tl.int64)[:, None] * G + lanes[None, :]
        lse = tl.load(part_lse_ptr + part, mask=(local < g_units)[:, None] & lane_mask[None, :], other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        den = den * tl.exp(m - m_safe) + tl.sum(tl.exp(lse - m_safe[None, :]), axis=0)
        m = m_new
    fresh_lse = tl.where(m == float("-inf"), 0.0, m) + tl.log(den)

    key = tl.load(key_ptr + b * Hq + heads, mask=lane_mask, other=_NO_CANDIDATE)
    radius_sq = tl.load(radius_ptr + heads, mask=lane_mask, other=0.0)
    candidate, matched, dist = decode_key(key, t, min_context, radius_sq)
    slot = ((matched % W) + W) % W
    row_lse = tl.load(ring_lse_ptr + b * stride_rlb + heads * stride_rlh + slot, mask=lane_mask & candidate, other=float("-inf"))
    w = mass_share(candidate, row_lse, fresh_lse)
    hit = accept_candidate(candidate, dist, tl.load(rule_radius_ptr + heads, mask=lane_mask, other=0.0), w, RULE)
    if PER_GROUP:  # a group reuses only if each of its heads would
        hit = hit & (tl.min(tl.where(lane_mask, hit.to(tl.int32), 1), axis=0) == 1)
    matched_end = tl.maximum(tl.maximum(matched + 1 - band, 0), sink_end)  # P = max(E(j*), S)
    prefix_end = tl.where(candidate & ~hit, matched_end, sink_end)
    out = b * Hq + heads
    tl.store(hit_ptr + out, hit.to(tl.int8), mask=lane_mask)
    tl.store(candidate_ptr + out, candidate.to(tl.int8), mask=lane_mask)
    tl.store(share_ptr + out, w, mask=lane_mask)
    tl.store(prefix_end_ptr + out, prefix_end, mask=lane_mask)


def launch_decide(
    partials: Partials, launch, *, keys, radius_sq, rule_radius_sq, state, batch: int, q_heads: int, kv_heads: int,
    band: int, min_context: int, rule: str, per_group: bool,
) -> Decided:
    """The rule's decisions after phase 1 (no validation, no host sync).

    Args:
        partials: phase 1's partial states and plan.
        launch: the launch settings (``reduce_units``).
        keys, radius_sq: the ``[B·Hq]`` match keys and the ``[Hq]`` squared radii of the distance test.
        rule_radius_sq: the ``[Hq]`` squared radii of the rule (``2D(1 − τ_m)² s_h²``).
        state: the rings (the matched rows' LSEs).
        batch, q_heads, kv_heads: ``B, Hq, Hkv``.
        band, min_context: the configuration's.
        rule: the rule's name; ``per_group``: the group-aware variant.
    """
    device = partials.o.device
    n = batch * q_heads
    decided = Decided(
        hit=torch.empty(n, dtype=torch.int8, device=device), candidate=torch.empty(n, dtype=torch.int8, device=device),
        mass_share=torch.empty(n, dtype=torch.float32, device=device), prefix_end=torch.empty(n, dtype=torch.int64, device=device),
    )
    G = q_heads // kv_heads
    _decide_kernel[(batch * kv_heads,)](
        partials.lse, partials.plan, keys, radius_sq, rule_radius_sq, state.ring_lse,
        decided.hit, decided.candidate, decided.mass_share, decided.prefix_end,
        state.ring_lse.stride(0), state.ring_lse.stride(1), kv_heads, G, band, min_context, state.window,
        RULE=rule, PER_GROUP=per_group, G_PAD=max(16, triton.next_power_of_2(G)), BLOCK_U=launch.reduce_units, num_warps=4,
    )
    return decided
