r"""The acceptance rule in Triton: twin of :func:`mac_ref.accept.accept`, one head at a time.

The reduce kernel calls :func:`accept` once per (request, query head) with everything a
rule may look at: the distance test's verdict (``candidate``), the distance and the head's
squared radius, the LSE of the keys the step read with the current query (sinks, band and
tail: ``fresh_lse``) and the LSE of the matched row (``row_lse``). It switches on the
rule's name, a compile-time constant, so each rule compiles to its own kernel. Adding a
rule: see :mod:`mac_core.rules`. Spec: [acceptance rules][spec-acceptance].
"""

from __future__ import annotations

import triton
import triton.language as tl

RULE_NAMES = ("paper",)


@triton.jit
def accept(candidate, distance, radius_sq, fresh_lse, row_lse, RULE: tl.constexpr):
    """Whether the head's candidate reuses its row (``paper``: every candidate does)."""
    tl.static_assert(RULE == "paper", "mac_triton.accept: a rule without a decision here")
    return candidate
