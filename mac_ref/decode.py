r"""The decode step: match → accept → amend → complete → row update, for a batch of requests.

One step for the token at position ``t`` (its own key/value already in the cache):

1. **Match** (:mod:`mac_ref.match`): ``j*`` and the distance test per query head.
2. **Accept** (:mod:`mac_ref.accept`): the acceptance rule picks the hits among the candidates.
3. **Amend** (:mod:`mac_ref.amend`): ``C = R_{j*} ⊕ A(q_t, [P, N))`` on a hit,
   ``A(q_t, [S, N))`` on a miss.
4. **Complete** (:mod:`mac_ref.complete`): ``out = A(q_t, [0, S)) ⊕ C ⊕ A(q_t, [N, t+1))``.
5. **Row update**: ``R_t = C`` (``split``) or ``R_t = out ⊖ (A(sinks) ⊕ A(tail))``
   (``subtract``, with the sinks and tail step 4 computed), written with ``q̃_t`` and its
   chain depth (``depth(j*) + 1`` on a hit, 0 on a miss) into slot ``t mod W``.

Prefill is plain causal attention and seeds the rows of the last ``W`` prompt tokens
exactly: ``R_t = A(q_t, [S(t), E(t)))``. Spec: [the decode step][spec-decode-step].
"""

from __future__ import annotations

import torch

from mac_core.checks import check_prefill_inputs, check_step_inputs
from mac_core.config import MACConfig
from mac_core.state import LayerState, new_state
from mac_core.step import Completion, StepStats, row_range

from mac_core.rope import apply_rope
from mac_core.step import step_spans

from .accept import accept_candidates
from .amend import amend_row
from .complete import complete_output, edge_summaries
from .match import find_match
from .summary import attend, merge, remove


def update_row(completion: Completion, config: MACConfig):
    """The new ring row ``R_t`` and the ``subtract`` rule's ill-conditioned mask ``[B, Hq]``.

    ``split``: ``R_t = C``. ``subtract``: ``R_t = out ⊖ (A(q_t, [0, S)) ⊕ A(q_t, [N, t+1)))``,
    the sinks and tail that completed the step.
    """
    if config.row_update == "split":
        return completion.cached, torch.zeros_like(completion.cached.lse, dtype=torch.bool)
    return remove(completion.out, completion.rest)


def decode_step(q_pre, k_cache, v_cache, state: LayerState, positions, config: MACConfig, q_post=None):
    """One MAC-Attention decode step for a batch of requests (updates ``state`` in place).

    Args:
        q_pre: ``[B, Hq, D]`` pre-RoPE queries of the tokens at ``positions``.
        k_cache, v_cache: ``[B, Hkv, T, D]`` post-RoPE keys and values, or two
            :class:`~mac_core.kv.PagedKV` of one table; key ``positions[b]`` of request
            ``b`` is already written. Entries past a request's position are never read.
        state: the layer's rings (from :func:`prefill` or :func:`~mac_core.state.new_state`).
        positions: ``[B]`` int64, must equal ``state.next_pos``.
        config: the MAC configuration.
        q_post: ``[B, Hq, D]`` post-RoPE queries; by default ``apply_rope(q_pre, positions,
            config.rope_base)``. Pass the model's own to use another RoPE variant.

    Returns:
        ``(out [B, Hq, D] in q_pre's dtype, lse [B, Hq] in the compute dtype, StepStats)``.

    Example:
        A prompt of 40 tokens, then a step whose query repeats the one at position 30: it
        hits that row and reads the band and the tail only. At ``τ = 1`` nothing hits, and
        the step is full attention.

        >>> import torch, mac_ref
        >>> g = torch.Generator().manual_seed(0)
        >>> q_pre, k, v = (torch.randn(1, h, 41, 16, generator=g) for h in (2, 1, 1))   # Hq 2, Hkv 1
        >>> q_pre[:, :, 40] = q_pre[:, :, 30]
        >>> config = mac_ref.MACConfig(window=16, band=4, tau=0.5)
        >>> _, _, state = mac_ref.prefill(q_pre[:, :, :40], k, v, 40, config)
        >>> out, lse, stats = mac_ref.decode_step(q_pre[:, :, 40], k, v, state, torch.tensor([40]), config)
        >>> stats.hit.tolist(), stats.matched_pos.tolist(), stats.keys_read.tolist()   # band 10 + tail 4 of 41 keys
        ([[True, True]], [[30, 30]], [[14, 14]])
        >>> exact = mac_ref.MACConfig(window=16, band=4, tau=1.0)
        >>> _, _, state = mac_ref.prefill(q_pre[:, :, :40], k, v, 40, exact)
        >>> out, _, stats = mac_ref.decode_step(q_pre[:, :, 40], k, v, state, torch.tensor([40]), exact)
        >>> full = mac_ref.attend(mac_ref.apply_rope(q_pre[:, :, 40], torch.tensor([[40]])), k, v, 0, 41).o
        >>> stats.hit.any().item(), torch.allclose(out, full, atol=1e-6)
        (False, True)
    """
    check_step_inputs(q_pre, k_cache, v_cache, state, positions, config, q_post)
    positions = positions.to(torch.int64)
    scale = config.softmax_scale(q_pre.shape[-1])
    if q_post is None:
        q_post = apply_rope(q_pre, positions[:, None], config.rope_base)

    candidates = find_match(q_pre, state, positions, config, kv_heads=k_cache.shape[1])
    # the sinks and the tail do not depend on the decisions: attended once, for the rule and the output
    sinks, tail = edge_summaries(q_post, k_cache, v_cache, step_spans(positions, candidates, config), scale, config.softcap)
    decision = accept_candidates(config, candidates, state, q_post, k_cache, v_cache, positions, scale, merge(sinks, tail))
    result = decision.result
    spans = step_spans(positions, result, config)  # a rejected candidate reads as a miss
    completion = complete_output(amend_row(q_post, k_cache, v_cache, state, result, spans, scale, config.softcap), sinks, tail)
    row, ill_conditioned = update_row(completion, config)
    depth = torch.where(result.hit, state.depths(result.matched_pos.clamp(min=0)).to(torch.int64) + 1, 0)  # [B, Hq]
    state.write(positions, q_pre, row, depth)
    state.advance(positions)

    stats = StepStats(
        hit=result.hit,
        matched_pos=result.matched_pos,
        distance=result.distance,
        keys_read=spans.keys_read(),
        context=positions + 1,
        ill_conditioned=ill_conditioned,
        chain_depth=depth,
        candidate=decision.candidate,
        mass_share=decision.mass_share,
    )
    return completion.out.o.to(q_pre.dtype), completion.out.lse, stats


def prefill(q_pre, k_cache, v_cache, prompt_lengths, config: MACConfig, q_post=None):
    """Full causal attention over the prompts, and rings seeded for decoding.

    Rows of the last ``min(W, n_b)`` prompt tokens are exact:
    ``R_t = A(q_t, [min(F, E(t)), E(t)))`` (:meth:`mac_core.state.LayerState.seed`).

    Args:
        q_pre: ``[B, Hq, L, D]`` pre-RoPE queries of positions ``0 … L−1``.
        k_cache, v_cache: ``[B, Hkv, T, D]`` with ``T ≥ L`` (or two :class:`~mac_core.kv.PagedKV`
            holding ``≥ n_b`` keys per request); keys ``0 … n_b−1`` written.
        prompt_lengths: ``[B]`` int64 ``n_b ≤ L`` (0 allowed), or an int for all requests.
        config: the MAC configuration.
        q_post: ``[B, Hq, L, D]`` post-RoPE queries; by default RoPE of ``q_pre``.

    Returns:
        ``(out [B, Hq, L, D], lse [B, Hq, L], state)``. Positions ``≥ n_b`` hold the empty
        summary ``(0, −inf)``; ``state.next_pos = prompt_lengths``.
    """
    prompt_lengths = check_prefill_inputs(q_pre, k_cache, v_cache, prompt_lengths, q_post)
    B, Hq, L, D = q_pre.shape
    scale = config.softmax_scale(D)
    pos = torch.arange(L, device=q_pre.device)  # [L]
    if q_post is None:
        q_post = apply_rope(q_pre, pos, config.rope_base)

    in_prompt = pos[None, None, :] < prompt_lengths[:, None, None]  # [B, 1, L]
    causal_end = torch.where(in_prompt, pos + 1, 0)  # empty range past the prompt
    out = attend(q_post, k_cache, v_cache, 0, causal_end, scale, config.softcap)

    rows = attend(q_post, k_cache, v_cache, *row_range(pos, config.band, config.sinks), scale, config.softcap)
    state = new_state(B, Hq, D, config, dtype=q_pre.dtype, device=q_pre.device).seed(q_pre, rows, prompt_lengths)
    return out.o.to(q_pre.dtype), out.lse, state
