"""The log-domain arithmetic the kernels share (⊕ weights, ⊖ weights, online merge, the
soft-cap's tanh), and what the kernels accept (:data:`LIMITS`).

The ⊕/⊖ helpers return *weights* rather than merged vectors so that one helper serves
per-row scalars and blocks of rows alike: the caller broadcasts them onto its ``o``.
Spec: [⊕ merge][spec-merge], [⊖ remove][spec-remove].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mac_core.checks import BackendLimits

# inputs in these dtypes, arithmetic in float32, rows of the rings in float32
LIMITS = BackendLimits(
    "mac_triton", dtypes=(torch.float16, torch.bfloat16, torch.float32), row_dtype=torch.float32, contiguous_head_dim=True
)
LN2 = tl.constexpr(0.6931471805599453)  # read inside kernels: a constexpr, as the compiler requires


@triton.jit
def merge_weights(lse_a, lse_b):
    r"""⊕ weights: ``(w_a, w_b, lse)`` with ``o = w_a·o_a + w_b·o_b``.

    ``lse = logaddexp(lse_a, lse_b)``; the exponents are taken against a finite shift, so
    two empty inputs give ``(0, 0, −inf)`` and never NaN.
    """
    shift = tl.maximum(lse_a, lse_b)
    shift = tl.where(shift == float("-inf"), 0.0, shift)
    e_a = tl.exp(lse_a - shift)
    e_b = tl.exp(lse_b - shift)
    total = e_a + e_b
    inv = tl.where(total > 0, 1.0 / total, 0.0)
    return e_a * inv, e_b * inv, shift + tl.log(total)


@triton.jit
def expm1(x):
    """``e^x − 1`` without cancellation near 0: a degree-9 Taylor polynomial for
    ``|x| < 1/2`` (relative error < 1e-9), ``exp(x) − 1`` elsewhere."""
    p = 1.0 / 362880.0
    p = p * x + 1.0 / 40320.0
    p = p * x + 1.0 / 5040.0
    p = p * x + 1.0 / 720.0
    p = p * x + 1.0 / 120.0
    p = p * x + 1.0 / 24.0
    p = p * x + 1.0 / 6.0
    p = p * x + 0.5
    p = p * x + 1.0
    small = (x < 0.5) & (x > -0.5)
    return tl.where(small, p * x, tl.exp(x) - 1.0)


@triton.jit
def tanh(x):
    r"""``tanh(x)`` in float32 from portable ``tl.exp`` alone (no libdevice):

    .. math:: \tanh|x| = \frac{-\operatorname{expm1}(-2|x|)}{2 + \operatorname{expm1}(-2|x|)}

    The exponent is never positive, so nothing overflows (``|x| → ∞`` gives 1), and
    :func:`expm1` keeps the relative error at float32 rounding near 0, where
    ``1 − 2/(e^{2x} + 1)`` would cancel.
    """
    e = expm1(-2.0 * tl.abs(x))  # in [−1, 0]
    t = -e / (2.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def remove_weights(lse_total, lse_part, eps):
    r"""⊖ weights: ``(c_t, c_p, lse, ill)`` with ``o = c_t·o_total − c_p·o_part``.

    ``δ = ℓ_part − ℓ_total``, ``ℓ = ℓ_total + log(−expm1(δ))``,
    ``o = (o_total − e^δ o_part) / (−expm1(δ))``; ``part`` empty leaves ``total``;
    ``δ > 0`` or a remainder share below ``eps`` gives the empty summary, flagged ``ill``
    (the rules of ``mac_ref.summary.remove``).
    """
    part_empty = lse_part == float("-inf")
    total_empty = lse_total == float("-inf")
    delta = lse_part - tl.where(total_empty, 0.0, lse_total)
    delta = tl.where(part_empty, float("-inf"), delta)
    delta = tl.where(total_empty & (~part_empty), float("inf"), delta)
    share = -expm1(delta)  # remainder mass / total mass; 1 when part is empty
    ill = (~part_empty) & ((delta > 0) | (share < eps))
    safe_share = tl.where(ill, 1.0, share)
    lse = tl.where(ill, float("-inf"), lse_total + tl.log(safe_share))
    coef_total = tl.where(ill, 0.0, 1.0 / safe_share)
    coef_part = tl.where(ill, 0.0, tl.exp(delta) / safe_share)
    return coef_total, coef_part, lse, ill


@triton.jit
def online_merge(m, den, acc, lse_block, o_block):
    r"""Fold a block of summaries into a running ⊕ of one query's parts.

    Running state: shift ``m`` (max LSE so far, −inf when nothing seen), ``den = Σ e^{ℓ_i − m}``
    and ``acc = Σ e^{ℓ_i − m} o_i`` ``[D]``. ``lse_block [S]``, ``o_block [S, D]``.
    """
    m_new = tl.maximum(m, tl.max(lse_block, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    w = tl.exp(lse_block - m_safe)  # [S]; 0 for empty parts
    den = den * alpha + tl.sum(w, axis=0)
    acc = acc * alpha + tl.sum(w[:, None] * o_block, axis=0)
    return m_new, den, acc


@triton.jit
def online_finish(m, den, acc):
    """The ``(o [D], lse)`` of a running ⊕; ``(0, −inf)`` when every part was empty."""
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    inv = tl.where(den > 0, 1.0 / den, 0.0)
    return acc * inv, m_safe + tl.log(den)
