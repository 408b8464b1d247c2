r"""The decision of a step whose rule verifies its candidates, taken by the prefix kernel.

The fresh kernel (:mod:`mac_triton.attend`) reads every head's sinks, band and tail with
the current query. Each program of the prefix kernel that follows calls
:func:`decide_group` for its GQA group, which takes, per head, the LSE of all the group's
units (``ℓ_fresh``), the matched row's LSE, ``w = σ(ℓ_row − ℓ_fresh)`` and the rule's
verdict (:func:`mac_triton.accept.accept_candidate`; with ``per_group`` a group keeps its
hits only if all of its heads accept, and a group with a head that has no candidate misses
whole, its ``w`` unmeasured: 0). A head that does not reuse then needs its prefix
``[S, P)``: ``P = max(E(j*), S)`` for a rejected candidate, ``P = N`` for a head without one
(its band is empty), which the same program reads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .accept import accept_candidate, mass_share
from .plan import all_lanes, head_match

class Verdicts(NamedTuple):
    """A verifying step's decisions, each ``[B·Hq]``, written by the prefix kernel.

    Attributes:
        hit: int8 (1: the row is reused).
        candidate: int8 (1: the distance test passed).
        mass_share: float32 ``w`` (0 where there is no candidate).
    """

    hit: torch.Tensor
    candidate: torch.Tensor
    mass_share: torch.Tensor

    @classmethod
    def empty(cls, n: int, device) -> "Verdicts":
        return cls(
            torch.empty(n, dtype=torch.int8, device=device), torch.empty(n, dtype=torch.int8, device=device),
            torch.empty(n, dtype=torch.float32, device=device),
        )


@triton.jit
def decide_group(
    part_lse_ptr, g_first, g_units, b, heads, lanes, lane_mask, t, key_ptr, radius_ptr, rule_radius_ptr,
    ring_lse_ptr, stride_rlb, stride_rlh, hit_ptr, candidate_ptr, share_ptr, Hq, G, min_context, W, write,
    RULE: tl.constexpr, PER_GROUP: tl.constexpr, BLOCK_U: tl.constexpr,
):
    """Decide the group's heads (``heads`` ``[G_PAD]``, request ``b``, ``t``) from its
    ``g_units`` stored units; write the verdicts if ``write``; return the heads that read
    their prefix ``[G_PAD]``: every head that does not reuse (a rejected candidate, or none)."""
    m = tl.full(lanes.shape, float("-inf"), tl.float32)  # ℓ_fresh: log-sum-exp of the group's units, per head
    den = tl.zeros(lanes.shape, tl.float32)
    for u0 in range(0, g_units, BLOCK_U):
        local = u0 + tl.arange(0, BLOCK_U)
        part = (g_first + local).to(tl.int64)[:, None] * G + lanes[None, :]
        lse = tl.load(part_lse_ptr + part, mask=(local < g_units)[:, None] & lane_mask[None, :], other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        den = den * tl.exp(m - m_safe) + tl.sum(tl.exp(lse - m_safe[None, :]), axis=0)
        m = m_new
    fresh_lse = tl.where(m == float("-inf"), 0.0, m) + tl.log(den)

    candidate, matched, dist = head_match(b, heads, lane_mask, t + 1, key_ptr, radius_ptr, Hq, min_context)
    measured = candidate
    if PER_GROUP:  # a group with a head that has no candidate misses whole: its w is not measured (the attend kernel kept nothing apart)
        measured = candidate & all_lanes(candidate, lane_mask)
    slot = ((matched % W) + W) % W
    row_lse = tl.load(ring_lse_ptr + b * stride_rlb + heads * stride_rlh + slot, mask=lane_mask & measured, other=float("-inf"))
    w = mass_share(measured, row_lse, fresh_lse)
    hit = accept_candidate(measured, dist, tl.load(rule_radius_ptr + heads, mask=lane_mask, other=0.0), w, RULE)
    if PER_GROUP:  # a group reuses only if each of its heads would
        hit = hit & all_lanes(hit, lane_mask)
    out = b * Hq + heads
    written = lane_mask & ((lanes * 0 + write.to(tl.int32)) != 0)  # (the interpreter refuses `mask & scalar`)
    tl.store(hit_ptr + out, hit.to(tl.int8), mask=written)
    tl.store(candidate_ptr + out, candidate.to(tl.int8), mask=written)
    tl.store(share_ptr + out, w, mask=written)
    return ~hit & lane_mask  # (a head without a candidate too: its band is empty, its prefix [S, N))
