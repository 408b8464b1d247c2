"""Numerical facts both backends share: the compute dtype, the ⊖ epsilon, the default softmax
scale and ``log₂ e``.

Spec: [numerics][spec-numerics].
"""

from __future__ import annotations

import math

import torch

LOG2E = 1.0 / math.log(2.0)  # log₂ e: a natural-log LSE times this is base 2 (FlashInfer's, the kernels' exp2)


def softmax_scale(head_dim: int, scale: float | None = None) -> float:
    """The softmax scale of the scores: ``scale``, or ``1/sqrt(D)`` when it is ``None`` (the conventions)."""
    return 1.0 / math.sqrt(head_dim) if scale is None else scale


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32: arithmetic is never below float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def removal_epsilon(dtype: torch.dtype) -> float:
    """Smallest remainder share ``1 − e^δ`` that ⊖ still resolves: 8 ulps of the compute dtype.

    Below it the remainder is indistinguishable from rounding noise and ⊖ returns the empty
    summary, flagged (spec: [⊖ remove][spec-remove]).
    """
    return 8 * torch.finfo(compute_dtype(dtype)).eps
