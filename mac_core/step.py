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


def step_spans(positions: torch.Tensor, result: "MatchResult", config) -> "Spans":
    """Sink, band and tail ranges for the tokens at ``positions [B]`` given the hits of ``result``.

    ``N = E(t)``, ``S = min(F, N)``; a hit's band starts at ``P = max(E(j*), S)``, a miss's at
    ``S``. Only the band's start depends on the decisions: the sinks ``[0, S)`` and the tail
    ``[N, t+1)`` are the same for every head of the step (spec: [the ranges][spec-ranges]).

    The ranges of a concrete hit (``t = 100``, ``r = 24``, ``j* = 87``, no sinks):

    >>> import torch
    >>> from mac_core import MACConfig, MatchResult
    >>> t, j = torch.tensor([100]), torch.tensor([[87]])
    >>> hit = MatchResult(torch.tensor([[True]]), j, torch.tensor([[0.0]]))
    >>> spans = step_spans(t, hit, MACConfig(window=32, band=24))
    >>> band = spans.band_end - spans.band_start        # [P, N) = [E(87), E(100)) = [64, 77)
    >>> tail = spans.tail_end - spans.band_end          # [N, t+1) = [77, 101)
    >>> band.item(), tail.item(), spans.keys_read().item()   # t − j*, r, r + (t − j*)
    (13, 24, 37)
    """
    t = positions[:, None].expand_as(result.matched_pos)  # [B, Hq]
    band_end = prefix_end(t, config.band)  # N
    sink_end = torch.clamp(band_end, max=config.sinks)  # S = min(F, N)
    matched_end = prefix_end(result.matched_pos, config.band)  # E(j*)
    band_start = torch.where(result.hit, torch.maximum(matched_end, sink_end), sink_end)
    return Spans(sink_end, band_start, band_end, t + 1)


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

    @classmethod
    def empty(cls, *lead: int, batch: int = 0, q_heads: int = 0, device=None) -> "StepStats":
        """Statistics of no step: per-head fields ``[*lead, batch, q_heads]`` with a zero in ``lead``."""
        shape = (*lead, batch, q_heads)
        zeros = dict(dtype=torch.int64, device=device)
        no = dict(dtype=torch.bool, device=device)
        return cls(
            hit=torch.zeros(shape, **no), matched_pos=torch.zeros(shape, **zeros), distance=torch.zeros(shape, device=device),
            keys_read=torch.zeros(shape, **zeros), context=torch.zeros(shape[:-1], **zeros), ill_conditioned=torch.zeros(shape, **no),
            chain_depth=torch.zeros(shape, **zeros), candidate=torch.zeros(shape, **no), mass_share=torch.zeros(shape, device=device),
        )  # fmt: skip

    @property
    def hit_rate(self) -> float:
        """Share of (step, request, head) decisions that were hits (0 when no step is held)."""
        return self.hit.float().mean().item() if self.hit.numel() else 0.0

    def group_reads(self, kv_heads: int) -> torch.Tensor:
        """``[..., Hkv]`` keys read per KV group: the union of its heads' spans, which all end at
        ``t + 1``, so its longest one (what a kernel loading each K/V tile once for the group reads)."""
        *lead, Hq = self.keys_read.shape
        return self.keys_read.reshape(*lead, kv_heads, Hq // kv_heads).amax(-1)

    def skipped_fraction(self, kv_heads: int | None = None) -> float:
        """Share of full attention's key reads that were skipped, ``1 − Σ reads / Σ (t+1)``:
        per query head (``kv_heads=None``), or per KV group of ``Hq / kv_heads`` heads
        (:meth:`group_reads`: what a kernel that loads each K/V tile once for its group saves in bytes)."""
        reads = self.keys_read if kv_heads is None else self.group_reads(kv_heads)
        full = self.context.unsqueeze(-1).expand_as(reads)
        if not full.numel():
            return 0.0  # no step held: nothing skipped
        return 1.0 - reads.double().sum().item() / full.double().sum().item()

    def summary(self, kv_heads: int) -> dict[str, float]:
        """``hit_rate``, ``candidate_rate``, ``skipped_head``, ``skipped_group`` (:meth:`skipped_fraction`)
        and ``mass_share_mean`` (over the candidates) of all the steps and heads held."""
        share = self.mass_share[self.candidate].double()
        return {
            "hit_rate": self.hit_rate, "candidate_rate": self.candidate.double().mean().item() if self.candidate.numel() else 0.0,
            "skipped_head": self.skipped_fraction(), "skipped_group": self.skipped_fraction(kv_heads),
            "mass_share_mean": share.mean().item() if share.numel() else 0.0,
        }

    def bytes_moved(self, kv_heads: int, head_dim: int, window: int, kv_itemsize: int, query_itemsize: int) -> dict[str, float]:
        """Bytes the steps held moved through memory, by part (summed over steps, requests, heads):

        - ``kv``: the keys and values each KV group read, once per group (``2D`` elements a key);
        - ``scan``: the match scan: each query head reads ``min(t, W)`` ring rows of ``q̃``
          (``D`` elements of ``query_itemsize``) and their chain depths (int32);
        - ``rows``: the row each hit reuses (``o``, ``ℓ``: float32) and the row each step
          writes per head (``q̃``, ``o``, ``ℓ``, depth);
        - ``full_kv``: what full attention reads instead, all ``t + 1`` keys per group.

        Row-side bytes assume float32 rows (:class:`~mac_core.state.LayerState` for 16-bit
        and float32 queries); queries, outputs and the plan are left out (both read them).
        """
        D = head_dim
        reads = self.keys_read.double()
        group_reads = self.group_reads(kv_heads).double()
        context = self.context.double()  # [...]
        scanned = (context - 1).clamp(max=window).unsqueeze(-1).expand_as(reads)  # rows per head
        row_write = D * query_itemsize + 4 * D + 4 + 4
        return {
            "kv": group_reads.sum().item() * 2 * D * kv_itemsize,
            "scan": scanned.sum().item() * (D * query_itemsize + 4),
            "rows": self.hit.double().sum().item() * (4 * D + 4) + reads.numel() * row_write,
            "full_kv": context.sum().item() * kv_heads * 2 * D * kv_itemsize,
        }

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
