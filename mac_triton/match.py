r"""Match in Triton: per query head, the nearest recent pre-RoPE query and the hit test.

Twin of :func:`mac_ref.match.match` (same signature, same :class:`MatchResult`):
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
- :func:`decode_key` turns the key back into ``(hit, j*, d)``; the fused decode step does
  that inside its attention kernels instead of launching :func:`match`'s finalize kernel.
  The keys live in a per-device workspace that their consumer resets, so a step needs
  no fill launch.

Differences: the sum over ``D`` runs in another order than torch's, so distances agree
to float32 rounding and two candidates within rounding of each other may swap.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mac_ref.config import MACConfig
from mac_ref.match import MatchResult
from mac_ref.state import LayerState

from ._common import check_kernel_dtype, num_sms

NO_CANDIDATE = 2**63 - 1  # the key of a head with no candidate yet (decodes to distance NaN)
_NO_CANDIDATE = tl.constexpr(NO_CANDIDATE)
# launch parameters: benchmarks/tune_decode.py on an H100 (ring 1024, Hq 32, D 128, bf16):
# 48.4 µs for the 134 MB of rings at batch 16 (the sweep spanned 48.0 … 61.9 µs) and
# 4.5 µs at batch 1 (4.5 … 6.7 µs)
BLOCK_W = 64  # ring slots per tile
MATCH_WARPS = 2
PROGRAMS_PER_SM = 4  # the window is split until the scan has about this many programs per SM


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
def decode_key(key, t, min_context, radius_sq):
    """``(hit, j*, d)`` of a head's match key at position ``t`` (``j* = −1``, ``d = inf``:
    no candidate)."""
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


_RADII: dict = {}


def radius_sq_per_head(config: MACConfig, q_heads: int, head_dim: int, device) -> torch.Tensor:
    """``[Hq]`` float32 squared hit radii ``2D(1−τ)² s_h²``, rounded as ``mac_ref.match`` rounds them.

    Cached per (config, shape, device), so that a step captured in a CUDA graph makes no
    host-to-device copy."""
    cache_key = (config.tau, config.radius_scale, q_heads, head_dim, str(device))
    radius = _RADII.get(cache_key)
    if radius is None:
        radius = torch.full((q_heads,), config.hit_radius_sq(head_dim), dtype=torch.float32, device=device)
        if config.radius_scale is not None:
            if len(config.radius_scale) != q_heads:
                raise ValueError(
                    f"config.radius_scale must have one factor per query head ({q_heads}), got {len(config.radius_scale)}"
                )
            radius = radius * torch.tensor(config.radius_scale, dtype=torch.float32, device=device) ** 2
        _RADII[cache_key] = radius
    return radius


_KEY_WORKSPACES: dict = {}


def key_workspace(device, n: int) -> torch.Tensor:
    """The ``[n]`` int64 match keys of a device, all :data:`NO_CANDIDATE` between steps.

    Kept across steps so that a step needs no fill launch: whoever consumes the keys (the
    finalize kernel of :func:`match`, the reduce kernel of the decode step) writes
    :data:`NO_CANDIDATE` back. One step at a time per device and batch shape."""
    workspace = _KEY_WORKSPACES.get((str(device), n))
    if workspace is None:
        workspace = torch.full((n,), NO_CANDIDATE, dtype=torch.int64, device=device)
        _KEY_WORKSPACES[(str(device), n)] = workspace
    return workspace


def match_keys(
    q_pre: torch.Tensor, ring_q: torch.Tensor, positions: torch.Tensor, ring_depth: torch.Tensor | None = None,
    max_chain: int | None = None,
) -> torch.Tensor:
    """Launch the scan: ``[B·Hq]`` int64 keys ``bits(d_{j*}) << 32 | lag`` in the device's
    :func:`key_workspace` (see the module doc); the caller must consume and reset them.
    With ``max_chain``, rows whose ``ring_depth [B, Hq, W]`` is ``≥ max_chain`` are skipped."""
    B, Hq, D = q_pre.shape
    W = ring_q.shape[2]
    if ring_q.stride(-1) != 1 or q_pre.stride(-1) != 1:
        raise ValueError("q_pre and state.ring_q must be contiguous in the head dimension")
    keys = key_workspace(q_pre.device, B * Hq)
    if B * Hq == 0:
        return keys
    # split the window until there are enough programs to keep every SM's loads in flight
    splits = max(1, min(triton.cdiv(W, BLOCK_W), triton.cdiv(PROGRAMS_PER_SM * num_sms(q_pre.device), B * Hq)))
    slots_per_program = triton.cdiv(triton.cdiv(W, splits), BLOCK_W) * BLOCK_W
    splits = triton.cdiv(W, slots_per_program)
    bounded = max_chain is not None
    depth = ring_depth if bounded else positions  # (unread without a bound)
    if bounded and depth.stride(-1) != 1:
        raise ValueError("state.ring_depth must be contiguous in the window dimension")
    _match_kernel[(B * Hq, splits)](
        q_pre, ring_q, depth, positions, keys,
        q_pre.stride(0), q_pre.stride(1), ring_q.stride(0), ring_q.stride(1), ring_q.stride(2),
        depth.stride(0) if bounded else 0, depth.stride(1) if bounded else 0,
        Hq, W, slots_per_program, max_chain or 0,
        D=D, BLOCK_W=BLOCK_W, BLOCK_D=triton.next_power_of_2(D), BOUNDED=bounded,
        num_warps=MATCH_WARPS,
    )
    return keys


def match(q_pre: torch.Tensor, state: LayerState, positions: torch.Tensor, config: MACConfig) -> MatchResult:
    """Match each query head against its ring window (see :func:`mac_ref.match.match`).

    Args:
        q_pre: ``[B, Hq, D]`` pre-RoPE queries (float16 / bfloat16 / float32).
        state: the layer's rings; ``state.ring_q`` is ``[B, Hq, W, D]``.
        positions: ``[B]`` int32/int64 current positions ``t``.
        config: ``τ``, ``radius_scale``, ``min_context`` and ``max_chain`` (the window is the ring's).

    Returns:
        :class:`~mac_ref.match.MatchResult`: ``hit [B, Hq]`` bool, ``matched_pos [B, Hq]``
        int64 (``-1``: no candidate), ``distance [B, Hq]`` float32 (``inf``: no candidate).
    """
    check_kernel_dtype("q_pre", q_pre)
    B, Hq, D = q_pre.shape
    keys = match_keys(q_pre, state.ring_q, positions, state.ring_depth, config.max_chain)
    hit = torch.empty(B, Hq, dtype=torch.int8, device=q_pre.device)
    matched = torch.empty(B, Hq, dtype=torch.int64, device=q_pre.device)
    dist = torch.empty(B, Hq, dtype=torch.float32, device=q_pre.device)
    n = B * Hq
    if n:
        block = 128
        _finalize_kernel[(triton.cdiv(n, block),)](
            keys, positions, radius_sq_per_head(config, Hq, D, q_pre.device), hit, matched, dist, n, Hq,
            config.min_context, BLOCK=block,
        )
    return MatchResult(hit.view(torch.bool), matched, dist)
