r"""Complete: the step's output from ``C``, the sinks and the tail.

.. math::
    \text{out} = A(q_t, [0, S)) \oplus C \oplus A(q_t, [N, t+1))

with ``N = E(t)`` and ``S = min(F, N)`` (no sinks when ``F = 0``). On a miss ``C`` is
``A(q_t, [S, N))`` and ``out`` is exactly full attention.
"""

from __future__ import annotations

from .match import MatchResult
from .amend import Spans, amend
from .state import LayerState
from .summary import Summary, attend, merge


def complete(q_post, k_cache, v_cache, cached: Summary, spans: Spans, scale: float) -> Summary:
    """Merge ``cached`` (= ``C``) with the sinks and the tail, both computed with ``q_post``.

    Args:
        q_post: ``[B, Hq, D]`` post-RoPE queries.
        k_cache, v_cache: ``[B, Hkv, T, D]``.
        cached: ``C``, a ``Summary([B, Hq, D], [B, Hq])`` over ``[sink_end, band_end)``.
        spans: the step's ranges.
        scale: softmax scale.

    Returns:
        ``Summary(o [B, Hq, D], lse [B, Hq])`` over ``[0, tail_end)``.
    """
    sinks = attend(q_post, k_cache, v_cache, 0, spans.sink_end, scale)
    tail = attend(q_post, k_cache, v_cache, spans.band_end, spans.tail_end, scale)
    return merge(merge(sinks, cached), tail)


def amend_complete(
    q_post, k_cache, v_cache, state: LayerState, result: MatchResult, spans: Spans, scale: float
) -> tuple[Summary, Summary]:
    """Amend then complete: returns ``(out, C)``; ``C`` is the ``split`` rule's new row.

    This is the critical path of a decode step; ``mac_triton`` fuses it into one kernel
    with this signature.
    """
    cached = amend(q_post, k_cache, v_cache, state, result, spans, scale)
    return complete(q_post, k_cache, v_cache, cached, spans, scale), cached
