r"""Attention states across the boundary with FlashInfer: the LSE base, its argument order.

This project's summaries carry a **natural-log** LSE, ``ℓ = log Σ e^{s_j}`` (the
conventions of the spec page). FlashInfer's attention states ``(v, s)`` carry a **base-2**
one, ``s = log₂ Σ e^{s_j} = ℓ / ln 2`` (its ``return_lse=True`` outputs and the inputs of
``flashinfer.merge_state``). The two differ by a factor of ``1/ln 2 ≈ 1.44``; merging states
of mixed bases weighs the parts wrongly and raises no error, so every crossing goes
through one of the functions here:

- :func:`lse_to_base2`, :func:`lse_from_base2`: ``s = ℓ · log₂ e`` and back (``−inf``, the
  empty state, stays ``−inf``);
- :func:`from_flashinfer` / :func:`to_flashinfer`: a ``Summary`` from / to a state
  ``(v [seq_len, num_heads, head_dim], s [seq_len, num_heads] float32, base 2)``;
- :func:`merge_state_with`: FlashInfer's ``merge_state(v_a, s_a, v_b, s_b)`` (same argument
  order, same base) built on a backend's ⊕; ``mac_ref.merge_state`` and
  ``mac_triton.merge_state`` are it.
"""

from __future__ import annotations

import torch

from .checks import check_same_device, check_tensor
from .numerics import LOG2E
from .step import Summary



def lse_to_base2(lse: torch.Tensor) -> torch.Tensor:
    """Natural-log LSE ``ℓ [...]`` → base-2 LSE ``ℓ · log₂ e`` (same shape and dtype)."""
    return check_tensor("lse", lse) * LOG2E


def lse_from_base2(lse2: torch.Tensor) -> torch.Tensor:
    """Base-2 LSE ``s [...]`` → natural-log LSE ``s · ln 2`` (same shape and dtype)."""
    return check_tensor("lse2", lse2) / LOG2E


def check_flashinfer_state(name: str, v, s) -> None:
    """``v [seq_len, num_heads, head_dim]`` floats and ``s [seq_len, num_heads]`` float32."""
    check_tensor(f"v_{name}", v, 3, "[seq_len, num_heads, head_dim]")
    check_tensor(f"s_{name}", s, 2, "[seq_len, num_heads]")
    if s.dtype != torch.float32:
        raise TypeError(f"s_{name} must be float32 (a base-2 LSE, as FlashInfer keeps it), got {s.dtype}")
    if tuple(s.shape) != tuple(v.shape[:2]):
        raise ValueError(f"s_{name} must have shape [seq_len, num_heads] = {tuple(v.shape[:2])} (from v_{name}), got {tuple(s.shape)}")
    check_same_device(**{f"v_{name}": v, f"s_{name}": s})


def from_flashinfer(v: torch.Tensor, s: torch.Tensor) -> Summary:
    """A FlashInfer state ``(v [seq_len, num_heads, head_dim], s [seq_len, num_heads] base 2)``
    as a ``Summary(o, ℓ)`` with a natural-log ``ℓ`` (float32)."""
    check_flashinfer_state("state", v, s)
    return Summary(v, lse_from_base2(s))


def to_flashinfer(summary: Summary, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``Summary(o [..., H, D], ℓ [..., H])`` as a FlashInfer state ``(v, s)``: ``v`` in
    ``dtype`` (default ``o``'s), ``s`` float32 base 2."""
    o, lse = summary
    check_tensor("summary.o", o)
    check_tensor("summary.lse", lse)
    if o.shape[:-1] != lse.shape:
        raise ValueError(f"summary must have o [..., D] and lse [...], got {tuple(o.shape)} and {tuple(lse.shape)}")
    return o.to(dtype or o.dtype), lse_to_base2(lse.to(torch.float32))


def merge_state_with(merge, v_a, s_a, v_b, s_b) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashInfer's ``merge_state`` through a backend's ⊕ ``merge(a, b) -> Summary``.

    Args:
        v_a, v_b: ``[seq_len, num_heads, head_dim]`` attention outputs of two disjoint KV segments.
        s_a, s_b: ``[seq_len, num_heads]`` float32 **base-2** LSEs.

    Returns:
        ``(V [seq_len, num_heads, head_dim] in v_a's dtype, S [seq_len, num_heads] float32
        base 2)``: the state of the union of the segments.
    """
    check_flashinfer_state("a", v_a, s_a)
    check_flashinfer_state("b", v_b, s_b)
    if v_a.shape != v_b.shape:
        raise ValueError(f"v_a and v_b must have one shape, got {tuple(v_a.shape)} and {tuple(v_b.shape)}")
    merged = merge(Summary(v_a, lse_from_base2(s_a)), Summary(v_b, lse_from_base2(s_b)))
    return merged.o.to(v_a.dtype), lse_to_base2(merged.lse.to(torch.float32))
