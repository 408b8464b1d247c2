r"""Attention backends for :class:`mac_llm.gguf_model.LlamaModel`: full attention and MAC-Attention.

A backend is called once per layer and forward pass as
``backend(layer, q_pre, q_post, k_cache, v_cache, start) -> out [B, Hq, L, D]`` for the
queries of positions ``start … start+L−1`` (their keys are already in the cache).

- :class:`FullAttention`: causal attention over ``[0, t+1)`` (torch SDPA, grouped-query).
- :class:`MACAttention`: a forward pass of several tokens (the prompt) is full attention and
  seeds one :class:`mac_ref.LayerState` per layer from the last ``W`` prompt queries; each
  later single-token pass is one ``decode_step`` per layer (``mac_ref`` or ``mac_triton``),
  and the step's :class:`mac_ref.StepStats` are kept.
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F

import mac_ref

from .calibrate import RULES, calibrated


def causal_block_attention(q_post, k_cache, v_cache, start: int, scale: float | None = None) -> torch.Tensor:
    """Attention of the queries at ``start … start+L−1`` over keys ``[0, t+1)`` each.

    Args:
        q_post: ``[B, Hq, L, D]`` post-RoPE queries.
        k_cache, v_cache: ``[B, Hkv, T, D]``, keys ``[0, start+L)`` written.

    Returns:
        ``[B, Hq, L, D]``.
    """
    L = q_post.shape[2]
    end = start + L
    k, v = k_cache[:, :, :end], v_cache[:, :, :end]
    query_pos = torch.arange(start, end, device=q_post.device)[:, None]  # [L, 1]
    mask = torch.arange(end, device=q_post.device)[None, :] <= query_pos  # [L, end]
    return F.scaled_dot_product_attention(q_post, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


class FullAttention:
    """Exact causal attention (the baseline every MAC run is compared with)."""

    def __call__(self, layer, q_pre, q_post, k_cache, v_cache, start):
        return causal_block_attention(q_post, k_cache, v_cache, start)


def seed_state(q_pre, q_post, k_cache, v_cache, prompt_len: int, config: mac_ref.MACConfig) -> mac_ref.LayerState:
    """Rings after a prompt of ``n`` tokens: rows of its last ``min(W, n)`` tokens, exact (SPEC §4.4).

    ``R_t = A(q_t, [min(F, E(t)), E(t)))``, as :func:`mac_ref.prefill` seeds them, computed
    only for the tokens that enter the ring (the prompt's own output comes from a faster
    attention).

    Args:
        q_pre, q_post: ``[B, Hq, w, D]`` queries of positions ``n−w … n−1`` (``w ≥ min(W, n)``).
        k_cache, v_cache: ``[B, Hkv, T, D]`` with the prompt's keys written.
    """
    B, Hq, w, D = q_pre.shape
    kept = min(config.window, prompt_len)
    q_pre, q_post = q_pre[:, :, w - kept :], q_post[:, :, w - kept :]
    positions = torch.arange(prompt_len - kept, prompt_len, device=q_pre.device)  # [kept]
    row_end = mac_ref.prefix_end(positions, config.band)  # E(t)
    row_start = torch.clamp(row_end, max=config.sinks)  # min(F, E(t))
    rows = mac_ref.attend(q_post, k_cache, v_cache, row_start, row_end, config.softmax_scale(D))
    state = mac_ref.new_state(B, Hq, D, config, dtype=q_pre.dtype, device=q_pre.device)
    slots = positions % config.window
    state.ring_q[:, :, slots] = q_pre
    state.ring_o[:, :, slots] = rows.o.to(state.ring_o.dtype)
    state.ring_lse[:, :, slots] = rows.lse.to(state.ring_lse.dtype)
    state.next_pos = torch.full((B,), prompt_len, dtype=torch.int64, device=q_pre.device)
    return state


class MACAttention:
    """MAC-Attention in every layer, with per-layer configurations and statistics.

    Args:
        configs: one :class:`mac_ref.MACConfig` for all layers, or a list with one per layer
            (e.g. a per-layer calibrated ``τ``).
        n_layers: number of layers of the model.
        rule: acceptance rule (``mac_llm.calibrate``): ``"paper"`` keeps ``configs`` as
            given; ``"keynorm"`` / ``"qnorm"`` set each layer's ``radius_scale`` from its prompt.
        step_fn: ``mac_ref.decode_step`` or ``mac_triton.decode_step``.
        measure_error: also compute exact attention at every step and keep the relative
            error ``‖out − exact‖ / ‖exact‖`` per (layer, head) in :attr:`errors`.

    Attributes:
        states: one :class:`mac_ref.LayerState` per layer (``None`` before the prompt).
        stats: per layer, the list of :class:`mac_ref.StepStats` of its decode steps.
        errors: per layer, the list of ``[B, Hq]`` relative output errors (if measured).
    """

    def __init__(self, configs, n_layers: int, rule: str = "paper", step_fn=mac_ref.decode_step, measure_error: bool = False):
        if isinstance(configs, mac_ref.MACConfig):
            configs = [configs] * n_layers
        configs = list(configs)
        if len(configs) != n_layers or not all(isinstance(c, mac_ref.MACConfig) for c in configs):
            raise ValueError(f"configs must be a MACConfig or a list of {n_layers} MACConfigs")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        self.configs = configs
        self.rule = rule
        self.step_fn = step_fn
        self.measure_error = measure_error
        self.kv_heads: int | None = None  # known once a layer is seeded
        self.states: list[mac_ref.LayerState | None] = [None] * n_layers
        self.stats: list[list[mac_ref.StepStats]] = [[] for _ in range(n_layers)]
        self.errors: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

    def seed(self, layer: int, q_pre, q_post, k_cache, v_cache, prompt_len: int) -> None:
        """Calibrate ``layer``'s rule and seed its rings from the last prompt queries (:func:`seed_state`)."""
        self.kv_heads = k_cache.shape[1]
        self.configs[layer] = calibrated(self.configs[layer], self.rule, q_pre, k_cache, prompt_len)
        self.states[layer] = seed_state(q_pre, q_post, k_cache, v_cache, prompt_len, self.configs[layer])

    def __call__(self, layer, q_pre, q_post, k_cache, v_cache, start):
        L = q_pre.shape[2]
        if L > 1 or self.states[layer] is None:
            if start != 0:
                raise ValueError("MACAttention runs multi-token passes only for the prompt (start = 0)")
            self.seed(layer, q_pre, q_post, k_cache, v_cache, L)
            return causal_block_attention(q_post, k_cache, v_cache, start)
        B = q_pre.shape[0]
        positions = torch.full((B,), start, dtype=torch.int64, device=q_pre.device)
        config = self.configs[layer]
        out, _, stats = self.step_fn(q_pre[:, :, 0], k_cache, v_cache, self.states[layer], positions, config, q_post=q_post[:, :, 0])
        self.stats[layer].append(stats)
        if self.measure_error:
            exact = causal_block_attention(q_post, k_cache, v_cache, start)[:, :, 0]  # [B, Hq, D]
            self.errors[layer].append((out - exact).norm(dim=-1) / exact.norm(dim=-1))
        return out[:, :, None]

    def layer_stats(self) -> mac_ref.StepStats:
        """All decode steps' statistics, fields ``[S, n_layers, B, Hq]`` (``context``: ``[S, n_layers, B]``)."""
        per_layer = [mac_ref.StepStats.stack(steps) for steps in self.stats]  # fields [S, B, Hq]
        return mac_ref.StepStats(
            **{f.name: torch.stack([getattr(p, f.name) for p in per_layer], dim=1) for f in fields(mac_ref.StepStats)}
        )
