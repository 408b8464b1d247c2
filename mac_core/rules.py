r"""Acceptance rules: per (request, query head), is the matched row used?

Every rule starts from the match stage's **distance test** (the paper's):

.. math:: \text{candidate} \iff d_{j^*} < 2D(1-\tau)^2 s_h^2 \;\text{ and }\; t \ge \text{min\_context},

with ``τ = MACConfig.tau`` and ``s_h`` the head's radius factor (``MACConfig.radius_scale``,
1 by default). A rule that only looks at the distance decides there (:class:`PaperRule`).
A rule with ``verifies = True`` decides later, per candidate, from what the step computes
anyway with the current query: the sinks, band and tail (their LSE) beside the matched
row's LSE. A rejected candidate is a miss: it also reads the rest of the prefix and is
exact. Spec: [acceptance rules][spec-acceptance].

- :class:`PaperRule`: the distance test decides (the paper's rule);
- :class:`MassRule`: a candidate is verified by the share ``w`` of the step's attention
  mass that its reused row would carry.

Both have a group-aware variant (``per_group=True``): a KV group reuses only when all its
heads would. How to add a rule: a frozen dataclass here (its name and parameters,
validated in ``__post_init__``) in :data:`RULES`, its decision in
``mac_ref.accept.accept_candidates`` and in ``mac_triton.accept.accept_candidate`` (a ``@triton.jit`` function
that switches on the rule's name), and a row of tests in ``tests/test_accept.py``;
``MACConfig(rule=...)`` selects it.

Radius calibrations (``MACConfig.calibration``) set ``s_h`` from a prompt, before decoding
(:func:`radius_scale_from_prompt`). The paper's radius assumes unit-variance queries; a
trained model's heads differ in query and key scale, and what the reuse perturbs is the
logits of the reused prefix: by Cauchy–Schwarz (RoPE keeps norms)

.. math::
    |s'_j - s_j| = \text{scale}\cdot|(\tilde q_t - \tilde q_{j^*})^\top \tilde k_j|
                 \le \text{scale}\cdot\lVert \tilde q_t - \tilde q_{j^*}\rVert \cdot \max_j \lVert k_j \rVert .

Soft-capped logits (``MACConfig.softcap``: ``c·tanh(x / c)`` is 1-Lipschitz) obey the same
bound, so the calibrations need no cap.

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
class AcceptanceRule:
    """What every rule has: its name, when it decides, and the group-aware variant.

    Attributes:
        per_group: the group-aware variant: a KV group reuses its rows only when every
            head of the group would; otherwise all its heads miss. A group's kernel reads
            the union of its heads' spans, so one missing head makes it read everything
            anyway: its other heads then miss exactly, at no extra bytes.
    """

    name: ClassVar[str]
    verifies: ClassVar[bool]  # True: decides after the band and tail, from their LSE
    per_group: bool = False

    def __post_init__(self):
        if not isinstance(self.per_group, bool):
            raise TypeError(f"{type(self).__name__}.per_group must be a bool, got {self.per_group!r}")

    def describe(self) -> str:
        return self.name + (" per group" if self.per_group else "")


@dataclass(frozen=True)
class PaperRule(AcceptanceRule):
    """The paper's rule: the distance test alone decides (a candidate is a hit)."""

    name: ClassVar[str] = "paper"
    verifies: ClassVar[bool] = False


@dataclass(frozen=True)
class MassRule(AcceptanceRule):
    r"""Verify a candidate by the share of the step's attention mass its reused row carries.

    A candidate passed the distance test at ``MACConfig.tau`` (a loose cap ``τ_cap``). The
    step computes the fresh part anyway, sinks, band and tail with the current query; its
    LSE ``ℓ_fresh`` beside the reused row's ``ℓ_row`` gives the share of the attention
    mass the reuse would carry,

    .. math:: w = \sigma(\ell_{row} - \ell_{fresh}) = \frac{e^{\ell_{row}}}{e^{\ell_{row}} + e^{\ell_{fresh}}},

    and the reuse error grows like ``w · ‖q̃_t − q̃_j*‖``. Accept iff

    .. math:: \sqrt{d_{j^*} / 2D}\; w \,/\, s_h < 1 - \tau_m
              \quad\Longleftrightarrow\quad d_{j^*}\, w^2 < 2D(1 - \tau_m)^2 s_h^2

    (``s_h``: the head's radius factor; the squared form is the one computed, so ``w = 1``
    with ``τ_m = τ_cap`` gives back the paper's test exactly). A rejected candidate is a
    miss: the step also reads ``[S, P)`` and is exact.

    Attributes:
        tau_m: the threshold ``τ_m`` on the mass-weighted distance (``≥ 1``: no hits).
        per_group: as for :class:`PaperRule`, on the accepted candidates.
        layer_tau_m: ``None`` (``tau_m`` in every layer) or one ``τ_m`` per layer of the
            model: layers differ in how much a reuse error costs downstream, so a loose
            threshold where it is cheap and a strict one where it is not skip more at the
            same quality. A step takes one layer's rule: ``MACConfig.for_layer``.
    """

    name: ClassVar[str] = "mass"
    verifies: ClassVar[bool] = True
    tau_m: float = 0.5
    layer_tau_m: tuple[float, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.tau_m, bool) or not isinstance(self.tau_m, (int, float)) or not math.isfinite(self.tau_m):
            raise ValueError(f"MassRule.tau_m must be a finite number, got {self.tau_m!r}")
        if self.layer_tau_m is not None and not (
            isinstance(self.layer_tau_m, tuple) and self.layer_tau_m
            and all(not isinstance(t, bool) and isinstance(t, (int, float)) and math.isfinite(t) for t in self.layer_tau_m)
        ):
            raise ValueError(f"MassRule.layer_tau_m must be None or a non-empty tuple of finite numbers (one per layer), got {self.layer_tau_m!r}")

    def describe(self) -> str:
        if self.layer_tau_m is not None:
            low, high = min(self.layer_tau_m), max(self.layer_tau_m)
            return f"{self.name} (tau_m per layer, {low:g}–{high:g})" + (" per group" if self.per_group else "")
        return f"{self.name} (tau_m {self.tau_m:g})" + (" per group" if self.per_group else "")


RULES = {rule.name: rule for rule in (PaperRule, MassRule)}


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
