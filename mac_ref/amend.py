r"""Amend: turn a matched row into this step's summary of everything but the tail.

Let ``E(t) = max(t + 1 − r, 0)``. Row ``R_j`` summarises query ``j`` over ``[0, E(j))``
(all keys but its own last ``r``; with sinks, ``[min(F, E(j)), E(j))``). For the step at
``t`` with ``N = E(t)``:

.. math::
    \text{hit:}\quad C = R_{j^*} \oplus A(q_t, [P, N)), \quad P = E(j^*) \qquad
    \text{miss:}\quad C = A(q_t, [0, N))

The *band* ``[P, N)`` is the ``r`` keys before the match boundary plus the match lag
``t − j*``, recomputed with the current query: it corrects the reused row where attention
mass concentrates and where RoPE drift hurts most. Keys ``[0, P)`` are never read.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .config import MACConfig
from .match import MatchResult
from .state import LayerState
from .summary import Summary, attend, empty_summary, merge


def prefix_end(positions: torch.Tensor, band: int) -> torch.Tensor:
    """``E(t) = max(t + 1 − r, 0)``: the end of what token ``t``'s row covers."""
    return torch.clamp(positions + 1 - band, min=0)


class Spans(NamedTuple):
    """The key ranges of one decode step, each ``[B, Hq]`` int64 (half-open).

    ``[0, sink_end)`` sinks, ``[band_start, band_end)`` band, ``[band_end, tail_end)`` tail.
    The reused row (on a hit) covers ``[sink_end, band_start)``.
    """

    sink_end: torch.Tensor
    band_start: torch.Tensor
    band_end: torch.Tensor
    tail_end: torch.Tensor

    def keys_read(self) -> torch.Tensor:
        """Keys this step reads per head: sinks + band + tail."""
        return self.sink_end + (self.tail_end - self.band_start)


def step_spans(positions: torch.Tensor, result: MatchResult, config: MACConfig) -> Spans:
    """Sink, band and tail ranges for the tokens at ``positions [B]`` (SPEC §4).

    ``N = E(t)``, ``S = min(F, N)``; a hit's band starts at ``max(E(j*), S)``, a miss's at ``S``.
    """
    t = positions[:, None].expand_as(result.matched_pos)  # [B, Hq]
    band_end = prefix_end(t, config.band)  # N
    sink_end = torch.clamp(band_end, max=config.sinks)  # S = min(F, N)
    matched_end = prefix_end(result.matched_pos, config.band)  # P = E(j*)
    band_start = torch.where(result.hit, torch.maximum(matched_end, sink_end), sink_end)
    return Spans(sink_end, band_start, band_end, t + 1)


def amend(q_post, k_cache, v_cache, state: LayerState, result: MatchResult, spans: Spans, scale: float) -> Summary:
    """``C``: the reused row (hit) or nothing (miss), ⊕ the band recomputed with ``q_post``.

    Args:
        q_post: ``[B, Hq, D]`` post-RoPE queries.
        k_cache, v_cache: ``[B, Hkv, T, D]``.
        state: the rings; the row of ``result.matched_pos`` is read on hits.
        result: the match outcome.
        spans: from :func:`step_spans`.
        scale: softmax scale.

    Returns:
        ``C = Summary(o [B, Hq, D], lse [B, Hq])``, covering ``[sink_end, band_end)``.
    """
    B, Hq, D = q_post.shape
    row = state.rows(result.matched_pos.clamp(min=0))
    empty = empty_summary((B, Hq), D, dtype=row.o.dtype, device=q_post.device)
    reused = Summary(
        torch.where(result.hit[..., None], row.o, empty.o),
        torch.where(result.hit, row.lse, empty.lse),
    )
    band = attend(q_post, k_cache, v_cache, spans.band_start, spans.band_end, scale)
    return merge(reused, band)
