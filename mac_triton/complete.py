r"""Amend + Complete in Triton: one split-KV decode-attention pass for given decisions.

Twin of :func:`mac_ref.complete.amend_complete` (same signature, returns the same
:class:`~mac_core.step.Completion`):

.. math::
    C = R_{j^*} \oplus A(q_t, [P, N)) \;\text{(hit)}, \qquad C = A(q_t, [S, N)) \;\text{(miss)}, \qquad
    \text{out} = A(q_t, [0, S)) \oplus C \oplus A(q_t, [N, t+1)).

Two launches: the attend kernel (:mod:`mac_triton.attend`, its plan from the spans:
:mod:`mac_triton.plan`) and the reduce kernel (:mod:`mac_triton.reduce`, returning ``C``
and sinks ⊕ tail beside ``out``).
"""

from __future__ import annotations

from mac_core.kv import PagedKV
from mac_core.state import LayerState
from mac_core.step import Completion, MatchResult, Spans, Summary

from .attend import launch_attend
from .launch import Launch, launch_for
from .numerics import LIMITS
from .reduce import launch_spans_reduce


def amend_complete(
    q_post, k_cache, v_cache, state: LayerState, result: MatchResult, spans: Spans, scale: float, softcap: float | None = None,
    launch: Launch | None = None,
) -> Completion:
    """Amend then complete in one split-KV pass (see :func:`mac_ref.complete.amend_complete`).

    Args:
        q_post: ``[B, Hq, D]`` post-RoPE queries.
        k_cache, v_cache: ``[B, Hkv, T, D]``, or two :class:`~mac_core.kv.PagedKV` of one table.
        state: the rings; the row of ``result.matched_pos`` is read on hits.
        result: which heads reuse their row (``hit``) and the rows (``matched_pos``).
        spans: from :func:`mac_core.step.step_spans` (``sink_end``, ``band_end`` and
            ``tail_end`` are per request: equal over a request's heads).
        scale: softmax scale.
        softcap: ``None`` or the soft-cap ``c`` of the scores (``MACConfig.softcap``).
        launch: launch settings (default: :func:`mac_triton.launch.launch_for`).

    Returns:
        :class:`~mac_core.step.Completion` of float32 summaries ``[B, Hq, D]`` / ``[B, Hq]``.
    """
    for name, x in (("q_post", q_post), ("k_cache", k_cache), ("v_cache", v_cache)):
        LIMITS.check_dtype(name, x.pages if isinstance(x, PagedKV) else x)
    B, Hq, D = q_post.shape
    Hkv = k_cache.shape[1]
    launch = launch or launch_for(B * Hkv, D)
    partials = launch_attend(q_post, k_cache, v_cache, None, launch, scale, band_source="spans", spans=spans, softcap=softcap)
    out, cached, rest = launch_spans_reduce(partials, launch, result=result, state=state, batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D)
    return Completion(Summary(*out), Summary(*cached), Summary(*rest))
