"""Run a whole token stream through one layer: prefill, then one decode step per token.

This is the entry point the demo, the tutorials, the tests and the benchmarks build on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mac_core.checks import check_tensor
from mac_core.config import MACConfig
from mac_core.state import LayerState
from mac_core.step import StepStats

from .decode import decode_step, prefill


@dataclass
class StreamResult:
    """Outputs of :func:`run_stream`.

    Attributes:
        out: ``[B, Hq, T, D]`` attention outputs (prefill and decode positions).
        lse: ``[B, Hq, T]`` their LSEs.
        stats: per decode step, fields ``[S, B, Hq]`` (``context``: ``[S, B]``).
        state: the rings after the last step.
    """

    out: torch.Tensor
    lse: torch.Tensor
    stats: StepStats
    state: LayerState


def run_stream(q_pre, k, v, prefill_len, config: MACConfig, q_post=None, progress: bool = False, step_fn=decode_step):
    """Prefill the first ``n_b`` tokens of each request, then decode the rest one by one.

    Every request decodes ``S = T − max(n_b)`` steps: request ``b`` covers positions
    ``n_b … n_b + S − 1``. Positions a request never reaches are left NaN in ``out`` and
    ``lse`` (nothing was computed there).

    Args:
        q_pre: ``[B, Hq, T, D]`` per-token pre-RoPE queries.
        k, v: ``[B, Hkv, T, D]`` per-token post-RoPE keys and values (the whole cache).
        prefill_len: int, list of ints or ``[B]`` int64 tensor: prompt lengths ``n_b``.
        config: the MAC configuration (one that names a ``calibration`` is calibrated on the
            prompts first: :meth:`~mac_core.config.MACConfig.calibrated`).
        q_post: optional ``[B, Hq, T, D]`` post-RoPE queries (default: RoPE of ``q_pre``).
        progress: show a progress bar over the decode steps.
        step_fn: the decode step to use; ``mac_triton.decode_step`` has the same signature.

    Returns:
        :class:`StreamResult`.
    """
    check_tensor("q_pre", q_pre, 4, "[B, Hq, T, D]")
    B, Hq, T, D = q_pre.shape
    if q_post is not None and q_post.shape != q_pre.shape:
        raise ValueError(f"q_post must have q_pre's shape {tuple(q_pre.shape)}, got {tuple(q_post.shape)}")
    if isinstance(prefill_len, int):
        prefill_len = torch.full((B,), prefill_len, dtype=torch.int64, device=q_pre.device)
    elif isinstance(prefill_len, (list, tuple)):
        prefill_len = torch.tensor(prefill_len, dtype=torch.int64, device=q_pre.device)
    n_max = int(prefill_len.max())
    if config.calibration is not None and config.radius_scale is None:  # the radii from the prompts, as a model's prefill would
        if int(prefill_len.min()) != n_max:
            raise ValueError(f"a radius calibration ({config.calibration!r}) needs prompts of one length, got {prefill_len.tolist()}")
        config = config.calibrated(q_pre[:, :, :n_max], k, n_max)
    out0, lse0, state = prefill(
        q_pre[:, :, :n_max], k, v, prefill_len, config, None if q_post is None else q_post[:, :, :n_max]
    )
    out = torch.full((B, Hq, T, D), math.nan, dtype=out0.dtype, device=q_pre.device)
    lse = torch.full((B, Hq, T), math.nan, dtype=lse0.dtype, device=q_pre.device)
    batch = torch.arange(B, device=q_pre.device)
    for b in range(B):
        n = int(prefill_len[b])
        out[b, :, :n], lse[b, :, :n] = out0[b, :, :n], lse0[b, :, :n]

    steps = []
    iterator = range(T - n_max)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="decode", unit="step")
    for _ in iterator:
        pos = state.next_pos.clone()  # [B]
        q_step = q_pre[batch, :, pos]  # [B, Hq, D]
        q_post_step = None if q_post is None else q_post[batch, :, pos]
        o, l, stats = step_fn(q_step, k, v, state, pos, config, q_post=q_post_step)
        out[batch, :, pos] = o
        lse[batch, :, pos] = l.to(lse.dtype)
        steps.append(stats)
    if not steps:
        raise ValueError(f"the stream has no decode step: T={T} tokens, prefill of {n_max}")
    return StreamResult(out, lse, StepStats.stack(steps), state)
