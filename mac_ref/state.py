"""Per-layer MAC state: the query ring and the summary ring of each (request, query head).

Token ``t`` leaves its row ``(q̃_t, R_t)`` in slot ``t mod W``. No position is stored: a
slot's token follows from the request's next position, which is why every step must
write its row (SPEC §4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from ._checks import compute_dtype
from .config import MACConfig
from .summary import Summary


@dataclass
class LayerState:
    """The rings of one layer for a batch of ``B`` requests.

    Attributes:
        ring_q: ``[B, Hq, W, D]`` pre-RoPE queries, in the queries' dtype.
        ring_o: ``[B, Hq, W, D]`` row outputs ``o`` of ``R_t``, in the compute dtype.
        ring_lse: ``[B, Hq, W]`` row LSEs of ``R_t`` (natural log), in the compute dtype.
        ring_depth: ``[B, Hq, W]`` int32 reuse-chain depth of each row: 0 for an exact row
            (prefill, miss), ``depth(j*) + 1`` for a hit.
        next_pos: ``[B]`` int64: position of each request's next decode token.
    """

    ring_q: torch.Tensor
    ring_o: torch.Tensor
    ring_lse: torch.Tensor
    ring_depth: torch.Tensor
    next_pos: torch.Tensor

    @property
    def window(self) -> int:
        return self.ring_q.shape[2]

    def rows(self, positions: torch.Tensor) -> Summary:
        """Ring rows of the given token positions ``[B, Hq]`` -> ``Summary([B, Hq, D], [B, Hq])``.

        Positions must be in the window (any value is reduced mod ``W``)."""
        slots = torch.remainder(positions, self.window)  # [B, Hq]
        o = self.ring_o.gather(2, slots[..., None, None].expand(-1, -1, 1, self.ring_o.shape[-1])).squeeze(2)
        lse = self.ring_lse.gather(2, slots[..., None]).squeeze(2)
        return Summary(o, lse)

    def depths(self, positions: torch.Tensor) -> torch.Tensor:
        """Chain depths ``[B, Hq]`` of the rows of token positions ``[B, Hq]`` (reduced mod ``W``)."""
        return self.ring_depth.gather(2, torch.remainder(positions, self.window)[..., None]).squeeze(2)

    def write(self, positions: torch.Tensor, q_pre: torch.Tensor, row: Summary, depth: torch.Tensor) -> None:
        """Write row ``(q̃_t, R_t)`` of token ``positions[b]`` into slot ``t mod W`` (in place).

        Args:
            positions: ``[B]`` token positions.
            q_pre: ``[B, Hq, D]`` their pre-RoPE queries.
            row: ``Summary([B, Hq, D], [B, Hq])``.
            depth: ``[B, Hq]`` the rows' chain depths.
        """
        b = torch.arange(positions.shape[0], device=positions.device)
        slots = torch.remainder(positions, self.window)  # [B]
        self.ring_q[b, :, slots] = q_pre.to(self.ring_q.dtype)
        self.ring_o[b, :, slots] = row.o.to(self.ring_o.dtype)
        self.ring_lse[b, :, slots] = row.lse.to(self.ring_lse.dtype)
        self.ring_depth[b, :, slots] = depth.to(self.ring_depth.dtype)

    def clone(self) -> "LayerState":
        """An independent copy of the rings and positions."""
        return LayerState(*(getattr(self, f.name).clone() for f in fields(self)))


def new_state(batch: int, q_heads: int, head_dim: int, config: MACConfig, dtype=torch.float32, device=None) -> LayerState:
    """Empty rings (rows ``(0, 0, −inf)``, depth 0) for requests that start at position 0.

    Args:
        dtype: dtype of the pre-RoPE queries; rows use the compute dtype (float32, or
            float64 for float64 queries).
    """
    row_dtype = compute_dtype(dtype)
    W = config.window
    return LayerState(
        ring_q=torch.zeros(batch, q_heads, W, head_dim, dtype=dtype, device=device),
        ring_o=torch.zeros(batch, q_heads, W, head_dim, dtype=row_dtype, device=device),
        ring_lse=torch.full((batch, q_heads, W), -math.inf, dtype=row_dtype, device=device),
        ring_depth=torch.zeros(batch, q_heads, W, dtype=torch.int32, device=device),
        next_pos=torch.zeros(batch, dtype=torch.int64, device=device),
    )
