r"""Attention backends for :class:`mac_llm.llama.LlamaModel`: full attention and MAC-Attention.

A backend is called once per layer and forward pass as
``backend(layer, q_pre, q_post, k_cache, v_cache, start) -> out [B, Hq, L, D]`` for the
queries of positions ``start … start+L−1`` (their keys are already in the cache).

- :class:`FullAttention`: causal attention over ``[0, t+1)`` (torch SDPA, grouped-query).
- :class:`MACAttention`: one :class:`LayerMAC` per layer. A pass that starts at position 0
  (a prompt) is full attention and seeds the layer's :class:`~mac_core.state.LayerState`
  from the last ``W`` prompt queries (calibrating the radii first when the configuration
  names a calibration); each later single-token pass is one ``decode_step``
  (``mac_ref`` or ``mac_triton``), and the step's :class:`~mac_core.step.StepStats` are
  kept, per prompt. The transformers integration (:mod:`mac_llm.hf`) attaches the same
  :class:`LayerMAC` to each attention module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import mac_ref
from mac_core import LayerState, MACConfig, StepStats, row_range
from mac_core.kv import left_padded
from mac_core.numerics import softmax_scale


def masked_attention(q, k, v, mask, scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """``softmax(s + mask) · v`` with ``s = scale · q·k`` (``c · tanh(s / c)`` with a soft cap ``c``).

    Args:
        q: ``[B, Hq, L, D]``; k, v: ``[B, Hkv, T, D]`` (``Hq`` a multiple of ``Hkv``).
        mask: bool, broadcastable to ``[B, Hq, L, T]`` (``True``: attend).

    Returns:
        ``[B, Hq, L, D]``.
    """
    if softcap is None:  # SDPA has no soft cap
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = softmax_scale(q.shape[-1], scale)
    scores = softcap * torch.tanh((q.float() @ k.float().transpose(-1, -2)) * scale / softcap)  # [B, Hq, L, T]
    return (scores.masked_fill(~mask, -math.inf).softmax(-1) @ v.float()).to(q.dtype)


def causal_block_attention(q_post, k_cache, v_cache, start: int, scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention of the queries at ``start … start+L−1`` over keys ``[0, t+1)`` each.

    Args:
        q_post: ``[B, Hq, L, D]`` post-RoPE queries.
        k_cache, v_cache: ``[B, Hkv, T, D]``, keys ``[0, start+L)`` written.
        scale, softcap: see :func:`masked_attention`.

    Returns:
        ``[B, Hq, L, D]``.
    """
    L = q_post.shape[2]
    end = start + L
    k, v = k_cache[:, :, :end], v_cache[:, :, :end]
    query_pos = torch.arange(start, end, device=q_post.device)[:, None]  # [L, 1]
    mask = torch.arange(end, device=q_post.device)[None, :] <= query_pos  # [L, end]
    return masked_attention(q_post, k, v, mask, scale, softcap)


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
    rows = mac_ref.attend(q_post, k_cache, v_cache, *row_range(positions, config.band, config.sinks), config.softmax_scale(D), softcap=config.softcap)
    state = LayerState.empty(B, Hq, D, config.window, dtype=q_pre.dtype, device=q_pre.device)
    return state.seed(q_pre, rows, n, first_position=first)


def left_padded_prompt_attention(q_post, k_cache, v_cache, pads, scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
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
    return masked_attention(q_post, k_cache[:, :, :L], v_cache[:, :, :L], mask[:, None], scale, softcap)


def align_left_padded(x: torch.Tensor, pads) -> torch.Tensor:
    """``x [B, H, L, D]`` of slots → of request positions: ``out[b, :, j] = x[b, :, pads[b] + j]``
    (positions past a request's ``L − pads[b]`` tokens repeat its last slot)."""
    B, H, L, D = x.shape
    index = (pads[:, None] + torch.arange(L, device=x.device)[None, :]).clamp(max=L - 1)  # [B, L]
    return x.gather(2, index[:, None, :, None].expand(B, H, L, D))


def auto_step(q_pre, *args, **kwargs):
    """A decode step by device: ``mac_triton.decode_step`` on CUDA tensors, ``mac_ref.decode_step`` elsewhere."""
    from .step_attention import mac_decode_step

    return mac_decode_step("triton" if q_pre.is_cuda else "ref")(q_pre, *args, **kwargs)


class LayerMAC:
    """MAC-Attention of one layer: its configuration, rings and statistics.

    Called once per forward pass with the queries of slots ``start … start+L−1`` (their keys
    already in the cache). A pass that starts at slot 0 (a prompt) is full attention and
    seeds the rings from the last ``W`` prompt queries (calibrating the radii first when the
    configuration names a calibration); each later pass is one decode step of one token.

    The rings follow one cache: a pass must continue the slots of the previous one, and the
    last key that pass saw must still be there (a cache kept from an earlier prompt, a copy
    that decoded on, or one whose rows were reordered, as beam search does, is refused).

    Args:
        config: the layer's :class:`~mac_core.config.MACConfig`.
        step_fn: ``mac_ref.decode_step``, ``mac_triton.decode_step`` or :func:`auto_step`.
        measure_error: also compute exact attention at every step and keep the relative
            error ``‖out − exact‖ / ‖exact‖`` per head in :attr:`errors`.

    Attributes:
        base_config: the configuration as given; :attr:`config`: as used (calibrated once seeded).
        state: the :class:`~mac_core.state.LayerState` (``None`` before a prompt).
        stats: the :class:`~mac_core.step.StepStats` of the decode steps since the last prompt.
        errors: the ``[B, Hq]`` relative output errors since the last prompt (if measured).
        pads: the ``[B]`` left padding of the batch the rings were seeded for (``None``: none).
    """

    def __init__(self, config: MACConfig, step_fn=mac_ref.decode_step, measure_error: bool = False):
        if not isinstance(config, MACConfig):
            raise TypeError(f"config must be a MACConfig, got {type(config).__name__}")
        self.base_config = self.config = config
        self.step_fn = step_fn
        self.measure_error = measure_error
        self.kv_heads: int | None = None  # known once seeded
        self.state: LayerState | None = None
        self.stats: list[StepStats] = []
        self.errors: list[torch.Tensor] = []
        self.pads: torch.Tensor | None = None
        self._mark: tuple[int, torch.Tensor] | None = None  # (slots written, the last key) of the cache the rings follow

    def seed(self, q_pre, q_post, k_cache, v_cache, prompt_lengths) -> None:
        """Start afresh after a prompt: calibrate the configuration (if it names a calibration),
        seed the rings from the last prompt queries (:func:`seed_state`) and clear the
        statistics. ``prompt_lengths``: an int, or ``[B]`` for a padded batch (queries and
        keys then in request positions)."""
        self.kv_heads = k_cache.shape[1]
        config = self.base_config
        if isinstance(prompt_lengths, int):
            config = config.calibrated(q_pre, k_cache, prompt_lengths)
        elif config.calibration is not None:
            raise ValueError(f"a radius calibration ({config.calibration!r}) needs prompts of one length: a padded batch has several")
        self.config = config
        self.state = seed_state(q_pre, q_post, k_cache, v_cache, prompt_lengths, config)
        self.stats.clear()
        self.errors.clear()

    def _follow(self, k_cache, end: int) -> None:
        """Remember the cache the rings follow: ``end`` slots written, and its last key."""
        self._mark = (end, k_cache[:, :, end - 1].clone())  # [B, Hkv, D]

    def _check_cache(self, k_cache, start: int) -> None:
        written, last_key = self._mark
        if start != written or k_cache.shape[0] != last_key.shape[0] or not torch.equal(k_cache[:, :, written - 1], last_key):
            raise ValueError(
                "the KV cache changed under MAC's rings: it is not the cache of the latest prompt (one kept from an earlier "
                "call, or a copy that decoded on), or its rows were reordered (beam search, num_beams > 1, which MAC does "
                f"not support); the rings follow {written} slots, the pass continues at slot {start}"
            )

    def __call__(self, q_pre, q_post, k_cache, v_cache, start: int, pads=None):
        """The layer's attention ``[B, Hq, L, D]`` for the queries ``q_pre, q_post [B, Hq, L, D]``
        at slots ``start … start+L−1``.

        Args:
            pads: ``None``, or ``[B]`` int64 left-padding slots per request (a batch of prompts
                of different lengths): request ``b``'s token at position ``j`` is at slot
                ``pads[b] + j`` (its keys read through :func:`mac_core.kv.left_padded`).
        """
        L = q_pre.shape[2]
        padded = pads is not None and bool((pads > 0).any())
        if start == 0:  # a prompt, whatever its length: full attention, then fresh rings
            self.pads = pads if padded else None
            self._follow(k_cache, L)
            scale, softcap = self.base_config.softmax_scale(q_pre.shape[-1]), self.base_config.softcap
            if not padded:
                self.seed(q_pre, q_post, k_cache, v_cache, L)
                return causal_block_attention(q_post, k_cache, v_cache, start, scale, softcap)
            k, v = left_padded(k_cache, pads), left_padded(v_cache, pads)
            self.seed(align_left_padded(q_pre, pads), align_left_padded(q_post, pads), k, v, L - pads)
            return left_padded_prompt_attention(q_post, k_cache, v_cache, pads, scale, softcap)
        if self.state is None:
            raise ValueError(f"MAC-Attention decodes slot {start} before any prompt (a pass from slot 0) seeded the rings")
        if L > 1:
            raise ValueError(
                f"MAC-Attention decodes one token per pass after the prompt, got {L} at slot {start} "
                "(a cache continued with a new prompt, or speculative verification, is not supported)"
            )
        self._check_cache(k_cache, start)
        if (self.pads is None) != (not padded) or (padded and not torch.equal(pads, self.pads)):
            raise ValueError(
                "the requests' padding changed since their prompt "
                f"({None if self.pads is None else self.pads.tolist()} -> {None if pads is None else pads.tolist()}): "
                "each request must keep its slots (left padding only)"
            )
        B = q_pre.shape[0]
        positions = torch.full((B,), start, dtype=torch.int64, device=q_pre.device)
        keys, values = k_cache, v_cache
        if padded:
            positions = positions - pads  # each request's own position
            keys, values = left_padded(k_cache, pads), left_padded(v_cache, pads)
        out, _, stats = self.step_fn(q_pre[:, :, 0], keys, values, self.state, positions, self.config, q_post=q_post[:, :, 0])
        self._follow(k_cache, start + 1)
        self.stats.append(stats)
        if self.measure_error:
            scale = self.config.softmax_scale(q_pre.shape[-1])
            exact = mac_ref.attend(q_post[:, :, 0], keys, values, 0, (positions + 1)[:, None], scale, softcap=self.config.softcap).o  # [B, Hq, D]
            self.errors.append((out - exact).norm(dim=-1) / exact.norm(dim=-1))
        return out[:, :, None]


class MACAttention:
    """MAC-Attention in every layer of a model (a :class:`LayerMAC` each), as one backend of
    :class:`~mac_llm.llama.LlamaModel` and one view of the statistics.

    Args:
        configs: one :class:`~mac_core.config.MACConfig` for all layers (a rule with a
            threshold per layer resolved for each: ``MACConfig.for_layer``), or a list with
            one per layer (e.g. a per-layer ``τ``). A configuration with a ``calibration`` is
            calibrated on each layer's prompt when the layer is seeded.
        n_layers: number of layers of the model.
        step_fn: ``mac_ref.decode_step``, ``mac_triton.decode_step`` or :func:`auto_step`.
        measure_error: see :class:`LayerMAC`.

    Attributes:
        layers: the :class:`LayerMAC` of each layer (their ``config``, ``state``, ``stats``,
            ``errors`` are also read per layer through the properties below).
    """

    def __init__(self, configs, n_layers: int, step_fn=mac_ref.decode_step, measure_error: bool = False):
        if isinstance(configs, MACConfig):  # (a rule with a threshold per layer gives each layer its own)
            configs = [configs.for_layer(i, n_layers) for i in range(n_layers)]
        configs = list(configs)
        if len(configs) != n_layers or not all(isinstance(c, MACConfig) for c in configs):
            raise ValueError(f"configs must be a MACConfig or a list of {n_layers} MACConfigs")
        self.layers = [LayerMAC(c, step_fn, measure_error) for c in configs]

    @classmethod
    def of_layers(cls, layers: list[LayerMAC]) -> "MACAttention":
        """A view of existing layers (their rings and statistics are shared, not copied)."""
        view = object.__new__(cls)
        view.layers = list(layers)
        return view

    @property
    def configs(self) -> list[MACConfig]:
        return [layer.config for layer in self.layers]

    @property
    def states(self) -> list[LayerState | None]:
        return [layer.state for layer in self.layers]

    @property
    def stats(self) -> list[list[StepStats]]:
        return [layer.stats for layer in self.layers]

    @property
    def errors(self) -> list[list[torch.Tensor]]:
        return [layer.errors for layer in self.layers]

    @property
    def kv_heads(self) -> int | None:
        return self.layers[0].kv_heads

    @property
    def measure_error(self) -> bool:
        return self.layers[0].measure_error

    def seed(self, layer: int, q_pre, q_post, k_cache, v_cache, prompt_lengths) -> None:
        """:meth:`LayerMAC.seed` of ``layer``, and the cache it follows (``max n_b`` slots written)."""
        self.layers[layer].seed(q_pre, q_post, k_cache, v_cache, prompt_lengths)
        self.layers[layer]._follow(k_cache, int(torch.as_tensor(prompt_lengths).max()))

    def __call__(self, layer, q_pre, q_post, k_cache, v_cache, start, pads=None):
        """Layer ``layer``'s attention (:meth:`LayerMAC.__call__`): the backend protocol of :class:`~mac_llm.llama.LlamaModel`."""
        return self.layers[layer](q_pre, q_post, k_cache, v_cache, start, pads)

    def request_stats(self) -> list[dict]:
        """Per request of the latest prompt: hit rate, candidates, KV reads skipped per head
        and per KV group (:meth:`~mac_core.step.StepStats.summary`) over all layers and steps
        (zeros before the first decode step; ``[]`` before any prompt)."""
        stats = self.layer_stats()
        return [stats.request(b).summary(self.kv_heads) for b in range(stats.hit.shape[-2])]

    def layer_stats(self) -> StepStats:
        """All decode steps' statistics since the last prompt, fields ``[S, n_layers, B, Hq]``
        (``context``: ``[S, n_layers, B]``); ``S = 0`` before the first decode step."""
        if any(not layer.stats for layer in self.layers):
            state = next((s for s in self.states if s is not None), None)
            B, Hq = (0, 0) if state is None else state.ring_q.shape[:2]
            return StepStats.empty(0, len(self.layers), batch=B, q_heads=Hq)
        per_layer = [StepStats.stack(layer.stats) for layer in self.layers]  # fields [S, B, Hq]
        return StepStats.stack(per_layer, dim=1)
