"""The float64 dense full-attention oracle.

Deliberately the plainest possible code: repeat the KV heads, softmax in float64, no
masking tricks. Everything else is measured against it.
"""

from __future__ import annotations

import math

import torch
from mac_core.numerics import softmax_scale


def _capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``c·tanh(s / c)`` (Gemma 2's soft-capping), or the scores unchanged without a cap."""
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)


def full_attention(q, k, v, lengths, scale: float | None = None, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over keys ``[0, lengths[b])``, in float64 on the CPU.

    Args:
        q: ``[B, Hq, D]``.
        k, v: ``[B, Hkv, T, D]``.
        lengths: ``[B]`` (or a list of ints) keys per request.
        scale: softmax scale, ``1/sqrt(D)`` by default.
        softcap: ``None`` or the soft-cap ``c``: scores ``c·tanh(scale·q·k / c)``.

    Returns:
        ``(o [B, Hq, D], lse [B, Hq])`` float64; ``(0, −inf)`` where the length is 0.
    """
    B, Hq, D = q.shape
    scale = softmax_scale(D, scale)
    group = Hq // k.shape[1]
    o = torch.zeros(B, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq), -math.inf, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        if n == 0:
            continue
        kb = k[b, :, :n].double().cpu().repeat_interleave(group, dim=0)  # [Hq, n, D]
        vb = v[b, :, :n].double().cpu().repeat_interleave(group, dim=0)
        scores = _capped(scale * torch.einsum("hd,hnd->hn", q[b].double().cpu(), kb), softcap)  # [Hq, n]
        o[b] = torch.einsum("hn,hnd->hd", torch.softmax(scores, dim=-1), vb)
        lse[b] = torch.logsumexp(scores, dim=-1)
    return o, lse


def causal_attention(q, k, v, scale: float | None = None, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of every position of a stream, in float64 on the CPU.

    Args:
        q: ``[B, Hq, T, D]`` post-RoPE queries.
        k, v: ``[B, Hkv, T, D]``.
        scale: softmax scale, ``1/sqrt(D)`` by default.
        softcap: ``None`` or the soft-cap ``c``: scores ``c·tanh(scale·q·k / c)``.

    Returns:
        ``(o [B, Hq, T, D], lse [B, Hq, T])`` float64.
    """
    B, Hq, T, D = q.shape
    scale = softmax_scale(D, scale)
    group = Hq // k.shape[1]
    kk = k.double().cpu().repeat_interleave(group, dim=1)  # [B, Hq, T, D]
    vv = v.double().cpu().repeat_interleave(group, dim=1)
    scores = _capped(scale * q.double().cpu() @ kk.transpose(-1, -2), softcap)  # [B, Hq, T, T]
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(future, -math.inf)
    return torch.softmax(scores, dim=-1) @ vv, torch.logsumexp(scores, dim=-1)
