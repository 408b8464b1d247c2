r"""The acceptance rule in Triton: twin of :func:`mac_ref.accept.accept_candidates`, per head.

:func:`accept_candidate` decides for one (request, query head) from the distance test's
verdict (``candidate``), the distance, the rule's squared radius and the share ``w`` of the
step's mass the candidate's row carries (:func:`mass_share`, from the LSE of the keys the
step read with the current query and the row's LSE). It switches on the rule's name, a
compile-time constant, so each rule compiles to its own kernel. The paper's rule decides in
the reduce kernel; a rule that verifies its candidates decides in the prefix kernel, after
the attend kernel has read the fresh part (:mod:`mac_triton.decide`). Adding a rule: see
:mod:`mac_core.rules`. Spec: [acceptance rules][spec-acceptance].
"""

from __future__ import annotations

import triton
import triton.language as tl

RULE_NAMES = ("paper", "mass")


@triton.jit
def mass_share(candidate, row_lse, fresh_lse):
    """``w = σ(ℓ_row − ℓ_fresh)`` of a candidate's row, 0 without a candidate or with an empty row."""
    w = 1.0 / (1.0 + tl.exp(fresh_lse - tl.where(candidate, row_lse, float("-inf"))))
    return tl.where(candidate, w, 0.0)


@triton.jit
def accept_candidate(candidate, distance, rule_radius_sq, w, RULE: tl.constexpr):
    """Whether the head's candidate reuses its row.

    ``paper``: every candidate does. ``mass``: iff ``d · w² < 2D(1 − τ_m)² s_h²``
    (``rule_radius_sq``, the squared form of ``sqrt(d / 2D) · w / s_h < 1 − τ_m``).
    """
    tl.static_assert((RULE == "paper") | (RULE == "mass"), "mac_triton.accept: a rule without a decision here")
    if RULE == "mass":
        hit = candidate & (distance * w * w < rule_radius_sq)
    else:
        hit = candidate
    return hit
