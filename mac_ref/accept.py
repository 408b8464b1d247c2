r"""Accept: the acceptance rule decides which candidates of the match reuse their row.

The match stage's distance test gives the candidates (:mod:`mac_ref.match`). For each
candidate this stage also measures the share of the step's attention mass its row would
carry. With ``P = max(E(j*), S)`` the step reads ``[0, S)`` and ``[P, t+1)`` with the
current query anyway (sinks, band, tail):

.. math::
    \ell_{fresh} = \log\big(e^{\ell(A(q_t, [0, S)))} + e^{\ell(A(q_t, [P, t+1)))}\big), \qquad
    w = \sigma(\ell_{row} - \ell_{fresh}).

The rule of ``config.rule`` (:mod:`mac_core.rules`) then decides per (request, query head):

- :class:`~mac_core.rules.PaperRule`: every candidate is a hit;
- :class:`~mac_core.rules.MassRule`: a candidate is a hit iff ``d · w² < 2D(1 − τ_m)² s_h²``;
- ``per_group``: a KV group's heads hit only if all of them would. A group with a head that
  has no candidate therefore misses whole, and nothing of it is measured (``w = 0``): a
  kernel reads it as a miss, without keeping each candidate's prefix apart.

A rejected candidate becomes a miss, whose ranges cover the whole prefix: it is exact.
Spec: [acceptance rules][spec-acceptance].
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mac_core.config import MACConfig
from mac_core.state import LayerState
from mac_core.step import MatchResult, Summary, step_spans

from .summary import attend, merge


class Decision(NamedTuple):
    """The rule's verdict for one step.

    Attributes:
        result: the match with ``hit`` narrowed to the accepted candidates (same ``j*``, distances).
        candidate: ``[B, Hq]`` bool: the distance test's verdict (``hit ⊆ candidate``).
        mass_share: ``[B, Hq]`` ``w`` of each candidate's row; 0 where there is no candidate.
    """

    result: MatchResult
    candidate: torch.Tensor
    mass_share: torch.Tensor


def mass_share(result: MatchResult, state: LayerState, q_post, k_cache, v_cache, positions, config: MACConfig, scale: float,
               rest: Summary) -> torch.Tensor:
    """``w = σ(ℓ_row − ℓ_fresh)`` of each candidate's row, ``[B, Hq]`` (0 where there is none).

    ``rest``: the step's sinks ⊕ tail (:func:`mac_ref.complete.edge_summaries`); the band
    ``[P, N)`` of each candidate completes ``ℓ_fresh``.
    """
    spans = step_spans(positions, result, config)
    fresh = merge(rest, attend(q_post, k_cache, v_cache, spans.band_start, spans.band_end, scale, config.softcap))  # ⊕ the band
    row_lse = state.rows(result.matched_pos.clamp(min=0)).lse.to(fresh.lse.dtype)
    share = torch.sigmoid(row_lse - fresh.lse)  # an empty row (−inf) carries nothing: 0
    return torch.where(result.hit, share, torch.zeros_like(share))


def accept_candidates(config: MACConfig, result: MatchResult, state: LayerState, q_post, k_cache, v_cache, positions, scale: float,
                      rest: Summary) -> Decision:
    """The rule's decision for the candidates of ``result`` (``hit`` = the distance test).

    A stage of :func:`mac_ref.decode.decode_step`, which validates the arguments.

    Args:
        config: the rule (``config.rule``) and its knobs (``config.softcap`` caps the scores
            of ``ℓ_fresh``).
        result: the match, ``hit`` = the candidates.
        state: the rings (the candidates' rows).
        q_post: ``[B, Hq, D]`` post-RoPE queries; ``k_cache``, ``v_cache``: ``[B, Hkv, T, D]``.
        positions: ``[B]`` int64 positions ``t``.
        scale: softmax scale.
        rest: the step's sinks ⊕ tail (:func:`mac_ref.complete.edge_summaries`): a step
            attends them once, for the rule and for the output.

    Returns:
        :class:`Decision`.
    """
    rule = config.rule
    candidate = result.hit
    B, Hq, D = q_post.shape
    groups = (B, k_cache.shape[1], -1)  # [B, Hkv, G]
    share = mass_share(result, state, q_post, k_cache, v_cache, positions, config, scale, rest)
    if rule.per_group:  # a group with a head that has no candidate cannot reuse: it is not measured
        share = (share.view(groups) * candidate.view(groups).all(dim=-1, keepdim=True)).view_as(share)
    if rule.name == "paper":
        hit = candidate
    elif rule.name == "mass":
        radius_sq = torch.tensor(config.radius_sq_per_head(Hq, D, tau=rule.tau_m), dtype=result.distance.dtype, device=q_post.device)
        w = share.to(result.distance.dtype)
        hit = candidate & (result.distance * w * w < radius_sq)  # sqrt(d / 2D) · w / s_h < 1 − τ_m, squared
    else:  # pragma: no cover - MACConfig admits only the rules of mac_core.rules.RULES
        raise ValueError(f"mac_ref.accept has no decision for the rule {rule.name!r}")
    if rule.per_group:  # a group reuses only if each of its heads would
        hit = (hit.view(groups) & hit.view(groups).all(dim=-1, keepdim=True)).view_as(hit)
    return Decision(result._replace(hit=hit), candidate, share)
