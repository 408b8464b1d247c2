r"""Batched decoding of the real model on a GPU: the whole decode step in one CUDA graph.

:class:`DecodeEngine` decodes ``B`` requests of SmolLM2 (any :class:`~mac_llm.llama.LlamaModel`)
in bf16 or fp16 at once: a preallocated KV cache ``[B, Hkv, capacity, D]`` per layer
sized for the longest request, ragged lengths (each request its own position), and a
decode step from the embedding to the logits that is captured once in a CUDA graph and
replayed per token. Greedy decoding stays on the device (the argmax of a step is the next
step's input), so a run needs no host synchronisation until it reads its results.

The attention of a step is one of :data:`ATTENTIONS`:

- ``"mac"``: ``mac_triton.mac_step`` per layer with the engine's :class:`~mac_core.config.MACConfig`
  (its rule: the paper's, or the mass-aware one), rings seeded by the prefill;
- ``"triton"``: ``mac_triton.full_step`` (full attention, the same kernels);
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` over the cache, masked
  per request;
- ``"flashinfer"``: FlashInfer's ``BatchDecodeWithPagedKVCacheWrapper`` (``fa2``) over the
  same cache seen as one ``HND`` page per request (no copy); its ``plan`` runs on the host
  before each replay (it cannot run inside a graph), as serving engines do.

With ``"mac"`` a :class:`FallbackPolicy` chooses, before each replay, one of three graphs:
the MAC step; below its batch or context thresholds, the engine's fastest full attention
(``policy.full``; the Triton full decode by default), which leaves the rings behind; at a low recent hit rate, MAC's step
without matching (``mac_step`` with ``match=False``: full attention that keeps the rings
current, so that a probe can measure the hit rate again). When MAC resumes after
full-attention steps, the rows they left stale are marked as no candidates (chain depth
``max_chain``); each miss rewrites one, so the rings are whole again ``W`` steps later.

The prefill runs each prompt through the same layer code (causal SDPA, not timed) and
seeds the rings from its last ``W`` queries. On a CPU the engine runs eagerly (no graphs;
the Triton kernels in the interpreter): the tests use that, at a tiny size.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F

from mac_core import LayerState, MACConfig, StepStats
from mac_core.numerics import softmax_scale

from .attention import seed_state
from .llama import LlamaModel, finish, output_logits, project
from .step_attention import ATTENTIONS, FULL_ATTENTIONS, MAC_BACKENDS, FallbackPolicy, new_workspaces, step_attention


def project_into_cache(cfg, w: dict[str, torch.Tensor], h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor):
    """A layer's :func:`~mac_llm.llama.project` with its keys and values written into the cache:
    ``k_cache[rows, :, pos] = k`` (``[B, Hkv, T, D]`` caches, in place; ``rows``, ``pos``
    broadcast to the leading dims of ``k``). Returns ``q_pre, q_post``. Compiled, the write is a
    store of the projection's kernel instead of two indexing kernels of its own (4 µs each on an
    H100, 60 a step)."""
    q_pre, q_post, k, v = project(cfg, w, h, cos, sin)
    k_cache[rows, :, pos] = k
    v_cache[rows, :, pos] = v
    return q_pre, q_post


class DecodeEngine:
    """``B`` requests of a Llama model decoding together on one device (see the module docstring).

    Args:
        model: the model (its float32 weights are copied in ``dtype``).
        batch: ``B``.
        capacity: KV-cache positions per request (the longest prompt plus the steps to decode).
        attention: one of :data:`ATTENTIONS`.
        config: the MAC configuration (``attention="mac"``; with another attention, the
            rings are seeded for it all the same, for a later :meth:`switch`); a rule with
            a threshold per layer (``MassRule.layer_tau_m``) gives each layer its own
            (:attr:`layer_configs`, by ``MACConfig.for_layer``).
        dtype: ``torch.bfloat16`` or ``torch.float16`` (``torch.float32`` for CPU tests).
        device: where it runs.
        policy: a :class:`FallbackPolicy` for ``"mac"`` (``None``: always MAC).
        mac_backend: ``"triton"`` (``mac_triton.mac_step``) or ``"ref"`` (``mac_ref.decode_step``:
            the readable reference, eager; for studies on a CPU).
        compile: compile everything of the step but its attention with ``torch.compile``
            (Inductor; captured in the same CUDA graph): the baseline a serving engine is.
        launch: the MAC step's ``mac_triton.Launch`` (``None``: ``mac_triton.launch_for``'s
            default; benchmarks set it to compare launch settings end to end).
    """

    def __init__(self, model: LlamaModel, batch: int, capacity: int, attention: str, config: MACConfig | None = None,
                 dtype=torch.bfloat16, device="cuda", policy: FallbackPolicy | None = None, mac_backend: str = "triton",
                 compile: bool = False, launch=None):
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if attention == "mac" and config is None:
            raise ValueError("attention='mac' needs a MACConfig (config=...)")
        if config is not None and config.calibration is not None:
            raise ValueError("DecodeEngine does not calibrate radii from the prompt: pass a config without calibration")
        if mac_backend not in MAC_BACKENDS:
            raise ValueError(f"mac_backend must be one of {MAC_BACKENDS}, got {mac_backend!r}")
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
        if not (isinstance(batch, int) and batch > 0 and isinstance(capacity, int) and capacity > 0):
            raise ValueError(f"batch and capacity must be positive ints, got {batch!r} and {capacity!r}")
        cfg = model.config
        self.batch, self.capacity, self.attention, self.dtype = batch, capacity, attention, dtype
        self.device = torch.device(device)
        self.model = model.converted(dtype, self.device)
        self.weights = [{name: w.detach() for name, w in layer.items()} for layer in self.model.layers]  # plain dicts: one compiled graph serves every layer
        # everything but the attention, compiled (Inductor): the norms, RoPE, residuals and small
        # matrix products of a step fuse into a few kernels instead of one each (as a serving engine does)
        self.compiled = compile
        functions = (project_into_cache, finish, output_logits)
        self._project_into_cache, self._finish, self._logits = (torch.compile(f, dynamic=False) for f in functions) if compile else functions
        self.config = None if config is None else dataclasses.replace(config, rope_base=cfg.rope_base)
        self.layer_configs = self._per_layer(self.config)
        self.policy = policy if attention == "mac" else None
        self.mac_backend = mac_backend
        self.launch = launch
        self.match_launch = None  # the match scan's mac_triton.MatchLaunch (None: mac_triton.match_launch_for; benchmarks set it)
        self.scale = softmax_scale(cfg.head_dim)
        self.cos, self.sin = self.model.rope_table(torch.arange(capacity, device=self.device))  # [capacity, 1, D]
        cache = self.model.new_cache(batch, capacity)
        self.k, self.v = cache.k, cache.v  # per layer [B, Hkv, capacity, D]
        self.positions = torch.zeros(batch, dtype=torch.int64, device=self.device)  # each request's next position
        self.tokens = torch.zeros(batch, dtype=torch.int64, device=self.device)  # the step's input
        self.logits = torch.zeros(batch, cfg.vocab_size, dtype=torch.float32, device=self.device)  # the step's output
        self.host_positions: list[int] = [0] * batch  # the same, known on the host (planning, policy)
        self.states: list[LayerState] = []
        self.workspaces: list = []
        self.stats: list[StepStats | None] = [None] * cfg.n_layers  # the last step's, per layer (graph outputs)
        self.graphs: dict[str, tuple] = {}  # the step's kind (see _step_kind) -> (CUDA graph, its per-layer stats)
        self.attentions: dict[str, object] = {}  # the step's kind -> its step_attention
        self.rings_stale = False  # full-attention steps ran since the rings were last whole

    # -- the prompt -------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Run each prompt with causal attention into its cache row and seed the rings.

        Returns the logits after each prompt ``[B, V]`` (float32), which are also the
        engine's current :attr:`logits`; the next step's input is their argmax."""
        if len(prompts) != self.batch:
            raise ValueError(f"prompts must hold one prompt per request ({self.batch}), got {len(prompts)}")
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1 or max(lengths) > self.capacity:
            raise ValueError(f"prompt lengths must lie in [1, {self.capacity}] (the capacity), got {lengths}")
        per_layer_queries: list[list] = [[] for _ in self.k]
        for b, ids in enumerate(prompts):
            self.logits[b] = self._prompt(b, torch.tensor(ids, device=self.device), per_layer_queries)
        self.positions.copy_(torch.tensor(lengths, device=self.device))
        self.host_positions = list(lengths)
        if self.config is not None:  # rings for MAC, now or after a switch
            self.states = [self._seed(queries, lengths, i) for i, queries in enumerate(per_layer_queries)]
            if self.mac_backend == "triton":
                self.workspaces = new_workspaces(self.layer_configs, self.batch, self.model.config, self.device)
        self.tokens.copy_(self.logits.argmax(-1))
        self.graphs.clear()
        self.rings_stale = False
        return self.logits.clone()

    def _prompt(self, b: int, ids: torch.Tensor, per_layer_queries) -> torch.Tensor:
        """Request ``b``'s prompt ``ids [n]`` through every layer (causal SDPA); its last logits ``[V]``."""
        model, n = self.model, ids.shape[0]
        keep = self.config.window if self.config is not None else 0
        h = model.embed[ids]  # [n, dim]
        for i in range(model.config.n_layers):
            q_pre, q_post, k, v = model.project(i, h, self.cos[:n], self.sin[:n])  # [n, H, D] each
            self.k[i][b, :, :n] = k.transpose(0, 1)
            self.v[i][b, :, :n] = v.transpose(0, 1)
            o = F.scaled_dot_product_attention(
                q_post.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True, scale=self.scale,
                enable_gqa=True,
            )[0]  # [Hq, n, D]
            if keep:  # copies: a view of the last rows would hold the whole prompt's queries until the rings are seeded
                per_layer_queries[i].append((q_pre[-keep:].transpose(0, 1)[None].clone(), q_post[-keep:].transpose(0, 1)[None].clone()))
            h = model.finish(i, h, o.transpose(0, 1))
        return model.logits(h[-1]).float()

    def _seed(self, queries, lengths: list[int], layer: int) -> LayerState:
        """One layer's rings for the batch: each request seeded from its own prompt's tail."""
        cfg = self.model.config
        state = LayerState.empty(self.batch, cfg.n_heads, cfg.head_dim, self.config.window, dtype=self.dtype, device=self.device)
        for b, ((q_pre, q_post), n) in enumerate(zip(queries, lengths)):
            one = seed_state(q_pre, q_post, self.k[layer][b : b + 1], self.v[layer][b : b + 1], n, self.config)
            for name in ("ring_q", "ring_o", "ring_lse", "ring_depth"):
                getattr(state, name)[b] = getattr(one, name)[0]
        state.next_pos = torch.tensor(lengths, dtype=torch.int64, device=self.device)
        return state

    # -- one decode step ----------------------------------------------------------------------

    def _attention(self, kind: str):
        if kind not in self.attentions:
            self.attentions[kind] = step_attention(kind, self, self.mac_backend)
        return self.attentions[kind]

    def _layers(self, kind: str) -> None:
        """The decode step for every request at its position (what a graph captures)."""
        model, B = self.model, self.batch
        pos = self.positions  # [B]
        rows = torch.arange(B, device=self.device)
        attention = self._attention(kind)
        attention.begin()
        cfg = model.config
        h = model.embed[self.tokens]  # [B, dim]
        cos, sin = self.cos[pos], self.sin[pos]  # [B, 1, D]
        for i, w in enumerate(self.weights):
            q_pre, q_post = self._project_into_cache(cfg, w, h, cos, sin, self.k[i], self.v[i], rows, pos)  # [B, Hq, D] each
            h = self._finish(cfg, w, h, attention(i, q_pre, q_post))
        self.logits.copy_(self._logits(cfg, model.out_norm.detach(), model.output_head.detach(), h))
        self.tokens.copy_(self.logits.argmax(-1))  # greedy: the next step's input, on the device
        self.positions.add_(1)

    def _step_kind(self) -> str:
        """The next step's attention: ``"mac"``, ``"miss"`` (MAC's step without matching) or one of :data:`FULL_ATTENTIONS`."""
        if self.attention != "mac":
            return self.attention
        if self.policy is None:
            return "mac"
        kind = self.policy.decide(self.batch, max(self.host_positions) + 1)
        return self.full_kind() if kind == "full" else kind

    def full_kind(self) -> str:
        """The policy's full-attention step: ``policy.full`` (``None``: ``"triton"`` with the
        Triton MAC backend, else ``"sdpa"``), or ``"miss"`` (MAC's step without matching, which
        keeps the rings current) where ``config.max_chain`` is ``None`` and stale rows could
        not be marked afterwards."""
        if self.config.max_chain is None:
            return "miss"
        return self.policy.full or ("triton" if self.mac_backend == "triton" else "sdpa")

    def mark_stale_rows(self) -> None:
        """After full-attention steps: the rows they did not write are no candidates (depth ``max_chain``)."""
        if self.config is None or self.config.max_chain is None:
            raise ValueError("full-attention steps left the rings behind and config.max_chain is None, so their stale rows "
                             "cannot be marked: rewind to a checkpoint taken before them, or use a config with max_chain")
        for state in self.states:
            state.retire_rows(self.config.max_chain)
        self.rings_stale = False

    @torch.no_grad()
    def step(self, tokens: torch.Tensor | None = None, graph: bool = True, kind: str | None = None) -> torch.Tensor:
        """One decode step for every request; returns :attr:`logits` ``[B, V]`` (overwritten by the next step).

        Args:
            tokens: ``[B]`` the step's input tokens (teacher forcing); ``None``: the argmax of
                the last step (greedy, on the device).
            graph: replay a CUDA graph of the step (captured at its first use; on CUDA only).
            kind: ``None``: the engine's attention (the policy's choice, with one); otherwise
                this step's: ``"mac"``, ``"miss"`` or one of :data:`FULL_ATTENTIONS`, for a
                MAC engine (the lossless decoder's plain rounds).
        """
        if max(self.host_positions) >= self.capacity:
            raise ValueError(f"the KV cache is full: positions {self.host_positions} reach the capacity {self.capacity}")
        if kind is not None and (self.attention != "mac" or kind not in ("mac", "miss", *FULL_ATTENTIONS)):
            raise ValueError(f"kind must be None, or for a MAC engine one of {('mac', 'miss', *FULL_ATTENTIONS)}; "
                             f"got {kind!r} for attention={self.attention!r}")
        if tokens is not None:
            self.tokens.copy_(tokens)
        kind = kind or self._step_kind()
        if kind in ("mac", "miss") and self.rings_stale:
            self.mark_stale_rows()
        if kind in FULL_ATTENTIONS:
            self.rings_stale, self.stats = True, [None] * self.model.config.n_layers
        self._attention(kind).plan()
        if graph and self.device.type == "cuda":
            if kind not in self.graphs:
                self.graphs[kind] = (self._capture(kind), list(self.stats))
            cuda_graph, self.stats = self.graphs[kind]
            cuda_graph.replay()
        else:
            self._layers(kind)
        self.host_positions = [p + 1 for p in self.host_positions]
        if self.policy is not None:
            self.policy.observe(kind, self.stats)
        return self.logits

    def timed_steps(self, steps: int) -> list[float]:
        """Latencies (ms) of ``steps`` greedy :meth:`step` calls: CUDA events on a GPU, a host clock on a CPU."""
        if self.device.type != "cuda":
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                self.step()
                times.append(1e3 * (time.perf_counter() - start))
            return times
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            self.step()
            end.record()
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) for start, end in events]

    def _capture(self, kind: str) -> torch.cuda.CUDAGraph:
        """Capture the step; the warm-up runs (kernel compilation) are undone first."""
        saved = self._snapshot()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._layers(kind)
                self._restore(saved)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._layers(kind)
        return graph

    def _snapshot(self) -> dict:
        """What a warm-up step changes: positions, the input tokens, the rows it wrote and the
        states' next positions (the reference's step advances them); the KV entries it wrote
        are rewritten by the real step before they are read."""
        saved = {"positions": self.positions.clone(), "tokens": self.tokens.clone()}
        for i, state in enumerate(self.states):
            saved[i] = [t.clone() for t in self._state_tensors(state)]
        return saved

    @staticmethod
    def _state_tensors(state) -> tuple:
        return state.ring_q, state.ring_o, state.ring_lse, state.ring_depth, state.next_pos

    def _restore(self, saved: dict) -> None:
        self.positions.copy_(saved["positions"])
        self.tokens.copy_(saved["tokens"])
        for i, state in enumerate(self.states):
            for t, s in zip(self._state_tensors(state), saved[i]):
                t.copy_(s)

    # -- several runs from one prefill ----------------------------------------------------------

    def checkpoint(self) -> dict:
        """What decoding changes (positions, tokens, logits, rings), to :meth:`rewind` to;
        the KV entries past the prompts are rewritten before they are read."""
        saved = self._snapshot()
        saved["logits"], saved["host_positions"], saved["rings_stale"] = self.logits.clone(), list(self.host_positions), self.rings_stale
        return saved

    def rewind(self, saved: dict) -> None:
        """Back to a :meth:`checkpoint` (in place: captured graphs stay valid)."""
        self._restore(saved)
        self.logits.copy_(saved["logits"])
        self.host_positions, self.rings_stale = list(saved["host_positions"]), saved["rings_stale"]
        if self.policy is not None:
            self.policy.reset()

    def _per_layer(self, config: MACConfig | None) -> list[MACConfig | None]:
        """Each layer's configuration (``MACConfig.for_layer``: a rule's thresholds per layer)."""
        n = self.model.config.n_layers
        return [None if config is None else config.for_layer(i, n) for i in range(n)]

    def switch(self, attention: str, config: MACConfig | None = None, policy: FallbackPolicy | None = None) -> None:
        """Decode with another attention (or MAC rule) from now on; the rings seeded by the
        prefill serve any rule of the same window, band and sinks. Captured graphs are dropped."""
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if attention == "mac":
            config = dataclasses.replace(config or self.config, rope_base=self.model.config.rope_base)
            if not self.states or (config.window, config.band, config.sinks) != (self.config.window, self.config.band, self.config.sinks):
                raise ValueError("switch to MAC: the rings were seeded for another window, band or sinks (or not at all)")
            self.config, self.layer_configs = config, self._per_layer(config)
            if self.mac_backend == "triton":
                self.workspaces = new_workspaces(self.layer_configs, self.batch, self.model.config, self.device)
        self.attention, self.policy = attention, policy if attention == "mac" else None
        self.graphs.clear()
        self.attentions.clear()
        self.stats = [None] * self.model.config.n_layers

    def step_stats(self) -> StepStats | None:
        """The last MAC step's statistics, fields ``[n_layers, B, Hq]`` (copies)."""
        if self.attention != "mac" or self.stats[0] is None:
            return None
        return StepStats.stack([StepStats(**{k: v.clone() for k, v in s.__dict__.items()}) for s in self.stats])

    @property
    def nbytes(self) -> int:
        """Bytes of the KV cache and the rings."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v)) + sum(state.nbytes for state in self.states)


__all__ = ["ATTENTIONS", "FULL_ATTENTIONS", "DecodeEngine", "FallbackPolicy"]
