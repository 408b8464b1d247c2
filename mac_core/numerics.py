"""Numerical facts both backends share: the compute dtype and the ⊖ epsilon.

Spec: [numerics][spec-numerics].
"""

from __future__ import annotations

import torch


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32: arithmetic is never below float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def removal_epsilon(dtype: torch.dtype) -> float:
    """Smallest remainder share ``1 − e^δ`` that ⊖ still resolves: 8 ulps of the compute dtype.

    Below it the remainder is indistinguishable from rounding noise and ⊖ returns the empty
    summary, flagged (spec: [⊖ remove][spec-remove]).
    """
    return 8 * torch.finfo(compute_dtype(dtype)).eps
