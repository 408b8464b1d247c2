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
from mac_core.kv import left_padded


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


def seed_state(q_pre, q_post, k_cache, v_cache, prompt_lengths, config: MACConfig) -> LayerState:
    """Rings after prompts of ``n_b`` tokens: rows of each request's last ``min(W, n_b)``
    tokens, exact (spec: [prefill][spec-prefill]).

    ``R_t = A(q_t, [min(F, E(t)), E(t)))``, as :func:`mac_ref.prefill` seeds them, computed
    only for the tokens that enter a ring (the prompt's own output comes from a faster
    attention).

    Args:
        q_pre, q_post: ``[B, Hq, w, D]`` queries of positions ``L−w … L−1``, ``L = max n_b``
            (request ``b``'s last ``min(W, n_b)`` positions among them).
        k_cache, v_cache: ``[B, Hkv, T, D]`` with the prompts' keys written, or a
            :class:`~mac_core.kv.PagedKV` pair (a left-padded batch: :func:`mac_core.kv.left_padded`).
        prompt_lengths: ``n_b``: an int for every request, or a ``[B]`` integer tensor.
    """
    B, Hq, w, D = q_pre.shape
    n = torch.as_tensor(prompt_lengths, dtype=torch.int64, device=q_pre.device).reshape(-1).expand(B)
    L = int(n.max())
    first = max(L - w, int(n.min()) - config.window, 0)  # the oldest position some ring keeps
    q_pre, q_post = q_pre[:, :, first - (L - w) :], q_post[:, :, first - (L - w) :]
    positions = torch.arange(first, L, device=q_pre.device)  # [L − first]
    rows = mac_ref.attend(q_post, k_cache, v_cache, *row_range(positions, config.band, config.sinks), config.softmax_scale(D))
    state = LayerState.empty(B, Hq, D, config.window, dtype=q_pre.dtype, device=q_pre.device)
    return state.seed(q_pre, rows, n, first_position=first)


def left_padded_prompt_attention(q_post, k_cache, v_cache, pads, scale: float | None = None) -> torch.Tensor:
    """Causal attention of a left-padded prompt batch: request ``b``'s query at slot ``i``
    attends slots ``[pads[b], i]``; a padding query attends only itself (its output is
    never used, and an empty row would be NaN).

    Args:
        q_post: ``[B, Hq, L, D]``; k_cache, v_cache: ``[B, Hkv, L, D]``; pads: ``[B]`` int64.

    Returns:
        ``[B, Hq, L, D]``.
    """
    L = q_post.shape[2]
    slot = torch.arange(L, device=q_post.device)
    causal = slot[None, :] <= slot[:, None]  # [L, L]
    real_key = slot[None, :] >= pads[:, None]  # [B, L]
    mask = (causal[None] & real_key[:, None, :]) | torch.eye(L, dtype=torch.bool, device=q_post.device)[None]  # [B, L, L]
    return F.scaled_dot_product_attention(q_post, k_cache[:, :, :L], v_cache[:, :, :L], attn_mask=mask[:, None], scale=scale, enable_gqa=True)


def align_left_padded(x: torch.Tensor, pads) -> torch.Tensor:
    """``x [B, H, L, D]`` of slots → of request positions: ``out[b, :, j] = x[b, :, pads[b] + j]``
    (positions past a request's ``L − pads[b]`` tokens repeat its last slot)."""
    B, H, L, D = x.shape
    index = (pads[:, None] + torch.arange(L, device=x.device)[None, :]).clamp(max=L - 1)  # [B, L]
    return x.gather(2, index[:, None, :, None].expand(B, H, L, D))


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
        pads: per layer, the ``[B]`` left padding of the batch it was seeded for (``None``: none).
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
        self.pads: list[torch.Tensor | None] = [None] * n_layers  # each layer's left padding since its prompt
        self.prompts = 0  # prompt passes so far (transformers: which cache the rings belong to)
        self.prompt_pass = False

    def seed(self, layer: int, q_pre, q_post, k_cache, v_cache, prompt_lengths) -> None:
        """Start ``layer`` afresh after a prompt: calibrate its configuration (if it names a
        calibration), seed its rings from the last prompt queries (:func:`seed_state`) and
        clear its statistics. ``prompt_lengths``: an int, or ``[B]`` for a padded batch
        (queries and keys then in request positions)."""
        self.kv_heads = k_cache.shape[1]
        config = self.base_configs[layer]
        if isinstance(prompt_lengths, int):
            config = config.calibrated(q_pre, k_cache, prompt_lengths)
        elif config.calibration is not None:
            raise ValueError(f"a radius calibration ({config.calibration!r}) needs prompts of one length: a padded batch has several")
        self.configs[layer] = config
        self.states[layer] = seed_state(q_pre, q_post, k_cache, v_cache, prompt_lengths, config)
        self.stats[layer].clear()
        self.errors[layer].clear()

    def __call__(self, layer, q_pre, q_post, k_cache, v_cache, start, pads=None):
        """One layer's attention for the queries at slots ``start … start+L−1``.

        Args:
            pads: ``None``, or ``[B]`` int64 left-padding slots per request (a batch of prompts
                of different lengths): request ``b``'s token at position ``j`` is at slot
                ``pads[b] + j`` (its keys read through :func:`mac_core.kv.left_padded`).
        """
        L = q_pre.shape[2]
        padded = pads is not None and bool((pads > 0).any())
        if start == 0:  # a prompt, whatever its length: full attention, then fresh rings
            self.pads[layer] = pads if padded else None
            if not padded:
                self.seed(layer, q_pre, q_post, k_cache, v_cache, L)
                return causal_block_attention(q_post, k_cache, v_cache, start)
            k, v = left_padded(k_cache, pads), left_padded(v_cache, pads)
            self.seed(layer, align_left_padded(q_pre, pads), align_left_padded(q_post, pads), k, v, L - pads)
            return left_padded_prompt_attention(q_post, k_cache, v_cache, pads)
        if self.states[layer] is None:
            raise ValueError(f"MACAttention: layer {layer} decodes position {start} before any prompt (start = 0) seeded it")
        if L > 1:
            raise ValueError(
                f"MACAttention decodes one token per pass after the prompt, got {L} at position {start} "
                "(a cache continued with a new prompt, or speculative verification, is not supported)"
            )
        seeded_pads = self.pads[layer]
        if (seeded_pads is None) != (not padded) or (padded and not torch.equal(pads, seeded_pads)):
            raise ValueError(
                f"layer {layer}: the requests' padding changed since their prompt "
                f"({None if seeded_pads is None else seeded_pads.tolist()} -> {None if pads is None else pads.tolist()}): "
                "each request must keep its slots (left padding only)"
            )
        B = q_pre.shape[0]
        positions = torch.full((B,), start, dtype=torch.int64, device=q_pre.device)
        if padded:
            positions = positions - pads  # each request's own position
            k_cache, v_cache = left_padded(k_cache, pads), left_padded(v_cache, pads)
        config = self.configs[layer]
        out, _, stats = self.step_fn(q_pre[:, :, 0], k_cache, v_cache, self.states[layer], positions, config, q_post=q_post[:, :, 0])
        self.stats[layer].append(stats)
        if self.measure_error:
            if padded:
                exact = mac_ref.attend(q_post[:, :, 0], k_cache, v_cache, 0, (positions + 1)[:, None]).o  # [B, Hq, D]
            else:
                exact = causal_block_attention(q_post, k_cache, v_cache, start)[:, :, 0]
            self.errors[layer].append((out - exact).norm(dim=-1) / exact.norm(dim=-1))
        return out[:, :, None]

    def request_stats(self) -> list[dict]:
        """Per request of the latest prompt: hit rate, candidates, KV reads skipped per head
        and per KV group (:func:`mac_llm.fidelity.reads_skipped`) over all layers and steps."""
        from .fidelity import reads_skipped

        stats = self.layer_stats()
        return [reads_skipped(stats.request(b), self.kv_heads) for b in range(stats.hit.shape[-2])]

    def layer_stats(self) -> StepStats:
        """All decode steps' statistics since the last prompt, fields ``[S, n_layers, B, Hq]``
        (``context``: ``[S, n_layers, B]``)."""
        per_layer = [StepStats.stack(steps) for steps in self.stats]  # fields [S, B, Hq]
        return StepStats.stack(per_layer, dim=1)
