r"""Rotary position embedding (RoPE), Llama / Hugging Face "rotate-half" layout.

Dimension ``i < D/2`` is paired with ``i + D/2`` and the pair is rotated by the angle
``θ_i · pos`` with ``θ_i = base^{−2i/D}``:

.. math::
    \mathrm{RoPE}(x, p) = x \odot \cos(p\theta) + \mathrm{rotate\_half}(x) \odot \sin(p\theta),
    \qquad \mathrm{rotate\_half}([x_1, x_2]) = [-x_2, x_1]

A rotation is orthogonal, so :func:`invert_rope` (rotation by ``−pθ``) recovers the
pre-RoPE vector from the post-RoPE one. Angles are formed in float64, so positions of a
long context do not lose their phase to float32 rounding. Spec: [conventions][spec-conventions].
"""

from __future__ import annotations

import torch

from .checks import check_tensor
from .numerics import compute_dtype


def rope_angles(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of the rotation angles, each ``[*positions.shape, head_dim]`` float64."""
    if head_dim % 2 != 0:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # [..., D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [..., D]
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, positions, base: float, sign: float) -> torch.Tensor:
    check_tensor("x", x)
    positions = torch.as_tensor(positions, device=x.device)
    if positions.is_floating_point():
        raise TypeError(f"positions must be integers, got {positions.dtype}")
    try:
        torch.broadcast_shapes(positions.shape, x.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"positions of shape {tuple(positions.shape)} do not broadcast against x's leading shape {tuple(x.shape[:-1])}"
        ) from None
    dtype = compute_dtype(x.dtype)
    cos, sin = rope_angles(positions, x.shape[-1], base)
    return rotate(x, cos.to(dtype), sign * sin.to(dtype))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x ⊙ cos + rotate_half(x) ⊙ sin`` for ``x [..., D]`` and precomputed ``cos``, ``sin``
    broadcast to it (a model's table of :func:`rope_angles`; ``−sin`` inverts), computed in
    ``cos``'s dtype (at least ``x``'s) and returned in ``x``'s dtype."""
    x_c = x.to(torch.promote_types(x.dtype, cos.dtype))
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x_c[..., half:], x_c[..., :half]], dim=-1)
    return (x_c * cos + rotated_half * sin).to(x.dtype)


def apply_rope(x: torch.Tensor, positions, base: float = 10000.0) -> torch.Tensor:
    """Rotate ``x [..., D]`` to its positions.

    Args:
        x: ``[..., D]`` pre-RoPE vectors (queries or keys).
        positions: integers broadcastable to ``x.shape[:-1]``.
        base: RoPE base (``rope_theta``).

    Returns:
        ``[..., D]`` post-RoPE vectors in ``x``'s dtype (computed in float32 at least).
    """
    return _rotate(x, positions, base, +1.0)


def invert_rope(x: torch.Tensor, positions, base: float = 10000.0) -> torch.Tensor:
    """Undo :func:`apply_rope`: recover pre-RoPE vectors ``[..., D]`` from post-RoPE ones."""
    return _rotate(x, positions, base, -1.0)
