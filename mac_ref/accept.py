r"""Accept: the acceptance rule decides which candidates of the match reuse their row.

The match stage's distance test gives the candidates (:mod:`mac_ref.match`). The rule of
``config.rule`` (:mod:`mac_core.rules`) then decides per (request, query head):

- :class:`~mac_core.rules.PaperRule`: every candidate is a hit.

A rule that verifies a candidate reads what the step computes anyway with the current
query (sinks, band and tail over the candidate's ranges) and may reject it; a rejected
candidate becomes a miss, whose ranges cover the whole prefix. Spec:
[acceptance rules][spec-acceptance].
"""

from __future__ import annotations

from mac_core.config import MACConfig
from mac_core.state import LayerState
from mac_core.step import MatchResult


def accept(config: MACConfig, result: MatchResult, state: LayerState, q_post, k_cache, v_cache, positions, scale: float) -> MatchResult:
    """The rule's decision: ``result`` with ``hit`` narrowed to the accepted candidates.

    A stage of :func:`mac_ref.decode.decode_step`, which validates the arguments.

    Args:
        config: the rule (``config.rule``) and its knobs.
        result: the match, ``hit`` = the candidates.
        state: the rings (the candidates' rows).
        q_post: ``[B, Hq, D]`` post-RoPE queries; ``k_cache``, ``v_cache``: ``[B, Hkv, T, D]``.
        positions: ``[B]`` int64 positions ``t``.
        scale: softmax scale.

    Returns:
        A :class:`~mac_core.step.MatchResult` with the same ``j*`` and distances.
    """
    if config.rule.name == "paper":
        return result
    raise NotImplementedError(f"mac_ref has no decision for the rule {config.rule.name!r}")  # pragma: no cover


__all__ = ["accept"]
