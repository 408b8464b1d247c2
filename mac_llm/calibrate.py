r"""Acceptance rules beyond the paper's: per-head hit radii calibrated from the prompt.

The paper accepts a match iff ``‖q̃_t − q̃_j‖ < (1 − τ)·sqrt(2D)``: the distance between two
random *unit-variance* vectors, scaled by ``1 − τ``. A trained model's pre-RoPE queries are
not unit-variance and their keys differ in scale from head to head, so one radius means
something different in every layer. What the reuse actually perturbs is the logits of
the reused prefix: by Cauchy–Schwarz (RoPE keeps norms)

.. math::
    |s'_j - s_j| = \text{scale}\cdot|(\tilde q_t - \tilde q_{j^*})^\top \tilde k_j|
                 \le \text{scale}\cdot\lVert \tilde q_t - \tilde q_{j^*}\rVert \cdot \max_j \lVert k_j \rVert .

Rules (``MACConfig.radius_scale`` holds the factor ``s_h`` per query head; ``τ`` stays the
one global knob):

- ``"paper"``: ``s_h = 1`` (the reference behaviour).
- ``"keynorm"``: ``s_h = sqrt(D) / K_h`` with ``K_h`` the largest key norm of the head's KV
  head over the prompt (sinks excluded: they are recomputed at every step). Every head then
  has the same bound on the logit error of its reused prefix, ``(1 − τ)·sqrt(2)``
  (with ``scale = 1/sqrt(D)``): the radius is a logit-error budget, not a distance.
- ``"qnorm"``: ``s_h = median_t ‖q̃_t‖ / sqrt(D)``: the radius relative to the head's query scale.
"""

from __future__ import annotations

import dataclasses
import math

import torch

import mac_ref

RULES = ("paper", "keynorm", "qnorm")


def radius_scale(rule: str, q_pre: torch.Tensor, k_cache: torch.Tensor, prompt_len: int, sinks: int) -> tuple[float, ...] | None:
    """Per-query-head radius factors ``s_h`` of ``rule``, from one layer's prompt.

    Args:
        rule: one of :data:`RULES`.
        q_pre: ``[B, Hq, L, D]`` pre-RoPE queries of (the end of) the prompt.
        k_cache: ``[B, Hkv, T, D]``, keys ``[0, prompt_len)`` written.
        prompt_len: prompt length ``n``.
        sinks: ``F``; keys ``[0, F)`` are left out of ``K_h``.

    Returns:
        ``None`` for ``"paper"``, else a tuple of ``Hq`` floats (batch pooled).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "paper":
        return None
    Hq, D = q_pre.shape[1], q_pre.shape[-1]
    group = Hq // k_cache.shape[1]
    if rule == "keynorm":
        start = min(sinks, prompt_len - 1)
        key_norm = k_cache[:, :, start:prompt_len].float().norm(dim=-1).amax(dim=(0, 2))  # [Hkv]
        scale = math.sqrt(D) / key_norm.repeat_interleave(group)  # [Hq]
    else:
        scale = q_pre.float().norm(dim=-1).transpose(0, 1).flatten(1).median(dim=1).values / math.sqrt(D)  # [Hq]
    return tuple(float(s) for s in scale)


def calibrated(config: mac_ref.MACConfig, rule: str, q_pre, k_cache, prompt_len: int) -> mac_ref.MACConfig:
    """``config`` with the ``radius_scale`` of ``rule`` for one layer (see :func:`radius_scale`)."""
    return dataclasses.replace(config, radius_scale=radius_scale(rule, q_pre, k_cache, prompt_len, config.sinks))
