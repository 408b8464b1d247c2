r"""Complete: the step's output from ``C``, the sinks and the tail.

.. math::
    \text{out} = A(q_t, [0, S)) \oplus C \oplus A(q_t, [N, t+1))

with ``N = E(t)`` and ``S = min(F, N)`` (no sinks when ``F = 0``). On a miss ``C`` is
``A(q_t, [S, N))`` and ``out`` is exactly full attention. The sinks ⊕ tail part is kept
beside ``out``: the ``subtract`` row rule removes it again (spec: [row update][spec-row-update]).
"""

from __future__ import annotations

from mac_core.state import LayerState
from mac_core.step import Completion, MatchResult, Spans, Summary

from .amend import amend_row
from .summary import attend, merge


def complete_output(q_post, k_cache, v_cache, cached: Summary, spans: Spans, scale: float) -> Completion:
    """Merge ``cached`` (= ``C``) with the sinks and the tail, both computed with ``q_post``.

    A stage of :func:`mac_ref.decode.decode_step`, which validates the arguments.

    Args:
        q_post: ``[B, Hq, D]`` post-RoPE queries.
        k_cache, v_cache: ``[B, Hkv, T, D]``.
        cached: ``C``, a ``Summary([B, Hq, D], [B, Hq])`` over ``[sink_end, band_end)``.
        spans: the step's ranges.
        scale: softmax scale.

    Returns:
        :class:`~mac_core.step.Completion`: ``out`` over ``[0, tail_end)``, ``cached`` and
        ``rest = sinks ⊕ tail``, each ``Summary([B, Hq, D], [B, Hq])``.
    """
    sinks = attend(q_post, k_cache, v_cache, 0, spans.sink_end, scale)
    tail = attend(q_post, k_cache, v_cache, spans.band_end, spans.tail_end, scale)
    return Completion(out=merge(merge(sinks, cached), tail), cached=cached, rest=merge(sinks, tail))


def amend_complete(q_post, k_cache, v_cache, state: LayerState, result: MatchResult, spans: Spans, scale: float) -> Completion:
    """Amend then complete: the critical path of a decode step for given decisions.

    ``mac_triton.amend_complete`` fuses it into one split-KV pass with this signature.
    """
    cached = amend_row(q_post, k_cache, v_cache, state, result, spans, scale)
    return complete_output(q_post, k_cache, v_cache, cached, spans, scale)
