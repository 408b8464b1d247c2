"""What the attention of one batched decode step runs, and the policy that chooses it.

:class:`~mac_llm.engine.DecodeEngine` decodes with one of :data:`ATTENTIONS`; each is a
small class here with the same three calls, so the engine's step is one loop over the
layers whatever it attends with:

- ``plan()``: host work before a step (FlashInfer plans its lengths; it cannot run inside
  a CUDA graph);
- ``begin()``: per-step device work before the layers (SDPA's mask), captured with them;
- ``attention(i, q_pre, q_post) -> out [B, Hq, D]``: layer ``i``'s attention over the
  engine's cache, with the step's keys already written.

The kinds: ``"mac"`` (``mac_triton.mac_step``, or ``mac_ref.decode_step`` for a readable
run), ``"miss"`` (MAC's step without matching: full attention that keeps the rings
current), ``"triton"`` (``mac_triton.full_step``), ``"sdpa"`` (masked
``scaled_dot_product_attention``) and ``"flashinfer"`` (``BatchDecodeWithPagedKVCacheWrapper``,
``fa2``, one ``HND`` page per request over the same cache: no copy). This is the one
module of :mod:`mac_llm` that imports ``mac_triton`` (and FlashInfer), lazily: both are
optional on a CPU.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import mac_ref

ATTENTIONS = ("mac", "triton", "sdpa", "flashinfer")
FULL_ATTENTIONS = ATTENTIONS[1:]
MAC_BACKENDS = ("triton", "ref")


def backend_module(backend: str):
    """The module a MAC backend names: ``mac_ref`` (``"ref"``) or ``mac_triton`` (``"triton"``),
    whose stage functions share their signatures."""
    if backend not in MAC_BACKENDS:
        raise ValueError(f"backend must be one of {MAC_BACKENDS}, got {backend!r}")
    if backend == "ref":
        return mac_ref
    try:
        import mac_triton
    except ImportError as err:
        raise ImportError(f"the Triton backend needs triton: pip install 'mac-attention[triton]' ({err})") from None
    return mac_triton


def mac_decode_step(backend: str):
    """``mac_ref.decode_step`` (``"ref"``) or ``mac_triton.decode_step`` (``"triton"``)."""
    return backend_module(backend).decode_step


@dataclass
class FallbackPolicy:
    """What a MAC engine's next step runs, decided before each step from what it knows.

    - ``"full"`` (the attention ``full``: ``"sdpa"``, ``"triton"`` or ``"flashinfer"``; ``None``:
      the engine's fastest, below) while
      the batch has fewer than ``min_batch`` requests or the longest context is shorter than
      ``min_context`` keys: there MAC cannot win, and nothing of its work is kept;
    - ``"miss"`` (MAC's step without matching) while the hit rate of the recent MAC steps is
      below ``min_hit_rate``: it keeps the rings current, and one step in ``probe_every`` is
      a MAC step that measures the hit rate again (read from the device then: one small
      synchronisation);
    - ``"mac"`` otherwise.

    The thresholds come from the end-to-end benchmark on an H200 (``benchmarks/bench_model.py``,
    SmolLM2-135M: MAC won at 8K from batch 32 and lost at 4K at every batch). ``full=None``
    is the engine's fastest full attention in the same benchmark on an H100 (compiled, graphed,
    batch 1–64 × 2K–8K): the Triton full decode, first or within 1.3 % of SDPA at every
    point, where the MAC backend is Triton; SDPA with the reference backend. A config without
    ``max_chain`` cannot mark stale rows, so there ``"full"`` becomes ``"miss"``.
    """

    min_batch: int = 32
    min_context: int = 6144
    min_hit_rate: float = 0.5
    probe_every: int = 16
    full: str | None = None
    recent_hit_rate: float = 1.0
    steps: int = field(default=0, repr=False)

    def __post_init__(self):
        if self.full is not None and self.full not in FULL_ATTENTIONS:
            raise ValueError(f"FallbackPolicy.full must be None or one of {FULL_ATTENTIONS}, got {self.full!r}")

    def decide(self, batch: int, context: int) -> str:
        """``"mac"``, ``"miss"`` or ``"full"`` for a step of ``batch`` requests whose longest context is ``context``."""
        if batch < self.min_batch or context < self.min_context:
            return "full"
        if self.recent_hit_rate >= self.min_hit_rate or self.steps % self.probe_every == 0:
            return "mac"
        return "miss"

    def observe(self, kind: str, stats: list) -> None:
        """After a step of ``kind``: a probe reads the hit rate of its per-layer ``stats`` (one small synchronisation)."""
        if kind == "mac" and self.steps % self.probe_every == 0:
            self.recent_hit_rate = torch.stack([s.hit.float().mean() for s in stats]).mean().item()
        self.steps += 1

    def reset(self) -> None:
        self.steps, self.recent_hit_rate = 0, 1.0


class _Attention:
    """A kind of step attention over the engine's cache (see the module docstring)."""

    def __init__(self, engine):
        # the engine owns its attentions: a strong reference back would make a cycle, and `del engine`
        # would leave the engine and its GPU memory to the garbage collector (a benchmark's next point ran out of memory)
        self._engine = weakref.ref(engine)

    @property
    def engine(self):
        return self._engine()

    def plan(self) -> None:
        pass

    def begin(self) -> None:
        pass


class Sdpa(_Attention):
    def begin(self) -> None:
        e = self.engine
        self.mask = (torch.arange(e.capacity, device=e.device)[None, :] <= e.positions[:, None])[:, None, None, :]  # [B, 1, 1, T]

    def __call__(self, i, q_pre, q_post):
        e = self.engine
        return F.scaled_dot_product_attention(q_post[:, :, None], e.k[i], e.v[i], attn_mask=self.mask, scale=e.scale, enable_gqa=True)[:, :, 0]


class TritonFull(_Attention):
    def __call__(self, i, q_pre, q_post):
        import mac_triton

        e = self.engine
        return mac_triton.full_step(q_post, e.k[i], e.v[i], e.positions, e.scale)[0]


class FlashInfer(_Attention):
    def __init__(self, engine):
        import flashinfer

        super().__init__(engine)
        B, device = engine.batch, engine.device
        graphed = device.type == "cuda"
        buffers = dict(
            paged_kv_indptr_buffer=torch.arange(B + 1, dtype=torch.int32, device=device),
            paged_kv_indices_buffer=torch.arange(B, dtype=torch.int32, device=device),
            paged_kv_last_page_len_buffer=torch.ones(B, dtype=torch.int32, device=device),
        )  # fmt: skip
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            torch.zeros(256 << 20, dtype=torch.uint8, device=device), "HND", use_cuda_graph=graphed, use_tensor_cores=True,
            backend="fa2", **(buffers if graphed else {}),
        )  # fmt: skip

    def plan(self) -> None:
        e = self.engine
        cfg = e.model.config
        self.wrapper.plan(
            torch.arange(e.batch + 1, dtype=torch.int32), torch.arange(e.batch, dtype=torch.int32),
            torch.tensor([p + 1 for p in e.host_positions], dtype=torch.int32),
            cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, e.capacity,
            pos_encoding_mode="NONE", q_data_type=e.dtype, kv_data_type=e.dtype, sm_scale=e.scale,
        )  # fmt: skip

    def __call__(self, i, q_pre, q_post):
        e = self.engine
        return self.wrapper.run(q_post, (e.k[i], e.v[i]))


class Mac(_Attention):
    """MAC's step (``match=False``: the ``"miss"`` step) through ``mac_triton.mac_step``; its statistics go to ``engine.stats``."""

    def __init__(self, engine, match: bool = True):
        super().__init__(engine)
        self.match = match

    def __call__(self, i, q_pre, q_post):
        import mac_triton

        e = self.engine
        out, _, e.stats[i] = mac_triton.mac_step(
            q_pre, q_post, e.k[i], e.v[i], e.states[i], e.positions, e.layer_configs[i], e.scale, e.workspaces[i], e.launch,
            match_launch=e.match_launch, match=self.match,
        )  # fmt: skip
        return out


class MacReference(_Attention):
    """MAC's step through the readable reference, ``mac_ref.decode_step`` (eager; studies on a CPU)."""

    def __call__(self, i, q_pre, q_post):
        e = self.engine
        out, _, e.stats[i] = mac_ref.decode_step(q_pre, e.k[i], e.v[i], e.states[i], e.positions, e.layer_configs[i], q_post=q_post)
        return out


def step_attention(kind: str, engine, mac_backend: str = "triton") -> _Attention:
    """The attention of a step of ``kind`` (``"mac"``, ``"miss"`` or one of :data:`FULL_ATTENTIONS`) for ``engine``."""
    if kind == "mac":
        return MacReference(engine) if mac_backend == "ref" else Mac(engine)
    if kind == "miss":
        if mac_backend == "ref":
            raise ValueError("the reference backend has no fallback step: use mac_backend='triton' with a policy")
        return Mac(engine, match=False)
    kinds = {"sdpa": Sdpa, "triton": TritonFull, "flashinfer": FlashInfer}
    if kind not in kinds:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {kind!r}")
    return kinds[kind](engine)


def new_workspaces(layer_configs: list, batch: int, model_config, device) -> list:
    """One ``mac_triton.DecodeWorkspace`` per layer (what a captured MAC step keeps between steps), for its configuration of ``layer_configs``."""
    from mac_triton import DecodeWorkspace

    return [DecodeWorkspace.new(config, batch, model_config.n_heads, model_config.head_dim, device) for config in layer_configs]


__all__ = ["ATTENTIONS", "FULL_ATTENTIONS", "MAC_BACKENDS", "FallbackPolicy", "backend_module", "mac_decode_step", "step_attention", "new_workspaces"]
