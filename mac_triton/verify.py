r"""Verify in Triton: full attention of ``L`` consecutive queries per request, each KV group's keys read once.

Twin of :func:`mac_ref.verify.verify_attention` (same signature and result; the math is on
the docs' real-model page, "Lossless MAC"). Query ``i`` of request ``b`` sits at
``t = p_b + i``; it attends to ``[0, t+1)``, split as a miss step splits it:
``R_t = A(q_t, [S_t, N_t))`` (the exact ring row) and ``rest = A(q_t, [0, S_t) ∪ [N_t, t+1))``,
``out = R_t ⊕ rest``.

**Why a kernel of its own.** Run as ``B·L`` separate decode steps, the verify pass streams
each request's keys ``L`` times; here one program holds the ``L·g`` query rows of a KV
group (``g = Hq / Hkv``) as the ``M`` side of one ``tl.dot`` per key tile, so the keys are
streamed once, whatever ``L``. Each row keeps two online-softmax states (its row range and
the rest), selected per key by masks: the row's causal end ``t`` and its ``[S_t, N_t)``.

**Batch invariance.** Program ``(group, split)`` reads the keys ``[split·chunk,
(split+1)·chunk)``; ``chunk`` is fixed (not derived from the batch), key tiles start at
multiples of ``BLOCK_N``, and a tile that holds none of a row's keys leaves its state
exactly as it was. So a row's result depends on its own query, keys and range, not on the
batch, on ``L`` or on where in the block it sits; with the same ``rows`` (the padded ``M``
of the dot) the same row comes out bit for bit. Lossless MAC uses that to decode the same
tokens as full attention decoded through this kernel, in bf16 too.

Launch: a grid of ``(B·Hkv, ⌈max_keys / chunk⌉)`` programs writes float32 partial states
(a split past a request's length writes the empty summary); :func:`mac_triton.summary.merge_all`
folds the splits, :func:`mac_triton.summary.merge` gives ``out``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mac_core.checks import check_verify_inputs
from mac_core.config import MACConfig
from mac_core.numerics import LOG2E, softmax_scale
from mac_core.step import Completion

from .attend import _online_tile, _store_state, tile_scores
from .launch import upcast_dots
from .numerics import LIMITS
from .summary import merge, merge_all

CHUNK = 512  # keys per program: fixed, so a row's split boundaries do not depend on the batch


@triton.jit
def _verify_kernel(
    q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, pos_ptr,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    B, Hkv, G, L, n_split, band, sinks, scale_log2, cap_log2,
    CHUNK: tl.constexpr, SOFTCAP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    grp = tl.program_id(0)
    split = tl.program_id(1)
    b = grp // Hkv
    kvh = grp % Hkv
    Hq = Hkv * G
    rows = tl.arange(0, ROWS)  # row r: head r // L of the group, query r % L
    row_mask = rows < G * L
    i = rows % L
    heads = kvh * G + rows // L
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    first = tl.load(pos_ptr + b)  # p_b
    t = first + i  # [ROWS] each row's position
    row_end = tl.maximum(t + 1 - band, 0)  # N_t = E(t)
    row_start = tl.minimum(row_end, sinks)  # S_t = min(F, N_t)
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + i[:, None] * stride_ql + cols[None, :],
        mask=row_mask[:, None] & col_mask[None, :], other=0.0,
    )  # [ROWS, D]
    if UPCAST:
        q = q.to(tl.float32)
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, first + L)  # the block's keys end at p_b + L
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh * stride_kh  # (int64: B·Hkv·T·D may pass 2³¹)
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kvh * stride_vh
    row_m = tl.full([ROWS], float("-inf"), tl.float32)  # the row range's running state, base 2
    row_den = tl.zeros([ROWS], tl.float32)
    row_acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    rest_m = tl.full([ROWS], float("-inf"), tl.float32)  # sinks and tail
    rest_den = tl.zeros([ROWS], tl.float32)
    rest_acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_mask = keys < hi
        tile_mask = key_mask[:, None] & col_mask[None, :]
        k = tl.load(k_base + keys.to(tl.int64)[:, None] * stride_kt + cols[None, :], mask=tile_mask, other=0.0)
        v = tl.load(v_base + keys.to(tl.int64)[:, None] * stride_vt + cols[None, :], mask=tile_mask, other=0.0)
        s, v = tile_scores(q, k, v, scale_log2, cap_log2, SOFTCAP, UPCAST)  # [ROWS, BLOCK_N] base-2 scores
        causal = key_mask[None, :] & (keys[None, :] <= t[:, None])
        in_row = (keys[None, :] >= row_start[:, None]) & (keys[None, :] < row_end[:, None])
        row_m, row_den, row_acc = _online_tile(row_m, row_den, row_acc, tl.where(causal & in_row, s, float("-inf")), v, UPCAST)
        rest_m, rest_den, rest_acc = _online_tile(rest_m, rest_den, rest_acc, tl.where(causal & ~in_row, s, float("-inf")), v, UPCAST)
    # partial states [2, B, Hq, L, n_split]: the row ranges', then the rests'
    part = (((b * Hq + heads) * L + i) * n_split + split).to(tl.int64)
    _store_state(part_o_ptr, part_lse_ptr, part, row_m, row_den, row_acc, row_mask, D, BLOCK_D)
    rest_part = part + B * Hq * L * n_split
    _store_state(part_o_ptr, part_lse_ptr, rest_part, rest_m, rest_den, rest_acc, row_mask, D, BLOCK_D)


def verify_attention(
    q_post, k_cache, v_cache, positions, config: MACConfig, scale: float | None = None, *,
    max_keys: int | None = None, rows: int | None = None, chunk: int = CHUNK, block_n: int = 64, warps: int | None = None,
) -> Completion:
    """Full attention of ``L`` consecutive queries per request (see :func:`mac_ref.verify.verify_attention`).

    Args:
        q_post: ``[B, Hq, L, D]`` post-RoPE queries (float16, bfloat16 or float32).
        k_cache, v_cache: ``[B, Hkv, T, D]`` dense caches, the block's own keys written.
        positions: ``[B]`` int64, the block's first position per request.
        config: ``band``, ``sinks`` and ``softcap`` are used.
        scale: softmax scale, ``1/sqrt(D)`` by default.
        max_keys: a host-side bound on ``positions + L`` over the batch: the grid's splits
            (default ``T``: no host sync, what a CUDA graph captures).
        rows: the dot's padded ``M`` (a power of two ≥ ``L·Hq/Hkv`` and ≥ 16; default the
            smallest); callers that compare blocks of different ``L`` bit for bit fix it.
        chunk: keys per program (a multiple of ``block_n``).
        block_n, warps: the key tile and the warps per program (default: 4, or 8 where the
            two ``[rows, D]`` float32 accumulators would not fit 4 warps' registers).

    Returns:
        :class:`~mac_core.step.Completion` of float32 ``Summary([B, Hq, L, D], [B, Hq, L])``:
        ``out``, ``cached`` (``R_t``), ``rest``.

    Examples:
        The reference's result to float32 rounding (a CPU runs the kernel under
        ``TRITON_INTERPRET=1``, set before ``triton`` is imported):

        >>> import torch, mac_ref, mac_triton
        >>> g = torch.Generator().manual_seed(0)
        >>> q, k, v = torch.randn(2, 4, 3, 16, generator=g), torch.randn(2, 2, 50, 16, generator=g), torch.randn(2, 2, 50, 16, generator=g)
        >>> config, positions = mac_ref.MACConfig(window=8, band=4, sinks=2), torch.tensor([30, 9])
        >>> ours = mac_triton.verify_attention(q, k, v, positions, config)
        >>> ref = mac_ref.verify_attention(q, k, v, positions, config)
        >>> torch.allclose(ours.out.o, ref.out.o, atol=1e-5), torch.allclose(ours.cached.lse, ref.cached.lse, atol=1e-5)
        (True, True)
    """
    check_verify_inputs(q_post, k_cache, v_cache, positions, config, LIMITS)
    B, Hq, L, D = q_post.shape
    T = k_cache.shape[2]
    need = max(16, triton.next_power_of_2(Hq // k_cache.shape[1] * L))
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < need or rows & (rows - 1)):
        raise ValueError(f"rows must be a power of two >= {need} (L·Hq/Hkv, and at least 16), got {rows!r}")
    if isinstance(block_n, bool) or not isinstance(block_n, int) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < block_n or chunk % block_n:
        raise ValueError(f"chunk must be a positive multiple of block_n={block_n}, got {chunk!r}")
    if max_keys is not None and (isinstance(max_keys, bool) or not isinstance(max_keys, int) or not 0 < max_keys <= T):
        raise ValueError(f"max_keys must be an int in [1, T={T}], an upper bound on positions + L, got {max_keys!r}")
    return verify_step(q_post, k_cache, v_cache, positions, config, softmax_scale(D, scale), max_keys=max_keys, rows=rows,
                       chunk=chunk, block_n=block_n, warps=warps)  # fmt: skip


def verify_step(
    q_post, k_cache, v_cache, positions, config: MACConfig, scale: float, *,
    max_keys: int | None = None, rows: int | None = None, chunk: int = CHUNK, block_n: int = 64, warps: int | None = None,
) -> Completion:
    """:func:`verify_attention` without checks: no validation, no host sync, so a CUDA graph
    can capture it (with ``max_keys`` fixed or left to ``T``)."""
    B, Hq, L, D = q_post.shape
    Hkv, T = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    n_split = triton.cdiv(T if max_keys is None else max_keys, chunk)
    rows = rows or max(16, triton.next_power_of_2(G * L))
    block_d = max(16, triton.next_power_of_2(D))
    warps = warps or (8 if rows * block_d >= 32 * 128 else 4)  # (32 rows × D 128 with 4 warps: 255 registers, spilling under Triton 3.9; compiled for sm_90)
    f32 = torch.float32
    part_o = torch.empty(2, B, Hq, L, n_split, D, dtype=f32, device=q_post.device)
    part_lse = torch.empty(2, B, Hq, L, n_split, dtype=f32, device=q_post.device)
    if B:
        softcap = config.softcap
        _verify_kernel[(B * Hkv, n_split)](
            q_ptr=q_post, k_ptr=k_cache, v_ptr=v_cache, part_o_ptr=part_o, part_lse_ptr=part_lse, pos_ptr=positions,
            stride_qb=q_post.stride(0), stride_qh=q_post.stride(1), stride_ql=q_post.stride(2),
            stride_kb=k_cache.stride(0), stride_kh=k_cache.stride(1), stride_kt=k_cache.stride(2),
            stride_vb=v_cache.stride(0), stride_vh=v_cache.stride(1), stride_vt=v_cache.stride(2),
            B=B, Hkv=Hkv, G=G, L=L, n_split=n_split, band=config.band, sinks=config.sinks,
            scale_log2=scale * LOG2E, cap_log2=0.0 if softcap is None else softcap * LOG2E,
            CHUNK=chunk, SOFTCAP=softcap is not None, D=D, BLOCK_D=block_d, ROWS=rows, BLOCK_N=block_n,
            UPCAST=upcast_dots(k_cache.dtype), num_warps=warps,
        )
    row = merge_all(part_o[0], part_lse[0])  # [B, Hq, L, D], [B, Hq, L]
    rest = merge_all(part_o[1], part_lse[1])
    return Completion(out=merge(row, rest), cached=row, rest=rest)


__all__ = ["CHUNK", "verify_attention", "verify_step"]
