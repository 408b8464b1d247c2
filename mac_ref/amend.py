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

The ranges themselves are :func:`mac_core.step.step_spans` (with a worked example).
"""

from __future__ import annotations

import torch

from mac_core.state import LayerState
from mac_core.step import MatchResult, Spans, Summary, empty_summary

from .summary import attend, merge


def amend_row(
    q_post, k_cache, v_cache, state: LayerState, result: MatchResult, spans: Spans, scale: float, softcap: float | None = None
) -> Summary:
    """``C``: the reused row (hit) or nothing (miss), ⊕ the band recomputed with ``q_post``.

    A stage of :func:`mac_ref.decode.decode_step`, which validates the arguments.

    Args:
        q_post: ``[B, Hq, D]`` post-RoPE queries.
        k_cache, v_cache: ``[B, Hkv, T, D]``.
        state: the rings; the row of ``result.matched_pos`` is read on hits.
        result: which heads reuse their matched row (``hit``), and the rows (``matched_pos``).
        spans: from :func:`mac_core.step.step_spans` with the same hits.
        scale: softmax scale.
        softcap: ``None`` or the soft-cap ``c`` of the scores (``MACConfig.softcap``).

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
    band = attend(q_post, k_cache, v_cache, spans.band_start, spans.band_end, scale, softcap)
    return merge(reused, band)
