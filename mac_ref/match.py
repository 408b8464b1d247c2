r"""Match: find, per query head, the most similar recent pre-RoPE query, and apply the distance test.

For the token at position ``t`` the candidates are the tokens ``j ∈ [max(0, t−W), t)``,
whose pre-RoPE queries sit in ring slots ``j mod W``:

.. math::
    d_j = \lVert \tilde q_t - \tilde q_j \rVert^2, \qquad
    j^* = \arg\min_j d_j, \qquad
    \text{candidate} \iff d_{j^*} < 2D(1-\tau)^2 \, s_h^2 .

``s_h = 1`` is the paper's rule; ``config.radius_scale`` sets one factor per query head.
With ``config.group_match`` the heads of a KV group share one row, the nearest in the sum
of their distances, ``j*_g = argmin_j Σ_{h∈g} d_j^{(h)}``; each head keeps its own distance
``d^{(h)}_{j*_g}`` for the test.
With ``config.max_chain = K`` rows of reuse-chain depth ``≥ K`` are not candidates. The
acceptance rule (:mod:`mac_ref.accept`) takes the candidates from here; the paper's rule
accepts them all.

Ties go to the most recent ``j`` (the smallest lag: fewer keys to recompute and less RoPE
drift). Distances use the raw vectors, accumulated in float32 (float64 for float64
inputs). Matching is on *pre*-RoPE queries because RoPE rotates two identical queries
apart by their position gap. Spec: [match][spec-match].
"""

from __future__ import annotations

import math

import torch

from mac_core.checks import check_group
from mac_core.config import MACConfig
from mac_core.numerics import compute_dtype
from mac_core.state import LayerState
from mac_core.step import MatchResult


def find_match(
    q_pre: torch.Tensor, state: LayerState, positions: torch.Tensor, config: MACConfig, kv_heads: int | None = None
) -> MatchResult:
    """Match each query head against its ring window.

    A stage of :func:`mac_ref.decode.decode_step`, which validates the arguments.

    Args:
        q_pre: ``[B, Hq, D]`` pre-RoPE queries of the tokens at ``positions``.
        state: the layer's rings; rows of tokens ``< positions`` must have been written.
        positions: ``[B]`` int64: the current position ``t`` of each request.
        config: window ``W`` (must equal the ring size), ``τ``, ``radius_scale``,
            ``min_context``, ``max_chain`` and ``group_match``.
        kv_heads: ``Hkv``, the KV groups of ``config.group_match`` (needed only there).

    Returns:
        :class:`~mac_core.step.MatchResult`; ``hit`` holds the distance test. Steps at
        ``t < min_context`` report their nearest candidate but never pass.
    """
    B, Hq, D = q_pre.shape
    W = state.window
    dtype = compute_dtype(q_pre.dtype)

    lags = torch.arange(1, W + 1, device=q_pre.device)  # [W], most recent first
    candidates = positions[:, None] - lags  # [B, W] token positions j = t - lag
    in_window = candidates >= 0  # rows of tokens before position 0 do not exist
    slots = torch.remainder(candidates, W)  # [B, W]

    ring = state.ring_q.gather(2, slots[:, None, :, None].expand(B, Hq, W, D))  # [B, Hq, W, D]
    dist = ((q_pre.to(dtype)[:, :, None, :] - ring.to(dtype)) ** 2).sum(-1)  # [B, Hq, W]
    dist = dist.masked_fill(~in_window[:, None, :], math.inf)
    if config.max_chain is not None:  # rows at the end of a long reuse chain are not candidates
        depth = state.ring_depth.gather(2, slots[:, None, :].expand(B, Hq, W))  # [B, Hq, W]
        dist = dist.masked_fill(depth >= config.max_chain, math.inf)

    if config.group_match:  # one row per KV group: the nearest in the sum of its heads' distances
        group = check_group(Hq, kv_heads)
        group_dist = dist.view(B, Hq // group, group, W).sum(2)  # [B, Hkv, W]; inf where a head may not reuse
        best = group_dist.argmin(dim=-1, keepdim=True)  # [B, Hkv, 1]: first minimum = most recent j
        has_candidate = torch.isfinite(group_dist.gather(-1, best)).squeeze(-1).repeat_interleave(group, dim=1)  # [B, Hq]
        best_lag_index = best.squeeze(-1).repeat_interleave(group, dim=1)  # [B, Hq]
    else:
        best_lag_index = dist.argmin(dim=-1)  # first minimum = smallest lag = most recent j
    distance = dist.gather(-1, best_lag_index[..., None]).squeeze(-1)  # [B, Hq]
    matched_pos = candidates.gather(1, best_lag_index)  # [B, Hq]
    if not config.group_match:
        has_candidate = torch.isfinite(distance)
    distance = torch.where(has_candidate, distance, math.inf)
    matched_pos = torch.where(has_candidate, matched_pos, torch.full_like(matched_pos, -1))

    radius_sq = torch.tensor(config.radius_sq_per_head(Hq, D), dtype=dtype, device=q_pre.device)  # [Hq]
    eligible = (positions >= config.min_context)[:, None]  # [B, 1]
    hit = has_candidate & eligible & (distance < radius_sq)
    return MatchResult(hit, matched_pos, distance)

