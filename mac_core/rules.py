r"""Acceptance rules: per (request, query head), is the matched row used?

Every rule starts from the match stage's **distance test** (the paper's):

.. math:: \text{candidate} \iff d_{j^*} < 2D(1-\tau)^2 s_h^2 \;\text{ and }\; t \ge \text{min\_context},

with ``τ = MACConfig.tau`` and ``s_h`` the head's radius factor (``MACConfig.radius_scale``,
1 by default). A rule that only looks at the distance decides there (:class:`PaperRule`).
A rule with ``verifies = True`` decides later, per candidate, from what the step computes
anyway with the current query: the sinks, band and tail (their LSE) beside the matched
row's LSE. A rejected candidate is a miss: it also reads the rest of the prefix and is
exact. Spec: [acceptance rules][spec-acceptance].

How to add a rule: a frozen dataclass here (its name and parameters, validated in
``__post_init__``), its decision in ``mac_ref.accept.accept`` and in
``mac_triton.accept.accept`` (a ``@triton.jit`` function that switches on the rule's name),
and a row of tests in ``tests/test_accept.py``; ``MACConfig(rule=...)`` selects it.

Radius calibrations (``MACConfig.calibration``) set ``s_h`` from a prompt, before decoding
(:func:`radius_scale_from_prompt`). The paper's radius assumes unit-variance queries; a
trained model's heads differ in query and key scale, and what the reuse perturbs is the
logits of the reused prefix: by Cauchy–Schwarz (RoPE keeps norms)

.. math::
    |s'_j - s_j| = \text{scale}\cdot|(\tilde q_t - \tilde q_{j^*})^\top \tilde k_j|
                 \le \text{scale}\cdot\lVert \tilde q_t - \tilde q_{j^*}\rVert \cdot \max_j \lVert k_j \rVert .

- ``"keynorm"``: ``s_h = sqrt(D) / K_h`` with ``K_h`` the largest key norm of the head's KV
  head over the prompt (sinks excluded: they are recomputed at every step), so every head
  has the same bound on the logit error of its reused prefix;
- ``"qnorm"``: ``s_h = median_t ‖q̃_t‖ / sqrt(D)``, the radius relative to the head's query scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

CALIBRATIONS = ("keynorm", "qnorm")


@dataclass(frozen=True)
class PaperRule:
    """The paper's rule: the distance test alone decides (a candidate is a hit)."""

    name: ClassVar[str] = "paper"
    verifies: ClassVar[bool] = False  # decides before the band and tail are computed

    def describe(self) -> str:
        return self.name


RULES = {rule.name: rule for rule in (PaperRule,)}


def radius_scale_from_prompt(calibration: str, q_pre: torch.Tensor, k_cache: torch.Tensor, prompt_len: int, sinks: int) -> tuple[float, ...]:
    """Per-query-head radius factors ``s_h`` of ``calibration``, from one layer's prompt.

    Args:
        calibration: one of :data:`CALIBRATIONS`.
        q_pre: ``[B, Hq, L, D]`` pre-RoPE queries of (the end of) the prompt.
        k_cache: ``[B, Hkv, T, D]``, keys ``[0, prompt_len)`` written.
        prompt_len: prompt length ``n``.
        sinks: ``F``; keys ``[0, F)`` are left out of ``K_h``.

    Returns:
        ``Hq`` floats (batch pooled).
    """
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    Hq, D = q_pre.shape[1], q_pre.shape[-1]
    group = Hq // k_cache.shape[1]
    if calibration == "keynorm":
        start = min(sinks, prompt_len - 1)
        key_norm = k_cache[:, :, start:prompt_len].float().norm(dim=-1).amax(dim=(0, 2))  # [Hkv]
        scale = math.sqrt(D) / key_norm.repeat_interleave(group)  # [Hq]
    else:
        scale = q_pre.float().norm(dim=-1).transpose(0, 1).flatten(1).median(dim=1).values / math.sqrt(D)  # [Hq]
    return tuple(float(s) for s in scale)
