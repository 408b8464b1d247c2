r"""The decode step: match → amend → complete → row update, for a batch of requests.

One step for the token at position ``t`` (its own key/value already in the cache):

1. **Match** (:mod:`mac_ref.match`): ``j*`` and hit/miss per query head.
2. **Amend** (:mod:`mac_ref.amend`): ``C = R_{j*} ⊕ A(q_t, [P, N))`` on a hit,
   ``A(q_t, [S, N))`` on a miss.
3. **Complete** (:mod:`mac_ref.complete`): ``out = A(q_t, [0, S)) ⊕ C ⊕ A(q_t, [N, t+1))``.
4. **Row update**: ``R_t = C`` (``split``) or ``R_t = out ⊖ (A(sinks) ⊕ A(tail))``
   (``subtract``), written with ``q̃_t`` and its chain depth (``depth(j*) + 1`` on a hit,
   0 on a miss) into slot ``t mod W``.

Prefill is plain causal attention and seeds the rows of the last ``W`` prompt tokens
exactly: ``R_t = A(q_t, [S(t), E(t)))``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ._checks import check_int_tensor, check_same_device, check_tensor
from .amend import prefix_end, step_spans
from .complete import amend_complete
from .config import MACConfig
from .match import match
from .rope import apply_rope
from .state import LayerState, new_state
from .summary import Summary, attend, merge, remove


@dataclass
class StepStats:
    """What a decode step reports, per request and query head.

    Fields may carry leading step dimensions (see :meth:`stack`).

    Attributes:
        hit: ``[B, Hq]`` bool.
        matched_pos: ``[B, Hq]`` int64 nearest candidate ``j*`` (``-1``: no candidate);
            reported for misses too.
        distance: ``[B, Hq]`` squared L2 distance to ``j*`` (``inf``: no candidate).
        keys_read: ``[B, Hq]`` int64 keys the step attends to (sinks + band + tail).
        context: ``[B]`` int64 keys a full-attention step reads per head, ``t + 1``.
        ill_conditioned: ``[B, Hq]`` bool: the ``subtract`` rule's removal was flagged
            (always ``False`` under ``split``).
        chain_depth: ``[B, Hq]`` int64 reuse-chain depth of the row the step wrote
            (0 on a miss).
    """

    hit: torch.Tensor
    matched_pos: torch.Tensor
    distance: torch.Tensor
    keys_read: torch.Tensor
    context: torch.Tensor
    ill_conditioned: torch.Tensor
    chain_depth: torch.Tensor

    @property
    def hit_rate(self) -> float:
        """Share of (step, request, head) decisions that were hits."""
        return self.hit.float().mean().item()

    @property
    def skipped_fraction(self) -> float:
        """Share of full attention's key reads that were skipped: ``1 − Σ keys_read / Σ (t+1)``."""
        full = self.context.unsqueeze(-1).expand_as(self.keys_read)
        return 1.0 - self.keys_read.sum().item() / full.sum().item()

    @staticmethod
    def stack(steps: list["StepStats"]) -> "StepStats":
        """Stack per-step stats along a new leading dimension ``[S, ...]``."""
        return StepStats(**{f.name: torch.stack([getattr(s, f.name) for s in steps]) for f in fields(StepStats)})


def _check_cache(k_cache, v_cache, batch: int, q_heads: int, head_dim: int) -> None:
    check_tensor("k_cache", k_cache, 4, "[B, Hkv, T, D]")
    check_tensor("v_cache", v_cache, 4, "[B, Hkv, T, D]")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have one shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    B, Hkv, _, D = k_cache.shape
    if B != batch or D != head_dim:
        raise ValueError(f"k_cache must have shape [B={batch}, Hkv, T, D={head_dim}], got {tuple(k_cache.shape)}")
    if Hkv == 0 or q_heads % Hkv != 0:
        raise ValueError(f"the number of query heads of q_pre ({q_heads}) must be a multiple of the KV heads of k_cache ({Hkv})")


def check_step_inputs(q_pre, k_cache, v_cache, state: LayerState, positions, config: MACConfig, q_post=None) -> None:
    """Validate the arguments of a decode step (shared by ``mac_ref`` and ``mac_triton``).

    Raises:
        TypeError: a non-tensor, a non-float tensor, integer positions of another dtype.
        ValueError: wrong rank or shape, mixed devices, a state of another shape or window,
            a position beyond the cache capacity, or a step that does not follow the
            previous one (``positions != state.next_pos``).
    """
    check_tensor("q_pre", q_pre, 3, "[B, Hq, D]")
    B, Hq, D = q_pre.shape
    _check_cache(k_cache, v_cache, B, Hq, D)
    if q_post is not None:
        check_tensor("q_post", q_post, 3, "[B, Hq, D]")
        if q_post.shape != q_pre.shape:
            raise ValueError(f"q_post must have q_pre's shape {tuple(q_pre.shape)}, got {tuple(q_post.shape)}")
    check_int_tensor("positions", positions, (B,))
    check_same_device(
        q_pre=q_pre, k_cache=k_cache, v_cache=v_cache, positions=positions, ring_q=state.ring_q, ring_depth=state.ring_depth,
        q_post=q_post,
    )
    if tuple(state.ring_q.shape) != (B, Hq, config.window, D):
        raise ValueError(
            f"state.ring_q must have shape [B={B}, Hq={Hq}, W={config.window}, D={D}], got {tuple(state.ring_q.shape)}"
        )
    if tuple(state.ring_depth.shape) != (B, Hq, config.window) or state.ring_depth.dtype != torch.int32:
        raise ValueError(
            f"state.ring_depth must be int32 of shape [B={B}, Hq={Hq}, W={config.window}], "
            f"got {state.ring_depth.dtype} {tuple(state.ring_depth.shape)}"
        )
    capacity = k_cache.shape[2]
    if bool((positions >= capacity).any()) or bool((positions < 0).any()):
        raise ValueError(f"positions {positions.tolist()} must lie in [0, {capacity}), the KV cache capacity")
    if not torch.equal(positions.to(torch.int64), state.next_pos):
        raise ValueError(
            f"positions {positions.tolist()} do not follow the previous step: the state expects {state.next_pos.tolist()}"
        )


def update_row(out: Summary, cached: Summary, q_post, k_cache, v_cache, spans, config: MACConfig, scale: float):
    """The new ring row ``R_t`` and the ``subtract`` rule's ill-conditioned mask ``[B, Hq]``.

    ``split``: ``R_t = C``. ``subtract``: ``R_t = out ⊖ (A(q_t, [0, S)) ⊕ A(q_t, [N, t+1)))``.
    """
    if config.row_update == "split":
        return cached, torch.zeros_like(cached.lse, dtype=torch.bool)
    sinks = attend(q_post, k_cache, v_cache, 0, spans.sink_end, scale)
    tail = attend(q_post, k_cache, v_cache, spans.band_end, spans.tail_end, scale)
    return remove(out, merge(sinks, tail))


def decode_step(q_pre, k_cache, v_cache, state: LayerState, positions, config: MACConfig, q_post=None):
    """One MAC-Attention decode step for a batch of requests (updates ``state`` in place).

    Args:
        q_pre: ``[B, Hq, D]`` pre-RoPE queries of the tokens at ``positions``.
        k_cache, v_cache: ``[B, Hkv, T, D]`` post-RoPE keys and values; key ``positions[b]``
            of request ``b`` is already written. Entries past a request's position are
            never read.
        state: the layer's rings (from :func:`prefill` or :func:`~mac_ref.state.new_state`).
        positions: ``[B]`` int64, must equal ``state.next_pos``.
        config: the MAC configuration.
        q_post: ``[B, Hq, D]`` post-RoPE queries; by default ``apply_rope(q_pre, positions,
            config.rope_base)``. Pass the model's own to use another RoPE variant.

    Returns:
        ``(out [B, Hq, D] in q_pre's dtype, lse [B, Hq] in the compute dtype, StepStats)``.
    """
    check_step_inputs(q_pre, k_cache, v_cache, state, positions, config, q_post)
    positions = positions.to(torch.int64)
    D = q_pre.shape[-1]
    scale = config.softmax_scale(D)
    if q_post is None:
        q_post = apply_rope(q_pre, positions[:, None], config.rope_base)

    result = match(q_pre, state, positions, config)
    spans = step_spans(positions, result, config)
    out, cached = amend_complete(q_post, k_cache, v_cache, state, result, spans, scale)
    row, ill_conditioned = update_row(out, cached, q_post, k_cache, v_cache, spans, config, scale)
    depth = torch.where(result.hit, state.depths(result.matched_pos.clamp(min=0)).to(torch.int64) + 1, 0)  # [B, Hq]
    state.write(positions, q_pre, row, depth)
    state.next_pos = positions + 1

    stats = StepStats(
        hit=result.hit,
        matched_pos=result.matched_pos,
        distance=result.distance,
        keys_read=spans.keys_read(),
        context=positions + 1,
        ill_conditioned=ill_conditioned,
        chain_depth=depth,
    )
    return out.o.to(q_pre.dtype), out.lse, stats


def prefill(q_pre, k_cache, v_cache, prompt_lengths, config: MACConfig, q_post=None):
    """Full causal attention over the prompts, and rings seeded for decoding.

    Rows of the last ``min(W, n_b)`` prompt tokens are exact:
    ``R_t = A(q_t, [min(F, E(t)), E(t)))``.

    Args:
        q_pre: ``[B, Hq, L, D]`` pre-RoPE queries of positions ``0 … L−1``.
        k_cache, v_cache: ``[B, Hkv, T, D]`` with ``T ≥ L``; keys ``0 … n_b−1`` written.
        prompt_lengths: ``[B]`` int64 ``n_b ≤ L`` (0 allowed), or an int for all requests.
        config: the MAC configuration.
        q_post: ``[B, Hq, L, D]`` post-RoPE queries; by default RoPE of ``q_pre``.

    Returns:
        ``(out [B, Hq, L, D], lse [B, Hq, L], state)``. Positions ``≥ n_b`` hold the empty
        summary ``(0, −inf)``; ``state.next_pos = prompt_lengths``.
    """
    check_tensor("q_pre", q_pre, 4, "[B, Hq, L, D]")
    B, Hq, L, D = q_pre.shape
    _check_cache(k_cache, v_cache, B, Hq, D)
    if q_post is not None:
        check_tensor("q_post", q_post, 4, "[B, Hq, L, D]")
        if q_post.shape != q_pre.shape:
            raise ValueError(f"q_post must have q_pre's shape {tuple(q_pre.shape)}, got {tuple(q_post.shape)}")
    if isinstance(prompt_lengths, int):
        prompt_lengths = torch.full((B,), prompt_lengths, dtype=torch.int64, device=q_pre.device)
    check_int_tensor("prompt_lengths", prompt_lengths, (B,))
    check_same_device(q_pre=q_pre, k_cache=k_cache, v_cache=v_cache, prompt_lengths=prompt_lengths, q_post=q_post)
    if L > k_cache.shape[2]:
        raise ValueError(f"q_pre has {L} positions, more than the KV cache capacity {k_cache.shape[2]}")
    if bool((prompt_lengths < 0).any()) or bool((prompt_lengths > L).any()):
        raise ValueError(f"prompt_lengths {prompt_lengths.tolist()} must lie in [0, {L}] (L = q_pre.shape[2])")
    prompt_lengths = prompt_lengths.to(torch.int64)
    scale = config.softmax_scale(D)
    pos = torch.arange(L, device=q_pre.device)  # [L]
    if q_post is None:
        q_post = apply_rope(q_pre, pos, config.rope_base)

    in_prompt = pos[None, None, :] < prompt_lengths[:, None, None]  # [B, 1, L]
    causal_end = torch.where(in_prompt, pos + 1, 0)  # empty range past the prompt
    out = attend(q_post, k_cache, v_cache, 0, causal_end, scale)

    row_end = prefix_end(pos, config.band)  # E(t)  [L]
    row_start = torch.clamp(row_end, max=config.sinks)
    rows = attend(q_post, k_cache, v_cache, row_start, row_end, scale)

    state = new_state(B, Hq, D, config, dtype=q_pre.dtype, device=q_pre.device)
    W = config.window
    for b in range(B):
        n = int(prompt_lengths[b])
        seeded = torch.arange(max(0, n - W), n, device=q_pre.device)  # the last W prompt tokens
        slots = seeded % W
        state.ring_q[b, :, slots] = q_pre[b, :, seeded]
        state.ring_o[b, :, slots] = rows.o[b, :, seeded].to(state.ring_o.dtype)
        state.ring_lse[b, :, slots] = rows.lse[b, :, seeded].to(state.ring_lse.dtype)
    state.next_pos = prompt_lengths.clone()
    return out.o.to(q_pre.dtype), out.lse, state
