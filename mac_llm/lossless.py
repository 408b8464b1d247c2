r"""Lossless MAC: the model's own MAC steps draft, full attention verifies, the output is full attention's.

Self-speculative decoding with MAC as the draft (docs: the real-model page, "Lossless MAC").
One *round* for a batch whose request ``b`` stands at position ``p_b`` with input token ``t_0``:

1. **draft**: ``k`` ordinary MAC steps of the engine give ``d_1 … d_k`` (greedy: each step's
   argmax; sampled: a draw from each step's distribution ``q_i``);
2. **verify**: one full-attention pass over ``[t_0, d_1, …, d_k]`` at positions ``p … p+k``,
   causal inside the block, gives full attention's next-token distributions ``p_0 … p_k``;
3. **accept**: greedy: the longest prefix with ``d_{i+1} = argmax p_i`` (``n`` tokens), then
   ``argmax p_n``. Sampled: ``d_{i+1}`` is kept with probability ``min(1, p_i(d)/q_i(d))``; at
   the first refusal a token is drawn from ``(p_i − q_i)_+`` normalised, after ``k``
   acceptances from ``p_k``. Either way a round emits ``n + 1`` tokens, distributed exactly as
   full attention's (greedy: identical to them);
4. **repair**: the verify pass wrote the K/V of ``p … p+k`` from full attention's hidden
   states. Positions ``p … p+n`` get full attention's exact ring rows
   ``R_t = A(q_t, [min(F, E(t)), E(t)))`` at chain depth 0, which the verify pass computes
   anyway (it attends each query as ``sinks ⊕ R_t ⊕ band``); the slots that the draft wrote
   for refused positions get back what they held. After a round the cache below each
   request's position and the rings are those of full attention that keeps its rings
   (MAC's miss step): nothing of the draft remains.

``k`` adapts to the recent acceptance (:class:`DraftLength`): when drafts are refused often,
rounds draft nothing (``k = 0``: a plain full-attention step through the verify pass) and a
probe drafts again now and then. With ``DraftLength(by_speed=True)`` it also adapts to the
measured time per token: where drafting rounds emit tokens more slowly than rounds that
draft nothing (a plain step with the engine's policy), rounds stop drafting, and a probe
measures again now and then.

The verify pass (:func:`verify_block`) runs each layer's attention through the verify
stage of the engine's backend (``verify_step``: each KV group's keys streamed once for
the block's ``k+1`` queries) and the rest of the layer through the engine's (compiled)
functions. With a fixed block (``LosslessDecoder(block=...)``) every round's verify pass has
the same shapes: CUDA graphs replay the round's parts (the Triton backend on a GPU), and a token's
numerics do not depend on its round. :meth:`LosslessDecoder.generate` queues each round before
it reads the previous one's acceptance back (a round is launched, then landed: its results
reach pinned host memory behind it), so the device does not wait for the host between rounds.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch

from mac_core import LayerState, Summary

from .engine import DecodeEngine
from .step_attention import FULL_ATTENTIONS, backend_module


# -- accepting a draft: pure functions ------------------------------------------------------------


def accept_greedy(full_logits: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy acceptance: the longest drafted prefix that full attention would have chosen.

    Args:
        full_logits: ``[B, k+1, V]`` full attention's logits after ``t_0, d_1, …, d_k``.
        drafts: ``[B, k]`` int64 drafted tokens ``d_1 … d_k``.

    Returns:
        ``(accepted [B], next_token [B])``: ``n`` (``0 … k``) and ``argmax p_n``.

    Examples:
        >>> import torch
        >>> logits = torch.eye(5)[[1, 2, 4]][None]      # [1, 3, 5]: full attention picks 1, 2, 4
        >>> accept_greedy(logits, torch.tensor([[1, 3]]))  # d_1 = 1 agrees, d_2 = 3 does not
        (tensor([1]), tensor([2]))
    """
    _check_block(full_logits, drafts)
    choice = full_logits.argmax(-1)  # [B, k+1]
    accepted = (drafts == choice[:, :-1]).int().cumprod(-1).sum(-1)  # [B]
    return accepted, choice.gather(1, accepted[:, None])[:, 0]


def accept_sampled(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator: torch.Generator | None = None):
    r"""Speculative sampling's acceptance: the emitted tokens are distributed as ``p``'s, whatever ``q`` is.

    Token ``d_{i+1} ~ q_i`` is kept with probability ``min(1, p_i(d)/q_i(d))``; at the first
    refusal the next token is drawn from :math:`(p_i - q_i)_+ / \sum (p_i - q_i)_+`, and after
    ``k`` acceptances from ``p_k``.

    Args:
        p: ``[B, k+1, V]`` full attention's probabilities.
        q: ``[B, k, V]`` the draft's probabilities (each ``d_{i+1}`` was drawn from ``q_i``).
        drafts: ``[B, k]`` int64.
        generator: the random numbers' source (on ``p``'s device).

    Returns:
        ``(accepted [B], next_token [B])``.

    Examples:
        >>> import torch
        >>> p = torch.tensor([[[0.0, 1.0], [0.5, 0.5]]])      # [1, 2, 2]
        >>> q = torch.tensor([[[1.0, 0.0]]])                  # the draft is sure of token 0
        >>> accept_sampled(p, q, torch.tensor([[0]]))         # p_0(0) = 0: refused, resampled
        (tensor([0]), tensor([1]))
    """
    _check_block(p, drafts)
    B, k = drafts.shape
    if q.shape != (B, k, p.shape[-1]):
        raise ValueError(f"q must have shape [B, k, V] = {[B, k, p.shape[-1]]}, got {list(q.shape)}")
    p_d = p[:, :k].gather(-1, drafts[..., None])[..., 0]  # [B, k]
    q_d = q.gather(-1, drafts[..., None])[..., 0]
    u = torch.rand(B, k, generator=generator, device=p.device, dtype=p.dtype)
    accepted = (u * q_d < p_d).int().cumprod(-1).sum(-1)  # u < p/q without dividing by q
    rows = torch.arange(B, device=p.device)
    q_next = torch.cat([q, torch.zeros_like(p[:, :1])], dim=1)[rows, accepted]  # q_k = 0: after k acceptances, p_k itself
    residual = (p[rows, accepted] - q_next).clamp_min(0)  # [B, V]
    empty = residual.sum(-1, keepdim=True) <= 0  # p = q there, so a refusal had probability 0; keep p
    residual = torch.where(empty, p[rows, accepted], residual)
    return accepted, torch.multinomial(residual, 1, generator=generator)[:, 0]


def _check_block(full: torch.Tensor, drafts: torch.Tensor) -> None:
    if drafts.dim() != 2 or drafts.dtype != torch.int64:
        raise TypeError(f"drafts must be an int64 tensor [B, k], got {drafts.dtype} {list(drafts.shape)}")
    if full.dim() != 3 or full.shape[:2] != (drafts.shape[0], drafts.shape[1] + 1):
        raise ValueError(f"full attention's block must have shape [B, k+1, V] with [B, k] = {list(drafts.shape)}, got {list(full.shape)}")


# -- the verify pass --------------------------------------------------------------------------------


@torch.no_grad()
def verify_block(engine: DecodeEngine, block: torch.Tensor):
    """Full attention over ``block [B, L]`` at positions ``engine.positions + 0 … L−1``, causal inside it.

    Writes the block's K/V into the engine's cache and returns what a round needs: the
    logits ``[B, L, V]`` (float32), and per layer the pre-RoPE queries ``[B, Hq, L, D]`` and
    the exact ring rows ``Summary(o [B, Hq, L, D], lse [B, Hq, L])`` of the block's positions.

    Each layer's attention is the verify stage (``verify_step`` of the engine's
    ``mac_backend``: :func:`mac_ref.verify.verify_step` or its Triton twin, which streams
    each KV group's keys once for the block's ``L`` queries): full attention, split as a miss
    step splits it, so the exact rows ``R_t`` cost no extra reads. The rest of the layer is
    the engine's (compiled where the engine is: one compilation per block length).
    """
    e, model = engine, engine.model
    cfg, config = model.config, engine.config
    B, L = block.shape
    pos = e.positions[:, None] + torch.arange(L, device=e.device)  # [B, L]
    rows_b = torch.arange(B, device=e.device)[:, None]  # [B, 1]
    verify_step = backend_module(e.mac_backend).verify_step  # (no checks, no host sync: the round checked the block)
    cos, sin = e.cos[pos], e.sin[pos]  # [B, L, 1, D]
    h = model.embed[block]  # [B, L, dim]
    queries, rows = [], []
    for i, w in enumerate(e.weights):
        q_pre, q_post = e._project_into_cache(cfg, w, h, cos, sin, e.k[i], e.v[i], rows_b, pos)  # [B, L, Hq, D]
        res = verify_step(q_post.transpose(1, 2), e.k[i], e.v[i], e.positions, config, e.scale)  # [B, Hq, L, D]
        h = e._finish(cfg, w, h, res.out.o.transpose(1, 2).to(h.dtype))
        queries.append(q_pre.transpose(1, 2))  # [B, Hq, L, D]
        rows.append(res.cached)
    logits = e._logits(cfg, model.out_norm.detach(), model.output_head.detach(), h).float()  # [B, L, V]
    return logits, queries, rows


# -- how long a draft -------------------------------------------------------------------------------


@dataclass
class DraftLength:
    """``k`` for the next round, from the batch's recent mean of accepted drafts per round.

    ``k = clamp(round(mean) + 1, 1, k_max)``: one more than recent rounds kept. Below
    ``min_accepted`` drafting does not pay: rounds draft nothing (``k = 0``, a plain verified
    full-attention step), and one round in ``probe_every`` drafts ``k_max`` to measure again.
    ``adaptive=False``: always ``k_max``.

    ``by_speed=True``: drafting must also pay in time. The decoder reports each round's
    milliseconds per emitted token (:meth:`observe_speed`: drafting rounds, and rounds that
    draft nothing), averaged like the acceptance; once drafting has been measured, rounds
    draft nothing until the other kind is measured too, and while drafting is the slower,
    rounds draft nothing but the probes (one in ``probe_every``).
    """

    k_max: int = 4
    min_accepted: float = 0.5
    probe_every: int = 16
    smoothing: float = 0.5
    adaptive: bool = True
    by_speed: bool = False
    recent: float = field(default=math.inf, repr=False)  # mean accepted drafts per round (exponential average)
    rounds: int = field(default=0, repr=False)
    draft_ms: float = field(default=math.nan, repr=False)  # ms per emitted token of drafting rounds (exponential average)
    plain_ms: float = field(default=math.nan, repr=False)  # the same for rounds that draft nothing

    def __post_init__(self):
        if isinstance(self.k_max, bool) or not isinstance(self.k_max, int) or self.k_max < 0:
            raise ValueError(f"DraftLength.k_max must be an int >= 0, got {self.k_max!r}")
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"DraftLength.smoothing must lie in (0, 1], got {self.smoothing!r}")

    def next_k(self) -> int:
        self.rounds += 1
        if not self.adaptive or self.recent == math.inf:
            return self.k_max
        if self.by_speed and math.isnan(self.plain_ms) and not math.isnan(self.draft_ms):
            return 0  # measure the alternative once
        if self.recent < self.min_accepted or self.draft_ms > self.plain_ms:  # (False while either is unmeasured)
            return self.k_max if self.rounds % self.probe_every == 0 else 0
        return min(self.k_max, max(1, round(self.recent) + 1))

    def observe(self, k: int, accepted_mean: float) -> None:
        if k:
            self.recent = self._average(self.recent, accepted_mean)

    def observe_speed(self, drafted: bool, ms_per_token: float) -> None:
        """A round's milliseconds per emitted token (``by_speed``), ``drafted`` or not."""
        if drafted:
            self.draft_ms = self._average(self.draft_ms, ms_per_token)
        else:
            self.plain_ms = self._average(self.plain_ms, ms_per_token)

    def _average(self, old: float, new: float) -> float:
        """The exponential average; the first value (``old`` unset: inf or nan) as it is."""
        return new if not math.isfinite(old) else self.smoothing * new + (1 - self.smoothing) * old


# -- the decoder ------------------------------------------------------------------------------------


@dataclass
class RoundLog:
    """What the rounds of a run did: per round its ``k``, each request's accepted drafts, and
    whether it was a plain step of the policy's full attention (``k = 0``, no verify pass)."""

    k: list[int] = field(default_factory=list)
    accepted: list[list[int]] = field(default_factory=list)
    plain: list[bool] = field(default_factory=list)

    def histogram(self) -> dict[int, int]:
        """Requests·rounds per accepted length (rounds that drafted)."""
        counts: dict[int, int] = {}
        for k, row in zip(self.k, self.accepted):
            for n in row if k else ():
                counts[n] = counts.get(n, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def draft_share(self) -> float:
        """The share of rounds that drafted (``k > 0``)."""
        return sum(1 for k in self.k if k) / max(len(self.k), 1)

    @property
    def plain_share(self) -> float:
        """The share of rounds that were plain full-attention steps."""
        return sum(self.plain) / max(len(self.plain), 1)


class LosslessDecoder:
    """Decodes a :class:`~mac_llm.engine.DecodeEngine` losslessly: MAC drafts, full attention verifies.

    Args:
        engine: a prefilled engine with ``attention="mac"``. With a
            :class:`~mac_llm.engine.FallbackPolicy`, a round is one plain full-attention step
            instead of a verify pass where the policy says MAC cannot win (its batch and
            context thresholds: ``policy.full``'s step) or MAC is not hitting (its hit rate:
            MAC's step without matching; the reference backend has none, so ``policy.full``'s),
            and where the drafts were refused often (``k = 0``: the same). The tokens are then full attention's as computed by that
            step's kernel, not bit for bit the verify pass's. Without a policy every round
            goes through the verify pass (``k = 0`` too).
        draft: a :class:`DraftLength` (``DraftLength(k_max=4)`` by default); ``k_max < W``.
        temperature: ``0``: greedy (identical to full attention's greedy tokens); ``> 0``:
            sampling from ``softmax(logits / temperature)`` (distributed as full attention's).
        generator: the random numbers' source for sampling (on the engine's device).
        block: ``None``: each round verifies its ``k + 1`` tokens. An int ``≥ k_max + 1``:
            every round verifies ``block`` positions (the drafts padded), so every verify
            pass has the same shapes, and a token's numerics do not depend on its round
            (with the Triton verify kernel, a row's result depends only on its own query
            and keys): the tokens are then those of full attention decoded through the same
            pass, ``LosslessDecoder(engine, DraftLength(k_max=0), block=block)``, bit for bit
            in bf16 too. The padding's K/V lie past the position and are overwritten.
        graph: with a fixed ``block``, the Triton backend and a CUDA engine, replay the
            round's fixed-shape parts as CUDA graphs (captured at the first round of each ``k``):
            before the drafts (the block's ring slots kept), the verify pass, and the
            settlement (greedy: the acceptance; the repair, the positions, the next input, the
            emitted tokens); the drafts are the engine's graphed steps, so a round is ``k + 3``
            replays and two small copies (sampling: the acceptance eager). Elsewhere it runs eagerly.
        trace: time the parts of every round that waits for the device (CUDA events on a GPU,
            the host clock on a CPU) into :attr:`trace_ms`: milliseconds summed over the rounds
            since the last :meth:`reset`, per part (``keep slots``, ``drafts``, ``verify``,
            ``accept, repair``, and ``between rounds``: from one round's repair to the next
            round's start, where the host reads the acceptance back and prepares the next round).

    Examples:
        >>> import torch
        >>> from mac_core import MACConfig
        >>> from mac_llm.engine import DecodeEngine
        >>> from mac_llm.llama import LlamaModel, ModelConfig
        >>> from mac_llm.lossless import DraftLength, LosslessDecoder
        >>> cfg = ModelConfig(n_layers=1, dim=16, n_heads=2, n_kv_heads=1, ffn_dim=32, vocab_size=20, context_length=64, rope_base=1e4, norm_eps=1e-5)
        >>> model = LlamaModel.random(cfg)
        >>> engine = DecodeEngine(model, 2, 48, "mac", MACConfig(window=8, band=2), dtype=torch.float32, device="cpu", mac_backend="ref")
        >>> _ = engine.prefill([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [3, 1, 4, 1, 5, 9, 2, 6]])
        >>> tokens = LosslessDecoder(engine, DraftLength(k_max=3)).generate(6)
        >>> [len(t) for t in tokens]
        [6, 6]
    """

    def __init__(self, engine: DecodeEngine, draft: DraftLength | None = None, temperature: float = 0.0,
                 generator: torch.Generator | None = None, block: int | None = None, graph: bool = True, trace: bool = False):
        if not isinstance(engine, DecodeEngine):
            raise TypeError(f"engine must be a DecodeEngine, got {type(engine).__name__}")
        if engine.attention != "mac":
            raise ValueError(f"engine must decode with attention='mac' (the lossless decoder drafts with MAC's step), got {engine.attention!r}")
        if not engine.states:
            raise ValueError("engine has no rings: prefill it first")
        if engine.rings_stale:
            raise ValueError("engine's rings are stale (full-attention steps ran): rewind it to a checkpoint first")
        self.draft = DraftLength() if draft is None else draft
        if not isinstance(self.draft, DraftLength):
            raise TypeError(f"draft must be a DraftLength, got {type(self.draft).__name__}")
        if self.draft.k_max >= engine.config.window:
            raise ValueError(f"draft.k_max must be below the window W={engine.config.window} (a round's rows need distinct slots), got {self.draft.k_max}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if block is not None and (isinstance(block, bool) or not isinstance(block, int) or not self.draft.k_max < block <= engine.config.window):
            raise ValueError(f"block must be None or an int in [draft.k_max + 1 = {self.draft.k_max + 1}, W = {engine.config.window}] "
                             f"(a round's rows need distinct slots), got {block!r}")
        self.engine, self.temperature, self.generator, self.block = engine, float(temperature), generator, block
        self.graphed = graph and block is not None and engine.device.type == "cuda" and engine.mac_backend == "triton"
        self._graphs: dict[str, tuple] = {}  # a round's part -> (CUDA graph, its outputs), at the first round
        self._io = _RoundIO.new(engine, block) if self.graphed else None  # the graphs' inputs and outputs
        self._states = engine.states  # a new prefill replaces them: the graphs and the history would be another's
        # every layer's rings as one state, so that a round keeps and repairs its slots in a few launches, not a few per layer
        before = [state.ring_q.data_ptr() for state in engine.states]
        self._rings = LayerState.stacked(engine.states)
        if [state.ring_q.data_ptr() for state in engine.states] != before:
            engine.graphs.clear()  # the engine's captured steps read the rings where they were
        self.log = RoundLog()
        self.emitted: list[list[int]] = [[] for _ in range(engine.batch)]  # every token each request emitted, via generate
        # with DraftLength(by_speed=True) or trace: each round's time (CUDA events on a GPU: read once they are done, no wait)
        self.clock = (_DeviceClock() if engine.device.type == "cuda" else _HostClock()) if self.draft.by_speed or trace else None
        self._timings: list[tuple] = []  # (start, end, drafted, tokens per request) not read yet
        self.trace_ms: dict[str, float] | None = {} if trace else None
        self.traced_rounds = 0
        self._marks: list[tuple] = []  # this round's (part, mark) so far
        self._last_mark = None  # the previous traced round's last mark
        self._positions = list(engine.host_positions)  # each request's position after the last landed round
        self._ahead = 0  # positions the rounds in flight (launched, not landed) may write past them

    def reset(self) -> None:
        """Start afresh after the engine was rewound (:meth:`~mac_llm.engine.DecodeEngine.rewind`):
        no tokens emitted, no rounds logged, the draft length's history cleared; captured
        graphs are kept (they read the engine's tensors, which a rewind restores in place)."""
        self.log = RoundLog()
        self.emitted = [[] for _ in range(self.engine.batch)]
        self.draft = dataclasses.replace(self.draft, recent=math.inf, rounds=0, draft_ms=math.nan, plain_ms=math.nan)
        self._timings.clear()
        self._positions, self._ahead = list(self.engine.host_positions), 0
        if self.trace_ms is not None:
            self.trace_ms, self.traced_rounds, self._marks, self._last_mark = {}, 0, [], None

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def first_token(self) -> torch.Tensor:
        """The token after each prompt ``[B]`` (full attention's: the prefill is exact), set as the next input."""
        e = self.engine
        if self.temperature:
            e.tokens.copy_(torch.multinomial(self._probabilities(e.logits), 1, generator=self.generator)[:, 0])
        return e.tokens.clone()

    @torch.no_grad()
    def round(self, k: int | None = None, active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One round (the module docstring): draft ``k`` (``None``: :class:`DraftLength`'s choice), verify, accept, repair.

        Args:
            k: drafted tokens, ``0 … W−1`` (with a policy: a round its policy makes a plain
                step drafts nothing, whatever ``k``; ``k = 0`` is a plain step there too).
            active: ``[B]`` bool, the requests that advance (``None``: all). The others are
                stepped with the batch but keep their position, token and rings: what the
                round wrote for them lies past their position.

        Returns:
            ``(emitted [B, k+1], counts [B])``: request ``b`` emitted ``emitted[b, :counts[b]]``
            (its accepted drafts, then full attention's token); the rest is ``-1``.
        """
        self._positions = list(self.engine.host_positions)
        launched = self._launch(k, active)
        self._land(launched)
        return launched.packed[:, 1:], launched.packed[:, 0] + 1

    def _launch(self, k: int | None, active: torch.Tensor | None) -> "_Launched":
        """Queue a round on the device without waiting for it (:meth:`round`'s arguments); the
        host learns its acceptance in :meth:`_land`. Host positions are those after the last
        landed round (:attr:`_positions`), plus the round in flight where one is."""
        e = self.engine
        if e.states is not self._states:
            raise ValueError("the engine was prefilled again after this LosslessDecoder was made (its graphs and tokens "
                             "belong to the old prompts): make a new LosslessDecoder")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < e.config.window):
            raise ValueError(f"k must be an int in [0, W={e.config.window}), got {k!r}")
        if active is not None and (not isinstance(active, torch.Tensor) or active.dtype != torch.bool or active.shape != (e.batch,)):
            raise ValueError(f"active must be a bool tensor [B={e.batch}], got {getattr(active, 'dtype', type(active).__name__)} {list(getattr(active, 'shape', []))}")
        policy = e.policy
        decision = "mac" if policy is None else policy.decide(e.batch, max(self._positions) + 1)
        plain = decision != "mac"
        k = 0 if plain else self.draft.next_k() if k is None else k
        if self.block is not None and k >= self.block:
            raise ValueError(f"k must be below the decoder's block={self.block}, got {k}")
        plain = plain or (policy is not None and k == 0)  # nothing to verify: one plain full-attention step
        width = self.block or k + 1  # positions the verify pass writes
        if max(self._positions) + self._ahead + width > e.capacity:
            raise ValueError(f"a round of k={k} drafts (a verified block of {width}) reaches position "
                             f"{max(self._positions) + self._ahead + width - 1}, past the capacity {e.capacity}")
        all_active = active is None or bool(active.all())
        # a plain step: the policy's full attention where MAC cannot win, else MAC's step without matching, which
        # keeps the rings current (the reference backend has none: the policy's full attention there too)
        step_kind = ("miss" if decision != "full" and e.mac_backend == "triton" else e.full_kind()) if plain else "mac"
        if plain and step_kind == "flashinfer" and self._ahead:
            raise ValueError("a FlashInfer step plans from the host's positions, which a round in flight has not given yet: land it first")
        start = self._start_timing()
        if plain and all_active:
            emitted = self._plain_round(step_kind)  # [B, 1]
            return self._launched(torch.cat([torch.zeros_like(emitted), emitted], dim=1), k, plain=True, settled=False, start=start, width=width)
        if e.rings_stale and step_kind not in FULL_ATTENTIONS:  # MAC's kernels would retire the stale rows: before the slots are kept
            e.mark_stale_rows()
        io = self._io if self.graphed else _RoundIO.new(e, width)
        if all_active:
            io.active.fill_(True)
        else:  # (from pinned memory, without waiting: a round in flight stays in flight)
            active = active.pin_memory() if io.active.is_cuda else active
            io.active.copy_(active, non_blocking=True)
        self._mark("start")
        saved = self._run("open", lambda: _open(e, io, self._rings))  # the round's slots as they were, the block filled with t0
        self._mark("keep slots")
        rings = self._rings
        if plain:
            logits = e.step(kind=step_kind)  # [B, V]
            io.accepted.zero_()
            io.next_token.copy_(self._draw(logits))
            settle, name = (lambda: _settle(e, io, rings, saved, logits, 0)), "settle plain"
        else:
            draft_probs = []
            for j in range(k):
                logits = e.step(io.block[:, j], kind="mac")
                if self.temperature:
                    draft_probs.append(self._probabilities(logits))
                io.block[:, j + 1] = self._draw(logits, draft_probs[-1] if self.temperature else None)
            self._mark("drafts")
            logits, queries, rows = self._run("verify", lambda: _verify(e, io))
            self._mark("verify")
            if self.temperature:  # the draws stay out of the graphs: the acceptance is eager, the rest graphed
                q = torch.stack(draft_probs, dim=1) if k else logits.new_zeros(e.batch, 0, logits.shape[-1])
                accepted, nxt = accept_sampled(self._probabilities(logits[:, : k + 1]), q, io.block[:, 1 : k + 1], self.generator)
                io.accepted.copy_(accepted)
                io.next_token.copy_(nxt)
            greedy = not self.temperature
            settle, name = (lambda: _settle(e, io, rings, saved, logits, k, queries, rows, greedy)), f"settle {k}"
        packed = self._run(name, settle).clone()  # (a graph's output: the next round overwrites it)
        self._mark("accept, repair")
        return self._launched(packed, k, plain=plain, settled=True, start=start, width=width, keep=active)

    def _launched(self, packed, k, *, plain, settled, start, width, keep=None) -> "_Launched":
        """The record of a queued round (``packed [B, 1 + k+1]``: accepted, then emitted): its
        results copied to the host behind it (no wait), its marks; ``start``: :meth:`_start_timing`'s."""
        host, ready = packed, None
        if packed.is_cuda:
            host, ready = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True).copy_(packed, non_blocking=True), torch.cuda.Event()
            ready.record()
        marks, self._marks = self._marks, []
        timing = None
        if start is not None:
            mark, graphs = start
            timing = (mark, self.clock.mark(), len(self._graphs) + len(self.engine.graphs) != graphs)
        self._ahead += width if settled else 0
        return _Launched(packed, host, ready, k, plain, settled, width, marks, timing, keep)

    def _land(self, r: "_Launched") -> list[list[int]] | None:
        """Wait for a launched round (alone: not for what was queued after it) and do its host
        bookkeeping (positions, log, draft length, trace, timing); ``[B][1 + k+1]``: each
        request's accepted count (``−1``: idle), then the emitted row. A plain step's round
        is not waited for (``None``): each request emitted one token."""
        e = self.engine
        if not r.settled:  # a plain step: one token each, known without waiting (its tokens: r.host once r.ready)
            self._positions = [p + 1 for p in self._positions]
            self.log.k.append(0)
            self.log.accepted.append([0] * e.batch)
            self.log.plain.append(True)
            self._stop_timing(r.timing, drafted=False, tokens=1.0)
            e.host_positions = list(self._positions)
            self._last_mark = None  # (a traced gap would hold this round)
            return None
        if r.ready is not None:
            r.ready.synchronize()
        rows = r.host.tolist()
        self._ahead -= r.width
        if r.marks:
            self._add_trace(r.marks)
        host_accepted = [row[0] for row in rows]
        self._positions = [p + n + 1 for p, n in zip(self._positions, host_accepted)]
        e.host_positions = list(self._positions)  # (with a round in flight: behind it, which only its own checks read)
        counted = [n for n in host_accepted if n >= 0]
        self.log.k.append(r.k)
        self.log.accepted.append(counted)
        self.log.plain.append(r.plain)
        if counted:
            mean = sum(counted) / len(counted)
            self.draft.observe(r.k, mean)
            self._stop_timing(r.timing, drafted=r.k > 0 and not r.plain, tokens=1 + mean)
        return rows

    def _mark(self, part: str) -> None:
        """With ``trace``: the end of ``part`` of this round (``"start"``: its beginning)."""
        if self.trace_ms is not None:
            self._marks.append((part, self.clock.mark()))

    def _add_trace(self, marks: list) -> None:
        """After a round's wait: add its parts (and the gap since the previous round) to :attr:`trace_ms`."""
        if self.trace_ms is None:
            return
        spans = list(zip(marks, marks[1:]))
        if self._last_mark is not None:
            spans.insert(0, (("", self._last_mark), ("between rounds", marks[0][1])))
        for (_, start), (part, end) in spans:
            self.trace_ms[part] = self.trace_ms.get(part, 0.0) + self.clock.ms(start, end)
        self._last_mark = marks[-1][1]
        self.traced_rounds += 1

    def _start_timing(self):
        """``(start mark, graphs so far)`` of a round when it is timed (``draft.by_speed``, ``trace``), else ``None``."""
        return None if self.clock is None else (self.clock.mark(), len(self._graphs) + len(self.engine.graphs))

    def _stop_timing(self, timing, drafted: bool, tokens: float) -> None:
        """Report every finished round's ms per token to the draft length (in order); ``timing``:
        this round's ``(start, end, captured)`` marks. A round that captured a CUDA graph is not
        counted (its time is the capture's)."""
        if timing is None:
            return
        start, end, captured = timing
        if not captured:
            self._timings.append((start, end, drafted, tokens))
        while self._timings:
            start, end, drafted, tokens = self._timings[0]
            ms = self.clock.ms(start, end)
            if ms is None:  # not done on the device yet: later rounds are not either
                break
            self.draft.observe_speed(drafted, ms / tokens)
            self._timings.pop(0)

    def _plain_round(self, kind: str) -> torch.Tensor:
        """A plain round in which every request advances: one engine step of ``kind``, nothing
        kept or repaired (the step writes only its own position's KV entry and ring slot, as any
        decode step does), no wait for the device; the emitted tokens ``[B, 1]``."""
        e = self.engine
        nxt = self._draw(e.step(kind=kind))  # [B]
        e.tokens.copy_(nxt)  # the next input (a draw when sampling; greedy: the step's own argmax)
        if e.mac_backend == "ref":  # its steps check the rings' positions (a full-attention step leaves them behind); the Triton engine's do not read them
            for state in e.states:
                state.next_pos.copy_(e.positions)
        return nxt[:, None]

    def _draw(self, logits: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
        """The token ``[B]`` after ``logits [B, V]``: the argmax, or a draw from ``probs`` (the
        tempered distribution, made here when not given) when sampling."""
        if not self.temperature:
            return logits.argmax(-1)
        probs = self._probabilities(logits) if probs is None else probs
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]

    def _run(self, name: str, part):
        """``part()``, or where :attr:`graphed` its CUDA graph (captured at the first round,
        after two warm-up runs off the capture, which are harmless: each part reads only
        what the round set before it and writes the same results again); its outputs are
        the graph's, overwritten by the next round."""
        if not self.graphed:
            return part()
        if name not in self._graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    part()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = part()
            self._graphs[name] = (graph, outputs)
        graph, outputs = self._graphs[name]
        graph.replay()
        return outputs

    def generate(self, n: int, progress: bool = False) -> list[list[int]]:
        """The next ``n`` tokens of each request (a fresh decoder's first is the prompt's next token).

        Rounds run until every request has ``n``; a request that has them waits (``active``)
        while the others go on. The next round is queued before the host reads the last one
        back, wherever some request needs more tokens whatever that round gives it, so the
        device does not wait for the host between rounds; a request may then run up to two
        rounds past its ``n``, and its extra tokens are kept for the next call
        (:attr:`emitted` holds them all). The engine's ``capacity`` needs room for that: ``n``
        positions past the longest request and ``2·(k_max + 1)`` more (a round that would pass
        it is refused by name)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        e = self.engine
        begin = [len(h) for h in self.emitted]
        if not any(begin):
            for h, t in zip(self.emitted, self.first_token().tolist()):
                h.append(t)
        bar = _progress(n, progress)
        have = lambda: [len(h) - b for h, b in zip(self.emitted, begin)]  # noqa: E731
        unread: list[tuple[_Launched, list[int]]] = []  # plain rounds not read back yet, and where their tokens go
        self._positions = list(e.host_positions)
        in_flight = None  # a round whose acceptance is not read back yet
        while True:
            counts = have()
            if in_flight is None and min(counts) >= n:
                break
            queue = in_flight is None or (
                any(c + in_flight.k + 1 < n for c in counts)  # some request needs more, whatever the round in flight gives it
                and max(self._positions) + self._ahead + (self.block or self.draft.k_max + 1) <= e.capacity
                and not (e.policy is not None and e.full_kind() == "flashinfer")  # (its plain steps plan from exact host positions)
            )
            need = [c < n for c in counts]
            queued = self._launch(None, None if all(need) else torch.tensor(need)) if queue else None
            if in_flight is not None:
                self._collect(in_flight, unread)
            in_flight = None
            if queued is not None and queued.settled:
                in_flight = queued
            elif queued is not None:
                self._collect(queued, unread)
            if bar is not None:
                bar.update(min(min(have()), n) - min(min(counts), n))
        self._read_back(unread)
        if bar is not None:
            bar.close()
        return [h[b : b + n] for h, b in zip(self.emitted, begin)]

    def _collect(self, r: "_Launched", unread: list) -> None:
        """Land ``r`` and append its tokens to :attr:`emitted` (a plain step's: placeholders, read back with the next wait)."""
        rows = self._land(r)
        if rows is None:
            unread.append((r, [len(h) for h in self.emitted]))
            for h in self.emitted:
                h.append(-1)
            return
        self._read_back(unread)  # (queued before r: done)
        for h, row in zip(self.emitted, rows):
            h.extend(row[1 : row[0] + 2])  # the accepted drafts and full attention's token; an idle request (−1) none

    def _read_back(self, unread: list) -> None:
        """Put plain rounds' tokens where they belong (``(round, index in each request's history)``)."""
        for r, at in unread:
            if r.ready is not None:
                r.ready.synchronize()
            for b, (i, row) in enumerate(zip(at, r.host.tolist())):
                self.emitted[b][i] = row[1]
        unread.clear()


@dataclass
class _Launched:
    """A round queued on the device (:meth:`LosslessDecoder._launch`).

    Attributes:
        packed: ``[B, 1 + k+1]`` int64 on the device: each request's accepted drafts (``−1``:
            idle), then the round's tokens (``−1`` past each request's).
        host: the same on the host, copied behind the round.
        ready: the CUDA event after that copy (``None`` on a CPU: already there).
        k, plain, width: the round's drafts, whether it was a plain step, the positions it may write.
        settled: it went through the acceptance (``False``: a plain step of every request, one token each).
        marks: its traced ``(part, mark)``; timing: ``(start, end, captured a graph)`` or ``None``.
        keep: a pinned host tensor its copies read (kept alive until the round is done).
    """

    packed: torch.Tensor
    host: torch.Tensor
    ready: object
    k: int
    plain: bool
    settled: bool
    width: int
    marks: list
    timing: tuple | None
    keep: torch.Tensor | None = None


class _HostClock:
    """Rounds timed on the host: a CPU engine has finished a round when it returns."""

    def mark(self) -> float:
        return time.perf_counter()

    def ms(self, start: float, end: float) -> float:
        return 1e3 * (end - start)


class _DeviceClock:
    """Rounds timed by CUDA events, read once the device has passed them (no wait)."""

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float | None:
        return start.elapsed_time(end) if end.query() else None


def _progress(n: int, on: bool):
    if not on:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=n, desc="lossless MAC", unit="tok")


@dataclass
class _RoundIO:
    """What the parts of a round pass on (fixed tensors where the parts are CUDA graphs).

    Attributes:
        start: ``[B]`` int64 each request's position when the round began.
        logits_before: ``[B, V]`` float32 the engine's logits then (kept by idle requests).
        block: ``[B, width]`` int64 the verified tokens: ``t_0``, the drafts, ``t_0`` as padding.
        accepted, next_token: ``[B]`` int64 the acceptance's result (``-1``, ``t_0`` for idle requests).
        active: ``[B]`` bool the requests that advance this round.
    """

    start: torch.Tensor
    logits_before: torch.Tensor
    block: torch.Tensor
    accepted: torch.Tensor
    next_token: torch.Tensor
    active: torch.Tensor

    @classmethod
    def new(cls, e: DecodeEngine, width: int) -> "_RoundIO":
        ints = lambda *shape: torch.zeros(*shape, dtype=torch.int64, device=e.device)  # noqa: E731
        return cls(ints(e.batch), torch.zeros_like(e.logits), ints(e.batch, width), ints(e.batch), ints(e.batch),
                   torch.ones(e.batch, dtype=torch.bool, device=e.device))


def _positions(io: _RoundIO) -> torch.Tensor:
    """``[B, width]`` the positions of the round's block."""
    return io.start[:, None] + torch.arange(io.block.shape[1], device=io.start.device)


def _open(e: DecodeEngine, io: _RoundIO, rings) -> tuple:
    """Before the drafts: note the start, fill the block with ``t_0`` and copy every layer's
    rows of the block's slots at once from the stacked ``rings`` (:meth:`~mac_core.state.LayerState.stacked`),
    ``(q [L·B, Hq, width, D], Summary, depth [L·B, Hq, width])`` (:meth:`~mac_core.state.LayerState.read`),
    which the drafts overwrite and a refused position gets back."""
    io.start.copy_(e.positions)
    io.logits_before.copy_(e.logits)
    io.block.copy_(e.tokens[:, None].expand_as(io.block))
    return rings.read(_positions(io).repeat(len(e.states), 1))


def _verify(e: DecodeEngine, io: _RoundIO):
    """The verify pass over the block, from the round's start (:func:`verify_block`)."""
    e.positions.copy_(io.start)
    return verify_block(e, io.block)


def _settle(e: DecodeEngine, io: _RoundIO, rings, saved, logits: torch.Tensor, k: int, queries=None, rows=None,
            greedy: bool = False) -> torch.Tensor:
    """After the verify pass (or a plain step): the acceptance (``greedy``: made here from
    ``logits``; else already in ``io.accepted`` and ``io.next_token``), idle requests kept
    where they were (``−1`` accepted, ``t_0`` next), then :func:`_close`; ``[B, 1 + k+1]``:
    each request's accepted drafts ``n``, then the tokens it emitted (``n + 1``), the rest ``−1``."""
    drafts = io.block[:, 1 : k + 1]  # [B, k]
    if greedy:
        accepted, nxt = accept_greedy(logits[:, : k + 1], drafts)
        io.accepted.copy_(accepted)
        io.next_token.copy_(nxt)
    io.accepted.masked_fill_(~io.active, -1)  # an idle request accepts "−1 tokens": it stays where it was
    io.next_token.copy_(torch.where(io.active, io.next_token, io.block[:, 0]))
    _close(e, io, rings, saved, logits, queries, rows)
    packed = torch.cat([io.accepted[:, None], drafts, torch.full_like(io.next_token[:, None], -1)], dim=1)  # [B, 1 + k+1]
    b = torch.arange(e.batch, device=e.device)
    packed[b, 1 + io.accepted.clamp_min(0)] = io.next_token
    packed[:, 1:].masked_fill_(torch.arange(k + 1, device=e.device)[None, :] > io.accepted[:, None], -1)
    return packed


def _close(e: DecodeEngine, io: _RoundIO, rings, saved, logits: torch.Tensor, queries=None, rows=None) -> None:
    """After the acceptance: repair every layer's rings (at once, through the stacked ``rings``), then advance each request past its
    accepted tokens, with full attention's token as the next input and its logits.

    After a verify pass (``logits [B, width, V]``, the block's ``queries`` and exact ``rows``
    per layer) the accepted positions get full attention's exact rows. After a plain step
    (``logits [B, V]``, no queries) each slot keeps what the step wrote (a miss step: the
    exact row; another full attention: nothing, the rings are stale) and an idle request's
    slot gets back what it held."""
    layers, nxt = len(e.states), io.start + io.accepted + 1
    positions = _positions(io).repeat(layers, 1)  # [L·B, width]: the stacked rings' requests
    if queries is None:
        new = rings.read(positions)
    else:
        new = (torch.cat(queries), Summary(torch.cat([r.o for r in rows]), torch.cat([r.lse for r in rows])), torch.zeros_like(saved[2]))
    _repair(rings, positions, saved, io.accepted.repeat(layers), new)
    for state in e.states:
        state.next_pos.copy_(nxt)
    e.positions.copy_(nxt)
    e.tokens.copy_(io.next_token)
    b = torch.arange(e.batch, device=e.device)
    after = logits if logits.dim() == 2 else logits[b, io.accepted.clamp_min(0)]  # [B, V]
    e.logits.copy_(torch.where((io.accepted >= 0)[:, None], after, io.logits_before))


def _repair(state, positions, saved, accepted, new) -> None:
    """Rows of ``positions [B, width]`` (``start + j``): ``new``'s where ``j ≤ accepted``, else what
    they held before the round (``saved``); both ``(q, Summary, depth)`` as :meth:`~mac_core.state.LayerState.read` gives them."""
    exact = (torch.arange(positions.shape[1], device=positions.device)[None, :] <= accepted[:, None])[:, None]  # [B, 1, width]

    def pick(now, was):
        return torch.where(exact.view(*exact.shape, *([1] * (was.dim() - 3))), now.to(was.dtype), was)

    (q, row, depth), (q_old, row_old, depth_old) = new, saved
    state.write(positions, pick(q, q_old), Summary(pick(row.o, row_old.o), pick(row.lse, row_old.lse)), pick(depth, depth_old))


__all__ = ["DraftLength", "LosslessDecoder", "RoundLog", "accept_greedy", "accept_sampled", "verify_block"]
