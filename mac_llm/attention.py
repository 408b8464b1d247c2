r"""Attention backends for :class:`mac_llm.gguf_model.LlamaModel`: full attention and MAC-Attention.

A backend is called once per layer and forward pass as
``backend(layer, q_pre, q_post, k_cache, v_cache, start) -> out [B, Hq, L, D]`` for the
queries of positions ``start … start+L−1`` (their keys are already in the cache).

- :class:`FullAttention`: causal attention over ``[0, t+1)`` (torch SDPA, grouped-query).
- :class:`MACAttention`: a pass that starts at position 0 (a prompt) is full attention and
  seeds one :class:`~mac_core.state.LayerState` per layer from the last ``W`` prompt
  queries (calibrating the radii first when the configuration names a calibration); each
  later single-token pass is one ``decode_step`` per layer (``mac_ref`` or ``mac_triton``),
  and the step's :class:`~mac_core.step.StepStats` are kept, per prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import mac_ref
from mac_core import LayerState, MACConfig, StepStats, row_range


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


def seed_state(q_pre, q_post, k_cache, v_cache, prompt_len: int, config: MACConfig) -> LayerState:
    """Rings after a prompt of ``n`` tokens: rows of its last ``min(W, n)`` tokens, exact
    (spec: [prefill][spec-prefill]).

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
    rows = mac_ref.attend(q_post, k_cache, v_cache, *row_range(positions, config.band, config.sinks), config.softmax_scale(D))
    lengths = torch.full((B,), prompt_len, dtype=torch.int64, device=q_pre.device)
    state = LayerState.empty(B, Hq, D, config.window, dtype=q_pre.dtype, device=q_pre.device)
    return state.seed(q_pre, rows, lengths, first_position=prompt_len - kept)


class MACAttention:
    """MAC-Attention in every layer, with per-layer configurations and statistics.

    Args:
        configs: one :class:`~mac_core.config.MACConfig` for all layers, or a list with one
            per layer (e.g. a per-layer ``τ``). A configuration with a ``calibration`` is
            calibrated on each layer's prompt when the layer is seeded.
        n_layers: number of layers of the model.
        step_fn: ``mac_ref.decode_step`` or ``mac_triton.decode_step``.
        measure_error: also compute exact attention at every step and keep the relative
            error ``‖out − exact‖ / ‖exact‖`` per (layer, head) in :attr:`errors`.

    Attributes:
        configs: the configurations in use, per layer (calibrated once seeded).
        states: one :class:`~mac_core.state.LayerState` per layer (``None`` before a prompt).
        stats: per layer, the :class:`~mac_core.step.StepStats` of its decode steps since
            the last prompt.
        errors: per layer, the ``[B, Hq]`` relative output errors since the last prompt (if measured).
    """

    def __init__(self, configs, n_layers: int, step_fn=mac_ref.decode_step, measure_error: bool = False):
        if isinstance(configs, MACConfig):
            configs = [configs] * n_layers
        configs = list(configs)
        if len(configs) != n_layers or not all(isinstance(c, MACConfig) for c in configs):
            raise ValueError(f"configs must be a MACConfig or a list of {n_layers} MACConfigs")
        self.base_configs = configs
        self.configs = list(configs)
        self.step_fn = step_fn
        self.measure_error = measure_error
        self.kv_heads: int | None = None  # known once a layer is seeded
        self.states: list[LayerState | None] = [None] * n_layers
        self.stats: list[list[StepStats]] = [[] for _ in range(n_layers)]
        self.errors: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

    def seed(self, layer: int, q_pre, q_post, k_cache, v_cache, prompt_len: int) -> None:
        """Start ``layer`` afresh after a prompt: calibrate its configuration (if it names a
        calibration), seed its rings from the last prompt queries (:func:`seed_state`) and
        clear its statistics."""
        self.kv_heads = k_cache.shape[1]
        self.configs[layer] = self.base_configs[layer].calibrated(q_pre, k_cache, prompt_len)
        self.states[layer] = seed_state(q_pre, q_post, k_cache, v_cache, prompt_len, self.configs[layer])
        self.stats[layer].clear()
        self.errors[layer].clear()

    def __call__(self, layer, q_pre, q_post, k_cache, v_cache, start):
        L = q_pre.shape[2]
        if start == 0:  # a prompt, whatever its length: full attention, then fresh rings
            self.seed(layer, q_pre, q_post, k_cache, v_cache, L)
            return causal_block_attention(q_post, k_cache, v_cache, start)
        if self.states[layer] is None:
            raise ValueError(f"MACAttention: layer {layer} decodes position {start} before any prompt (start = 0) seeded it")
        if L > 1:
            raise ValueError(f"MACAttention decodes one token per pass after the prompt, got {L} at position {start}")
        B = q_pre.shape[0]
        positions = torch.full((B,), start, dtype=torch.int64, device=q_pre.device)
        config = self.configs[layer]
        out, _, stats = self.step_fn(q_pre[:, :, 0], k_cache, v_cache, self.states[layer], positions, config, q_post=q_post[:, :, 0])
        self.stats[layer].append(stats)
        if self.measure_error:
            exact = causal_block_attention(q_post, k_cache, v_cache, start)[:, :, 0]  # [B, Hq, D]
            self.errors[layer].append((out - exact).norm(dim=-1) / exact.norm(dim=-1))
        return out[:, :, None]

    def layer_stats(self) -> StepStats:
        """All decode steps' statistics since the last prompt, fields ``[S, n_layers, B, Hq]``
        (``context``: ``[S, n_layers, B]``)."""
        per_layer = [StepStats.stack(steps) for steps in self.stats]  # fields [S, B, Hq]
        return StepStats.stack(per_layer, dim=1)
