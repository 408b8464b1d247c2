r"""Complete: the step's output from ``C``, the sinks and the tail.

.. math::
    \text{out} = A(q_t, [0, S)) \oplus C \oplus A(q_t, [N, t+1))

with ``N = E(t)`` and ``S = min(F, N)`` (no sinks when ``F = 0``). On a miss ``C`` is
``A(q_t, [S, N))`` and ``out`` is exactly full attention. The sinks ⊕ tail part is kept
beside ``out``: the ``subtract`` row rule removes it again (spec: [row update][spec-row-update]).
The sinks and the tail are the same whatever the step decides: a step computes them once
(:func:`edge_summaries`).
"""

from __future__ import annotations

from mac_core.state import LayerState
from mac_core.step import Completion, MatchResult, Spans, Summary

from .amend import amend_row
from .summary import attend, merge


def edge_summaries(q_post, k_cache, v_cache, spans: Spans, scale: float, softcap: float | None = None) -> tuple[Summary, Summary]:
    """The sinks ``A(q_t, [0, S))`` and the tail ``A(q_t, [N, t+1))``, each ``Summary([B, Hq, D], [B, Hq])``.

    Neither depends on the step's decisions, so a step computes them once: the acceptance
    rule weighs candidates against them (:func:`mac_ref.accept.accept_candidates`) and
    :func:`complete_output` merges them into the output.

    Args:
        q_post: ``[B, Hq, D]`` post-RoPE queries; ``k_cache``, ``v_cache``: ``[B, Hkv, T, D]``.
        spans: the step's ranges (``sink_end``, ``band_end``, ``tail_end`` are used).
        scale, softcap: the scores' scale and soft cap (``MACConfig.softcap``).
    """
    sinks = attend(q_post, k_cache, v_cache, 0, spans.sink_end, scale, softcap)
    tail = attend(q_post, k_cache, v_cache, spans.band_end, spans.tail_end, scale, softcap)
    return sinks, tail


def complete_output(cached: Summary, sinks: Summary, tail: Summary) -> Completion:
    """``out = sinks ⊕ C ⊕ tail`` from ``cached`` (= ``C``, over ``[S, N)``) and :func:`edge_summaries`.

    A stage of :func:`mac_ref.decode.decode_step`.

    Returns:
        :class:`~mac_core.step.Completion`: ``out`` over ``[0, t+1)``, ``cached`` and
        ``rest = sinks ⊕ tail``, each ``Summary([B, Hq, D], [B, Hq])``.
    """
    return Completion(out=merge(merge(sinks, cached), tail), cached=cached, rest=merge(sinks, tail))


def amend_complete(
    q_post, k_cache, v_cache, state: LayerState, result: MatchResult, spans: Spans, scale: float, softcap: float | None = None
) -> Completion:
    """Amend then complete: the critical path of a decode step for given decisions.

    ``mac_triton.amend_complete`` fuses it into one split-KV pass with this signature.
    """
    cached = amend_row(q_post, k_cache, v_cache, state, result, spans, scale, softcap)
    return complete_output(cached, *edge_summaries(q_post, k_cache, v_cache, spans, scale, softcap))
