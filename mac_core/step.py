"""What a decode step exchanges: summaries, the match result, the key ranges, the statistics.

Both backends produce and consume these types, so a test can hand one backend's result to
the other. Spec: [the decode step][spec-decode-step], [what a step reports][spec-reports].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch


class Summary(NamedTuple):
    """An attention summary ``(o, lse)`` (spec: [summaries][spec-summaries]).

    Attributes:
        o: ``[..., D]`` normalised partial output (softmax-weighted mean of values).
        lse: ``[...]`` natural-log sum of the exponentiated scores; ``-inf`` when empty.
    """

    o: torch.Tensor
    lse: torch.Tensor


def empty_summary(shape: tuple[int, ...], head_dim: int, dtype=torch.float32, device=None) -> Summary:
    """The empty summary ``(0, −inf)`` of shape ``[*shape, head_dim]`` / ``[*shape]``."""
    o = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
    lse = torch.full(shape, -math.inf, dtype=dtype, device=device)
    return Summary(o, lse)


def prefix_end(positions: torch.Tensor, band: int) -> torch.Tensor:
    """``E(t) = max(t + 1 − r, 0)``: the end of what token ``t``'s ring row covers."""
    return torch.clamp(positions + 1 - band, min=0)


def row_range(positions: torch.Tensor, band: int, sinks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys ``[min(F, E(t)), E(t))`` that an exact ring row of token ``t`` summarises
    (spec: [prefill][spec-prefill])."""
    end = prefix_end(positions, band)
    return torch.clamp(end, max=sinks), end


class MatchResult(NamedTuple):
    """Per (request, query head) outcome of the match stage.

    Attributes:
        hit: ``[B, Hq]`` bool: the distance test passed (the rule's candidates).
        matched_pos: ``[B, Hq]`` int64: ``j*``, or ``-1`` when there is no candidate.
        distance: ``[B, Hq]``: ``d_{j*}``; ``inf`` when there is no candidate.
    """

    hit: torch.Tensor
    matched_pos: torch.Tensor
    distance: torch.Tensor


class Spans(NamedTuple):
    """The key ranges of one decode step, each ``[B, Hq]`` int64 (half-open; spec:
    [the ranges][spec-ranges]).

    ``[0, sink_end)`` sinks, ``[band_start, band_end)`` band, ``[band_end, tail_end)`` tail.
    The reused row (on a hit) covers ``[sink_end, band_start)``; on a miss
    ``band_start = sink_end`` and the band is the whole prefix.
    """

    sink_end: torch.Tensor
    band_start: torch.Tensor
    band_end: torch.Tensor
    tail_end: torch.Tensor

    def keys_read(self) -> torch.Tensor:
        """Keys this step reads per head: sinks + band + tail."""
        return self.sink_end + (self.tail_end - self.band_start)


@dataclass
class StepStats:
    """What a decode step reports, per request and query head (spec: [reports][spec-reports]).

    Fields may carry leading step dimensions (see :meth:`stack`).

    Attributes:
        hit: ``[B, Hq]`` bool: the matched row was used.
        matched_pos: ``[B, Hq]`` int64 nearest candidate ``j*`` (``-1``: no candidate);
            reported for misses too.
        distance: ``[B, Hq]`` squared L2 distance to ``j*`` (``inf``: no candidate).
        keys_read: ``[B, Hq]`` int64 keys the step attends to (sinks + band + tail).
        context: ``[B]`` int64 keys a full-attention step reads per head, ``t + 1``.
        ill_conditioned: ``[B, Hq]`` bool: the ``subtract`` rule's removal was flagged
            (always ``False`` under ``split``).
        chain_depth: ``[B, Hq]`` int64 reuse-chain depth of the row the step wrote
            (0 on a miss).
        candidate: ``[B, Hq]`` bool: the distance test passed (the rule's candidates; the
            hits are a subset).
        mass_share: ``[B, Hq]`` ``w = σ(ℓ_row − ℓ_fresh)`` (compute dtype): the share of the step's
            attention mass the candidate's row carries (0 where there is no candidate).
    """

    hit: torch.Tensor
    matched_pos: torch.Tensor
    distance: torch.Tensor
    keys_read: torch.Tensor
    context: torch.Tensor
    ill_conditioned: torch.Tensor
    chain_depth: torch.Tensor
    candidate: torch.Tensor
    mass_share: torch.Tensor

    @property
    def hit_rate(self) -> float:
        """Share of (step, request, head) decisions that were hits."""
        return self.hit.float().mean().item()

    @property
    def skipped_fraction(self) -> float:
        """Share of full attention's key reads that were skipped: ``1 − Σ keys_read / Σ (t+1)``."""
        full = self.context.unsqueeze(-1).expand_as(self.keys_read)
        return 1.0 - self.keys_read.sum().item() / full.sum().item()

    def group_skipped_fraction(self, kv_heads: int) -> float:
        """The same per KV group: a group reads the union of its heads' spans, all ending at
        ``t + 1``, so its longest one."""
        *lead, Hq = self.keys_read.shape
        group_reads = self.keys_read.reshape(*lead, kv_heads, Hq // kv_heads).amax(-1)  # [..., Hkv]
        full = self.context.unsqueeze(-1).expand_as(group_reads)
        return 1.0 - group_reads.sum().item() / full.sum().item()

    def request(self, b: int) -> "StepStats":
        """Request ``b``'s statistics alone: per-head fields ``[..., 1, Hq]``, ``context`` ``[..., 1]``."""
        return StepStats(**{
            f.name: getattr(self, f.name)[..., b : b + 1] if f.name == "context" else getattr(self, f.name)[..., b : b + 1, :]
            for f in fields(StepStats)
        })  # fmt: skip

    @staticmethod
    def stack(steps: list["StepStats"], dim: int = 0) -> "StepStats":
        """Stack per-step stats along a new dimension ``dim`` (``[S, ...]`` by default)."""
        return StepStats(**{f.name: torch.stack([getattr(s, f.name) for s in steps], dim) for f in fields(StepStats)})


class Completion(NamedTuple):
    """The summaries of a step's critical path, each ``Summary([B, Hq, D], [B, Hq])``.

    Attributes:
        out: the step's output ``A(q_t, [0, S)) ⊕ C ⊕ A(q_t, [N, t+1))``.
        cached: ``C``, over ``[S, N)``: the ``split`` rule's new row.
        rest: ``A(q_t, [0, S)) ⊕ A(q_t, [N, t+1))``, what the ``subtract`` rule removes from ``out``.
    """

    out: Summary
    cached: Summary
    rest: Summary
