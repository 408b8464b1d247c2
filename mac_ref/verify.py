r"""Verify: full attention for a block of ``L`` consecutive queries of each request, with each query's exact ring row.

Lossless MAC (:mod:`mac_llm.lossless`) checks ``L = k + 1`` tokens of a request at once:
query ``i`` of request ``b`` sits at position ``t = p_b + i`` and attends causally to the
keys ``[0, t + 1)``, the block's own earlier keys included (they are in the cache). For
each query the pass returns what a MAC *miss* step at ``t`` computes:

.. math::
    \text{out}_t = A(q_t, [0, S_t)) \oplus R_t \oplus A(q_t, [N_t, t+1)), \qquad
    R_t = A(q_t, [S_t, N_t))

with ``N_t = E(t) = max(t + 1 − r, 0)`` and ``S_t = min(F, N_t)``: ``out`` is full
attention, and ``R_t`` is the exact row a miss caches, so the rows cost no extra reads.

Why a stage of its own: the ``L`` queries of a request read the same keys, so a kernel
(:func:`mac_triton.verify.verify_attention`) streams each KV group's keys once for its
``L·g`` query rows, where ``L`` separate decode steps would stream them ``L`` times.
"""

from __future__ import annotations

import torch

from mac_core.checks import check_verify_inputs
from mac_core.config import MACConfig
from mac_core.step import Completion, row_range

from .summary import attend, merge


def verify_attention(q_post, k_cache, v_cache, positions, config: MACConfig, scale: float | None = None) -> Completion:
    """Full attention of ``L`` consecutive queries per request, split as a miss step splits it.

    Args:
        q_post: ``[B, Hq, L, D]`` post-RoPE queries; query ``i`` of request ``b`` is at
            position ``positions[b] + i``.
        k_cache, v_cache: ``[B, Hkv, T, D]`` post-RoPE keys and values, the block's own
            keys written (``T > positions[b] + L − 1``).
        positions: ``[B]`` int64, the block's first position per request.
        config: ``band`` (``r``), ``sinks`` (``F``) and ``softcap`` are used.
        scale: softmax scale, ``1/sqrt(D)`` by default.

    Returns:
        :class:`~mac_core.step.Completion` of ``Summary([B, Hq, L, D], [B, Hq, L])``:
        ``out`` (full attention), ``cached`` (``R_t``, the exact ring row) and ``rest``
        (sinks ⊕ tail), in the compute dtype.

    Examples:
        >>> import torch
        >>> from mac_ref import MACConfig, full_attention
        >>> g = torch.Generator().manual_seed(0)
        >>> q, k, v = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 1, 40, 8, generator=g), torch.randn(1, 1, 40, 8, generator=g)
        >>> res = verify_attention(q, k, v, torch.tensor([30]), MACConfig(window=8, band=4, sinks=2))
        >>> res.out.o.shape, res.cached.lse.shape
        (torch.Size([1, 2, 3, 8]), torch.Size([1, 2, 3]))
        >>> o, _ = full_attention(q[:, :, 2], k, v, torch.tensor([33]))  # query 2 sits at position 32: keys [0, 33)
        >>> torch.allclose(res.out.o[:, :, 2], o.float(), atol=1e-6)
        True
    """
    check_verify_inputs(q_post, k_cache, v_cache, positions, config)
    return verify_step(q_post, k_cache, v_cache, positions, config, scale)


def verify_step(q_post, k_cache, v_cache, positions, config: MACConfig, scale: float | None = None) -> Completion:
    """:func:`verify_attention` without its checks (the twin of :func:`mac_triton.verify.verify_step`)."""
    L = q_post.shape[2]
    t = (positions.to(torch.int64)[:, None] + torch.arange(L, device=q_post.device))[:, None]  # [B, 1, L]: broadcast over heads
    start, end = row_range(t, config.band, config.sinks)  # S_t, N_t
    row = attend(q_post, k_cache, v_cache, start, end, scale, config.softcap)
    sinks = attend(q_post, k_cache, v_cache, 0, start, scale, config.softcap)
    tail = attend(q_post, k_cache, v_cache, end, t + 1, scale, config.softcap)
    return Completion(out=merge(merge(sinks, row), tail), cached=row, rest=merge(sinks, tail))


__all__ = ["verify_attention", "verify_step"]
