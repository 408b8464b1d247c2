"""Per-layer MAC state: the query ring and the summary ring of each (request, query head).

Token ``t`` leaves its row ``(q̃_t, R_t)`` in slot ``t mod W``. No position is stored: a
slot's token follows from the request's next position, which is why every step must
write its row (spec: [row update][spec-row-update]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .numerics import compute_dtype
from .step import Summary


@dataclass
class LayerState:
    """The rings of one layer for a batch of ``B`` requests.

    Attributes:
        ring_q: ``[B, Hq, W, D]`` pre-RoPE queries, in the queries' dtype.
        ring_o: ``[B, Hq, W, D]`` row outputs ``o`` of ``R_t``, in the row dtype.
        ring_lse: ``[B, Hq, W]`` row LSEs of ``R_t`` (natural log), in the row dtype.
        ring_depth: ``[B, Hq, W]`` int32 reuse-chain depth of each row: 0 for an exact row
            (prefill, miss), ``depth(j*) + 1`` for a hit.
        next_pos: ``[B]`` int64: position of each request's next decode token.
    """

    ring_q: torch.Tensor
    ring_o: torch.Tensor
    ring_lse: torch.Tensor
    ring_depth: torch.Tensor
    next_pos: torch.Tensor

    @classmethod
    def empty(cls, batch: int, q_heads: int, head_dim: int, window: int, dtype=torch.float32, device=None) -> "LayerState":
        """Empty rings (rows ``(0, 0, −inf)``, depth 0) for requests that start at position 0.

        Args:
            dtype: dtype of the pre-RoPE queries; rows use the compute dtype (float32, or
                float64 for float64 queries).
        """
        row_dtype = compute_dtype(dtype)
        W = window
        return cls(
            ring_q=torch.zeros(batch, q_heads, W, head_dim, dtype=dtype, device=device),
            ring_o=torch.zeros(batch, q_heads, W, head_dim, dtype=row_dtype, device=device),
            ring_lse=torch.full((batch, q_heads, W), -math.inf, dtype=row_dtype, device=device),
            ring_depth=torch.zeros(batch, q_heads, W, dtype=torch.int32, device=device),
            next_pos=torch.zeros(batch, dtype=torch.int64, device=device),
        )

    @property
    def window(self) -> int:
        return self.ring_q.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes the rings take (all requests): ``B·Hq·W·(D·(q bytes + row bytes) + row bytes + 4)``."""
        return sum(t.numel() * t.element_size() for t in (self.ring_q, self.ring_o, self.ring_lse, self.ring_depth))

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

    def _index(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(b, slots)`` that index the rings as ``ring[b, :, slots]`` for positions ``[B]``
        (``b [B]``) or ``[B, L]`` (``b [B, 1]``); slot ``t mod W``."""
        b = torch.arange(positions.shape[0], device=positions.device)
        return (b if positions.dim() == 1 else b[:, None]), torch.remainder(positions, self.window)

    def read(self, positions: torch.Tensor) -> tuple[torch.Tensor, Summary, torch.Tensor]:
        """The rows in the slots of ``positions`` (copies), as :meth:`write` takes them:
        ``(q_pre, Summary(o, lse), depth)`` of shapes ``[B, Hq, D]``, ``[B, Hq]`` for positions
        ``[B]``, or ``[B, Hq, L, D]``, ``[B, Hq, L]`` for positions ``[B, L]``."""
        b, slots = self._index(positions)
        q, o, lse, depth = (ring[b, :, slots] for ring in (self.ring_q, self.ring_o, self.ring_lse, self.ring_depth))
        if positions.dim() == 2:  # ring[b, :, slots] is [B, L, Hq, …]
            q, o, lse, depth = (x.movedim(1, 2) for x in (q, o, lse, depth))
        return q, Summary(o, lse), depth

    def write(self, positions: torch.Tensor, q_pre: torch.Tensor, row: Summary, depth: torch.Tensor) -> None:
        """Write row ``(q̃_t, R_t)`` of token ``positions[b]`` into slot ``t mod W`` (in place);
        or, with ``positions [B, L]``, the rows of ``L`` tokens per request (``L ≤ W`` consecutive
        positions: distinct slots).

        Args:
            positions: ``[B]`` token positions (or ``[B, L]``).
            q_pre: ``[B, Hq, D]`` their pre-RoPE queries (or ``[B, Hq, L, D]``).
            row: ``Summary([B, Hq, D], [B, Hq])`` (or ``Summary([B, Hq, L, D], [B, Hq, L])``).
            depth: ``[B, Hq]`` the rows' chain depths (or ``[B, Hq, L]``).
        """
        b, slots = self._index(positions)
        values = (q_pre, row.o, row.lse, depth)
        if positions.dim() == 2:  # ring[b, :, slots] is [B, L, Hq, …]
            values = tuple(x.movedim(2, 1) for x in values)
        for ring, value in zip((self.ring_q, self.ring_o, self.ring_lse, self.ring_depth), values):
            ring[b, :, slots] = value.to(ring.dtype)

    def retire_rows(self, max_chain: int) -> None:
        """Mark every row as no match candidate under ``max_chain`` (chain depth ``max_chain``),
        in place: for rings that fell behind the cache (steps that wrote no rows). Each later
        step rewrites one slot with a row of its own, so the rings are whole again ``W`` steps on."""
        self.ring_depth.fill_(max_chain)

    def advance(self, positions: torch.Tensor) -> None:
        """After the step at ``positions [B]``: the next one is at ``positions + 1``."""
        self.next_pos = positions.to(torch.int64) + 1

    def seed(self, q_pre: torch.Tensor, rows: Summary, prompt_lengths: torch.Tensor, first_position: int = 0) -> "LayerState":
        """Seed the rings after prompts of ``n_b`` tokens: the rows of each request's last
        ``min(W, n_b)`` tokens, exact (chain depth 0); ``next_pos = n_b``. Returns ``self``.

        Slot ``s`` receives the newest prompt token ``j < n_b`` with ``j ≡ s (mod W)``, the
        same token a decode that had run through the prompt would have left there.

        Args:
            q_pre: ``[B, Hq, L, D]`` pre-RoPE queries of positions ``first_position … first_position + L − 1``.
            rows: ``Summary([B, Hq, L, D], [B, Hq, L])``: the exact rows
                ``A(q_t, [min(F, E(t)), E(t)))`` of the same positions
                (:func:`mac_core.step.row_range`).
            prompt_lengths: ``[B]`` int64 ``n_b``; each request's last ``min(W, n_b)``
                positions must lie within the given ones.
            first_position: the position of ``q_pre[:, :, 0]``.
        """
        B, _, L, _ = q_pre.shape
        W = self.window
        n = prompt_lengths.to(torch.int64).to(q_pre.device)  # [B]
        slots = torch.arange(W, device=q_pre.device)  # [W]
        token = n[:, None] - 1 - torch.remainder(n[:, None] - 1 - slots, W)  # [B, W]: newest j ≡ s below n
        seeded = token >= 0
        index = token - first_position
        if bool((seeded & ((index < 0) | (index >= L))).any()):
            raise ValueError(
                f"the last min(W={W}, n) prompt positions must lie in [{first_position}, {first_position + L}) "
                f"(the positions of q_pre), got prompt lengths {n.tolist()}"
            )
        index = index.clamp(0, max(L - 1, 0))[:, None, :]  # [B, 1, W]
        seeded = seeded[:, None, :]  # [B, 1, W]
        if L:
            gather = index.expand(-1, q_pre.shape[1], -1)  # [B, Hq, W]
            self.ring_q.copy_(torch.where(seeded[..., None], q_pre.gather(2, gather[..., None].expand_as(self.ring_q)), 0))
            self.ring_o.copy_(torch.where(seeded[..., None], rows.o.gather(2, gather[..., None].expand_as(self.ring_o)).to(self.ring_o.dtype), 0))
            self.ring_lse.copy_(torch.where(seeded, rows.lse.gather(2, gather).to(self.ring_lse.dtype), -math.inf))
        self.ring_depth.zero_()
        self.next_pos = n.clone()
        return self

    @classmethod
    def stacked(cls, states: list["LayerState"]) -> "LayerState":
        """The rings of several layers as one state of batch ``L·B`` (request ``b`` of layer ``i``
        at ``i·B + b``) whose ring tensors the layers' states view, so that one :meth:`read` or
        :meth:`write` covers every layer.

        The first call moves the layers' rings into one allocation per tensor (values kept; a
        CUDA graph captured before it reads the old tensors); a call on states that already
        share one returns a view of it. ``next_pos`` is the layers' concatenation (a copy).

        Examples:
            >>> layers = [LayerState.empty(2, 3, 4, 8) for _ in range(5)]
            >>> rings = LayerState.stacked(layers)
            >>> rings.ring_q.shape, layers[1].ring_q.data_ptr() == rings.ring_q[2].data_ptr()
            (torch.Size([10, 3, 8, 4]), True)
        """
        names = ("ring_q", "ring_o", "ring_lse", "ring_depth")
        whole = {}
        for name in names:
            base = getattr(states[0], name)._base
            shared = base is not None and base.shape[0] == len(states) and all(
                getattr(s, name).data_ptr() == base[i].data_ptr() and getattr(s, name).shape == base.shape[1:] for i, s in enumerate(states)
            )
            if not shared:
                base = torch.stack([getattr(s, name) for s in states])  # [L, B, ...]
                for i, s in enumerate(states):
                    setattr(s, name, base[i])
            whole[name] = base.flatten(0, 1)
        return cls(**whole, next_pos=torch.cat([s.next_pos for s in states]))

    def clone(self) -> "LayerState":
        """An independent copy of the rings and positions."""
        return LayerState(*(getattr(self, f.name).clone() for f in fields(self)))


def new_state(batch: int, q_heads: int, head_dim: int, config, dtype=torch.float32, device=None) -> LayerState:
    """Empty rings of ``config.window`` slots (see :meth:`LayerState.empty`)."""
    return LayerState.empty(batch, q_heads, head_dim, config.window, dtype=dtype, device=device)
