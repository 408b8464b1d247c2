r"""Amend: turn a matched row into this step's summary of everything but the sinks and the tail.

Let ``E(t) = max(t + 1 − r, 0)``. Row ``R_j`` summarises query ``j`` over
``[min(F, E(j)), E(j))``: all keys but the sinks and its own last ``r``. For the step at
``t`` with ``N = E(t)`` and ``S = min(F, N)``:

.. math::
    \text{hit:}\quad C = R_{j^*} \oplus A(q_t, [P, N)), \quad P = \max(E(j^*), S) \qquad
    \text{miss:}\quad C = A(q_t, [S, N))

The *band* ``[P, N)`` holds the ``t − j*`` keys between the end of the matched row and
the end of this step's row, recomputed with the current query; a hit recomputes
``[P, t+1)``, band and tail, which is ``r + (t − j*)`` keys, and never reads ``[S, P)``.
Spec: [the ranges][spec-ranges].

The ranges of a concrete hit (``t = 100``, ``r = 24``, ``j* = 87``, no sinks):

>>> import torch
>>> from mac_core import MACConfig, MatchResult
>>> t, j = torch.tensor([100]), torch.tensor([[87]])
>>> hit = MatchResult(torch.tensor([[True]]), j, torch.tensor([[0.0]]))
>>> spans = step_spans(t, hit, MACConfig(window=32, band=24))
>>> band = spans.band_end - spans.band_start        # [P, N) = [E(87), E(100)) = [64, 77)
>>> tail = spans.tail_end - spans.band_end          # [N, t+1) = [77, 101)
>>> band.item(), tail.item(), spans.keys_read().item()   # t − j*, r, r + (t − j*)
(13, 24, 37)
"""

from __future__ import annotations

import torch

from mac_core.config import MACConfig
from mac_core.state import LayerState
from mac_core.step import MatchResult, Spans, Summary, empty_summary, prefix_end

from .summary import attend, merge


def step_spans(positions: torch.Tensor, result: MatchResult, config: MACConfig) -> Spans:
    """Sink, band and tail ranges for the tokens at ``positions [B]`` given the hits of ``result``.

    ``N = E(t)``, ``S = min(F, N)``; a hit's band starts at ``P = max(E(j*), S)``, a miss's at ``S``.
    """
    t = positions[:, None].expand_as(result.matched_pos)  # [B, Hq]
    band_end = prefix_end(t, config.band)  # N
    sink_end = torch.clamp(band_end, max=config.sinks)  # S = min(F, N)
    matched_end = prefix_end(result.matched_pos, config.band)  # E(j*)
    band_start = torch.where(result.hit, torch.maximum(matched_end, sink_end), sink_end)
    return Spans(sink_end, band_start, band_end, t + 1)


def amend_row(q_post, k_cache, v_cache, state: LayerState, result: MatchResult, spans: Spans, scale: float) -> Summary:
    """``C``: the reused row (hit) or nothing (miss), ⊕ the band recomputed with ``q_post``.

    A stage of :func:`mac_ref.decode.decode_step`, which validates the arguments.

    Args:
        q_post: ``[B, Hq, D]`` post-RoPE queries.
        k_cache, v_cache: ``[B, Hkv, T, D]``.
        state: the rings; the row of ``result.matched_pos`` is read on hits.
        result: which heads reuse their matched row (``hit``), and the rows (``matched_pos``).
        spans: from :func:`step_spans` with the same hits.
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
