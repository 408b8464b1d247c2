r"""Match in Triton: per query head, the nearest recent pre-RoPE query and the distance test.

Twin of :func:`mac_ref.match.find_match` (same signature, same :class:`~mac_core.step.MatchResult`):
``d_j = ‖q̃_t − q̃_j‖²`` over the candidates ``j ∈ [max(0, t−W), t)`` (ring slot
``j mod W``, lag ``t − j``), ``j* = argmin d_j`` with ties to the smallest lag, hit iff
``d_{j*} < 2D(1−τ)² s_h²`` (``s_h``: ``config.radius_scale``, 1 by default) and
``t ≥ min_context``; with ``config.max_chain = K`` rows of chain depth ``≥ K`` are no
candidates (the scan then also reads the ring's int32 depths).

How it maps onto the GPU:

- program ``(b·Hq + h, s)`` scans slots ``[s·L, (s+1)·L)`` of one head's ring in tiles of
  ``BLOCK_W × D``, distances in float32; the window is split over ``s`` only when
  ``B·Hq`` alone would leave SMs idle (batch 1);
- each program folds its best candidate into one int64 per head with ``atomic_min``:
  ``key = bits(d) << 32 | lag``. Non-negative float32 bit patterns order like the floats,
  so the smallest key is the smallest distance and, among equal distances, the smallest
  lag: exactly the reference's tie rule, whatever the order the programs finish in;
- a group match (``config.group_match``): program ``b·Hkv + g`` scans the whole window of
  the group's ``G`` heads, sums their distances per slot and keeps, beside the best
  ``(Σ_h d, lag)``, each head's own distance there; it stores each head's key
  ``bits(d_h) << 32 | lag`` directly (one program per group: no atomics, no split);
- :func:`decode_key` turns the key back into ``(candidate, j*, d)``; the fused decode step
  does that inside its attention kernels instead of launching :func:`find_match`'s
  finalize kernel. The keys live in a workspace of the step's (``mac_triton.decode.
  DecodeWorkspace``) that their consumer resets, so a step needs no fill launch.

Differences: the sum over ``D`` runs in another order than torch's, so distances agree
to float32 rounding and two candidates within rounding of each other may swap.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mac_core.checks import check_group
from mac_core.config import MACConfig
from mac_core.state import LayerState
from mac_core.step import MatchResult

from .launch import MatchLaunch, match_launch_for, num_sms
from .numerics import LIMITS

NO_CANDIDATE = 2**63 - 1  # the key of a head with no candidate yet (decodes to distance NaN)
_NO_CANDIDATE: tl.constexpr = tl.constexpr(NO_CANDIDATE)


@triton.jit
def _match_kernel(
    q_ptr, ring_ptr, depth_ptr, pos_ptr, key_ptr,
    stride_qb, stride_qh, stride_rb, stride_rh, stride_rw, stride_db, stride_dh,
    Hq, W, slots_per_program, max_chain,
    D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, BOUNDED: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // Hq
    h = bh % Hq
    t = tl.load(pos_ptr + b).to(tl.int64)
    t_slot = (t % W).to(tl.int32)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + cols, mask=col_mask, other=0.0).to(tl.float32)  # [D]
    ring = ring_ptr + b.to(tl.int64) * stride_rb + h * stride_rh
    first = tl.program_id(1) * slots_per_program
    last = tl.minimum(first + slots_per_program, W)
    best = tl.full([BLOCK_W], _NO_CANDIDATE, tl.int64)
    for w0 in range(first, last, BLOCK_W):
        slots = w0 + tl.arange(0, BLOCK_W)  # [BLOCK_W]
        slot_mask = slots < last
        rows = tl.load(
            ring + slots[:, None] * stride_rw + cols[None, :], mask=slot_mask[:, None] & col_mask[None, :], other=0.0
        ).to(tl.float32)  # [BLOCK_W, D]
        diff = rows - q[None, :]
        dist = tl.sum(diff * diff, axis=1)  # [BLOCK_W]
        lag = t_slot - slots  # slot j mod W holds token j = t − lag, lag ∈ [1, W]
        lag = tl.where(lag <= 0, lag + W, lag)
        valid = slot_mask & (lag <= t)
        if BOUNDED:  # rows at the end of a reuse chain of max_chain links are no candidates
            depth = tl.load(depth_ptr + b * stride_db + h * stride_dh + slots, mask=slot_mask, other=0)
            valid = valid & (depth < max_chain)
        key = (dist.to(tl.int32, bitcast=True).to(tl.int64) << 32) | lag.to(tl.int64)
        best = tl.minimum(best, tl.where(valid, key, _NO_CANDIDATE))
    tl.atomic_min(key_ptr + bh, tl.min(best, axis=0))


@triton.jit
def _group_match_kernel(
    q_ptr, ring_ptr, depth_ptr, pos_ptr, key_ptr,
    stride_qb, stride_qh, stride_rb, stride_rh, stride_rw, stride_db, stride_dh,
    Hkv, G, W, max_chain,
    D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, G_PAD: tl.constexpr, BOUNDED: tl.constexpr,
):
    grp = tl.program_id(0)
    b = grp // Hkv
    first_head = (grp % Hkv) * G
    t = tl.load(pos_ptr + b).to(tl.int64)
    t_slot = (t % W).to(tl.int32)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    lanes = tl.arange(0, G_PAD)
    best = tl.full((), _NO_CANDIDATE, tl.int64)  # bits(Σ_h d) << 32 | lag of the best slot so far
    best_dist = tl.full([G_PAD], float("inf"), tl.float32)  # each head's own distance there
    for w0 in range(0, W, BLOCK_W):
        slots = w0 + tl.arange(0, BLOCK_W)  # [BLOCK_W]
        slot_mask = slots < W
        lag = t_slot - slots  # slot j mod W holds token j = t − lag, lag ∈ [1, W]
        lag = tl.where(lag <= 0, lag + W, lag)
        total = tl.zeros([BLOCK_W], tl.float32)
        per_head = tl.zeros([G_PAD, BLOCK_W], tl.float32)
        for g in range(G):
            h = first_head + g
            q = tl.load(q_ptr + b * stride_qb + h * stride_qh + cols, mask=col_mask, other=0.0).to(tl.float32)
            rows = tl.load(
                ring_ptr + b.to(tl.int64) * stride_rb + h * stride_rh + slots[:, None] * stride_rw + cols[None, :],
                mask=slot_mask[:, None] & col_mask[None, :], other=0.0,
            ).to(tl.float32)  # [BLOCK_W, D]
            diff = rows - q[None, :]
            dist = tl.sum(diff * diff, axis=1)  # [BLOCK_W]
            if BOUNDED:  # a row this head may not reuse is no candidate for the group
                depth = tl.load(depth_ptr + b * stride_db + h * stride_dh + slots, mask=slot_mask, other=0)
                dist = tl.where(depth < max_chain, dist, float("inf"))
            total += dist
            per_head = tl.where(lanes[:, None] == g, dist[None, :], per_head)
        valid = slot_mask & (lag <= t) & (total < float("inf"))
        key = tl.where(valid, (total.to(tl.int32, bitcast=True).to(tl.int64) << 32) | lag.to(tl.int64), _NO_CANDIDATE)
        tile_best = tl.min(key, axis=0)
        if tile_best < best:  # (lags are distinct: one slot holds the tile's best key)
            best = tile_best
            best_dist = tl.sum(tl.where(key[None, :] == tile_best, per_head, 0.0), axis=1)
    head_key = (best_dist.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (best & 0xFFFFFFFF)
    head_key = tl.where(best == _NO_CANDIDATE, _NO_CANDIDATE, head_key)
    tl.store(key_ptr + b * Hkv * G + first_head + lanes, head_key, mask=lanes < G)


@triton.jit
def decode_key(key, t, min_context, radius_sq):
    """``(candidate, j*, d)`` of a head's match key at position ``t``: the distance test
    ``d < radius_sq`` at ``t ≥ min_context`` (``j* = −1``, ``d = inf``: no candidate)."""
    lag = key & 0xFFFFFFFF
    dist = (key >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    has_candidate = dist < float("inf")  # False for inf and for the NaN of NO_CANDIDATE
    dist = tl.where(has_candidate, dist, float("inf"))
    matched = tl.where(has_candidate, t - lag, -1)
    hit = has_candidate & (dist < radius_sq)
    hit = tl.where(t >= min_context, hit, False)  # (the interpreter mis-types `&` with a scalar bool)
    return hit, matched, dist


@triton.jit
def _finalize_kernel(key_ptr, pos_ptr, radius_ptr, hit_ptr, matched_ptr, dist_ptr, n_heads, Hq, min_context, BLOCK: tl.constexpr):
    heads = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = heads < n_heads
    t = tl.load(pos_ptr + heads // Hq, mask=mask, other=0).to(tl.int64)
    radius_sq = tl.load(radius_ptr + heads % Hq, mask=mask, other=0.0)
    key = tl.load(key_ptr + heads, mask=mask, other=_NO_CANDIDATE)
    hit, matched, dist = decode_key(key, t, min_context, radius_sq)
    tl.store(hit_ptr + heads, hit.to(tl.int8), mask=mask)
    tl.store(matched_ptr + heads, matched, mask=mask)
    tl.store(dist_ptr + heads, dist, mask=mask)
    tl.store(key_ptr + heads, tl.full([BLOCK], _NO_CANDIDATE, tl.int64), mask=mask)  # leave the workspace clean


def radius_sq_per_head(config: MACConfig, q_heads: int, head_dim: int, device) -> torch.Tensor:
    """``[Hq]`` float32 squared radii ``2D(1−τ)² s_h²``, rounded as ``mac_ref.match`` rounds them."""
    return torch.tensor(config.radius_sq_per_head(q_heads, head_dim), dtype=torch.float32, device=device)


def new_keys(device, n: int) -> torch.Tensor:
    """``[n]`` int64 match keys, all :data:`NO_CANDIDATE`: the state a consumer leaves them in."""
    return torch.full((n,), NO_CANDIDATE, dtype=torch.int64, device=device)


def match_keys(
    q_pre: torch.Tensor, ring_q: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
    ring_depth: torch.Tensor | None = None, max_chain: int | None = None, launch: MatchLaunch | None = None,
    group: int | None = None,
) -> torch.Tensor:
    """Launch the scan (no validation, no host sync): fold ``bits(d_{j*}) << 32 | lag`` into
    the ``[B·Hq]`` int64 ``keys`` (all :data:`NO_CANDIDATE` on entry; see the module doc),
    which the caller must consume and reset. With ``max_chain``, rows whose
    ``ring_depth [B, Hq, W]`` is ``≥ max_chain`` are skipped; with ``group = Hq / Hkv``, the
    group match; ``launch`` defaults to :func:`mac_triton.launch.match_launch_for`. Returns ``keys``."""
    B, Hq, D = q_pre.shape
    W = ring_q.shape[2]
    launch = launch or match_launch_for(D)
    if B * Hq == 0:
        return keys
    bounded = max_chain is not None
    depth = ring_depth if bounded else None
    depth_strides = (depth.stride(0), depth.stride(1)) if bounded else (0, 0)
    if group is not None:
        _group_match_kernel[(B * Hq // group,)](
            q_ptr=q_pre, ring_ptr=ring_q, depth_ptr=depth, pos_ptr=positions, key_ptr=keys,
            stride_qb=q_pre.stride(0), stride_qh=q_pre.stride(1), stride_rb=ring_q.stride(0), stride_rh=ring_q.stride(1),
            stride_rw=ring_q.stride(2), stride_db=depth_strides[0], stride_dh=depth_strides[1],
            Hkv=Hq // group, G=group, W=W, max_chain=max_chain or 0,
            D=D, BLOCK_W=launch.block_w, BLOCK_D=triton.next_power_of_2(D), G_PAD=triton.next_power_of_2(group), BOUNDED=bounded,
            num_warps=launch.warps,
        )
        return keys
    # split the window until there are enough programs to keep every SM's loads in flight
    splits = max(1, min(triton.cdiv(W, launch.block_w), triton.cdiv(launch.programs_per_sm * num_sms(q_pre.device), B * Hq)))
    slots_per_program = triton.cdiv(triton.cdiv(W, splits), launch.block_w) * launch.block_w
    splits = triton.cdiv(W, slots_per_program)
    _match_kernel[(B * Hq, splits)](
        q_ptr=q_pre, ring_ptr=ring_q, depth_ptr=depth, pos_ptr=positions, key_ptr=keys,
        stride_qb=q_pre.stride(0), stride_qh=q_pre.stride(1), stride_rb=ring_q.stride(0), stride_rh=ring_q.stride(1),
        stride_rw=ring_q.stride(2), stride_db=depth_strides[0], stride_dh=depth_strides[1],
        Hq=Hq, W=W, slots_per_program=slots_per_program, max_chain=max_chain or 0,
        D=D, BLOCK_W=launch.block_w, BLOCK_D=triton.next_power_of_2(D), BOUNDED=bounded, num_warps=launch.warps,
    )
    return keys


def find_match(
    q_pre: torch.Tensor, state: LayerState, positions: torch.Tensor, config: MACConfig, kv_heads: int | None = None,
    launch: MatchLaunch | None = None,
) -> MatchResult:
    """Match each query head against its ring window (see :func:`mac_ref.match.find_match`).

    Args:
        q_pre: ``[B, Hq, D]`` pre-RoPE queries (float16 / bfloat16 / float32).
        state: the layer's rings; ``state.ring_q`` is ``[B, Hq, W, D]``.
        positions: ``[B]`` int32/int64 current positions ``t``.
        config: ``τ``, ``radius_scale``, ``min_context``, ``max_chain`` and ``group_match`` (the window is the ring's).
        kv_heads: ``Hkv``, the KV groups of ``config.group_match`` (needed only there).

    Returns:
        :class:`~mac_core.step.MatchResult`: ``hit [B, Hq]`` bool (the distance test),
        ``matched_pos [B, Hq]`` int64 (``-1``: no candidate), ``distance [B, Hq]`` float32
        (``inf``: no candidate).
    """
    LIMITS.check_dtype("q_pre", q_pre)
    LIMITS.check_dtype("state.ring_q", state.ring_q)
    B, Hq, D = q_pre.shape
    group = check_group(Hq, kv_heads) if config.group_match else None
    keys = match_keys(q_pre, state.ring_q, positions, new_keys(q_pre.device, B * Hq), state.ring_depth, config.max_chain, launch, group)
    hit = torch.empty(B, Hq, dtype=torch.int8, device=q_pre.device)
    matched = torch.empty(B, Hq, dtype=torch.int64, device=q_pre.device)
    dist = torch.empty(B, Hq, dtype=torch.float32, device=q_pre.device)
    n = B * Hq
    if n:
        block = 128
        _finalize_kernel[(triton.cdiv(n, block),)](
            key_ptr=keys, pos_ptr=positions, radius_ptr=radius_sq_per_head(config, Hq, D, q_pre.device), hit_ptr=hit,
            matched_ptr=matched, dist_ptr=dist, n_heads=n, Hq=Hq, min_context=config.min_context, BLOCK=block,
        )
    return MatchResult(hit.view(torch.bool), matched, dist)
