r"""The decode step in Triton: match → amend + complete → row update, fused into three
launches with no host synchronisation (four for a rule that verifies its candidates); and
the full-attention decode baseline.

Twin of :func:`mac_ref.decode.decode_step` (same signature, same
:class:`~mac_core.step.StepStats`, the same validation: :func:`mac_core.checks.check_step_inputs`).
The stages map onto kernels as follows:

===========================  ==============================================================
mac_ref                      mac_triton
===========================  ==============================================================
``find_match``               ``match._match_kernel`` → one int64 key per head (1 launch)
``step_spans``               ``plan.plan_units``, evaluated inside the attend kernel
``amend_complete``           ``attend._attend_kernel`` (split-KV partials per unit)
``accept_candidates``,       ``reduce._step_reduce_kernel`` (⊕ partials, the rule, the cached
``update_row``,              row, the ring write, the match report)
``LayerState.write``
===========================  ==============================================================

A rule that verifies its candidates (:class:`~mac_core.rules.MassRule`), and the
group-aware variants, take two launches instead of the attend kernel: the fresh kernel
reads each group's sinks, band and tail (three programs per group), and the prefix kernel
decides each group from those units and reads the prefixes of the heads that do not reuse
(:mod:`mac_triton.attend`, :mod:`mac_triton.decide`); each group's keys are streamed once.
A head that does not reuse reads what a miss reads.

Differences: float32 arithmetic only (float64 inputs are a ``TypeError``); the ring
write happens inside the reduce kernel rather than through ``LayerState.write``. A step's
match keys live in a :class:`DecodeWorkspace` that the caller owns:
:func:`mac_step` is the part a CUDA graph can capture (validation and ``state.next_pos``
stay outside), with one workspace per captured step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mac_core.checks import check_attention_inputs, check_step_inputs
from mac_core.config import MACConfig
from mac_core.rope import apply_rope
from mac_core.state import LayerState
from mac_core.step import StepStats
from mac_core.numerics import softmax_scale

from .attend import Verify, launch_attend
from .launch import Launch, MatchLaunch, launch_for
from .match import match_keys, new_keys, radius_sq_per_head
from .numerics import LIMITS
from .reduce import launch_full_reduce, launch_step_reduce

FULL_BAND = 2**30  # a band longer than any context: no row, every key in the "tail"


@dataclass
class DecodeWorkspace:
    """What a decode step keeps on the device between steps, owned by its caller.

    Attributes:
        keys: ``[B·Hq]`` int64 match keys, all ``NO_CANDIDATE`` between steps (the reduce
            kernel resets them), so a step needs no fill launch.
        radius_sq: ``[Hq]`` float32 squared radii of ``config``'s distance test (no
            host-to-device copy inside a captured step).
        rule_radius_sq: ``[Hq]`` float32 squared radii of the rule's own threshold
            (``2D(1 − τ_m)² s_h²`` for the mass rule; the distance test's otherwise).
        config: the configuration the radii were made for.
    """

    keys: torch.Tensor
    radius_sq: torch.Tensor
    rule_radius_sq: torch.Tensor
    config: MACConfig

    @classmethod
    def new(cls, config: MACConfig, batch: int, q_heads: int, head_dim: int, device) -> "DecodeWorkspace":
        config.check_layer()  # (the rule's radius is one layer's)
        tau = getattr(config.rule, "tau_m", config.tau)
        rule_radius = torch.tensor(config.radius_sq_per_head(q_heads, head_dim, tau=tau), dtype=torch.float32, device=device)
        return cls(new_keys(device, batch * q_heads), radius_sq_per_head(config, q_heads, head_dim, device), rule_radius, config)

    def check(self, config: MACConfig, batch: int, q_heads: int, device) -> None:
        if self.config != config or self.keys.shape != (batch * q_heads,) or self.keys.device != torch.device(device):
            raise ValueError(
                f"workspace was made for B·Hq = {self.keys.shape[0]} on {self.keys.device} with {self.config}; "
                f"the step has B·Hq = {batch * q_heads} on {device} with {config}: make one with DecodeWorkspace.new"
            )


def mac_step(
    q_pre, q_post, k_cache, v_cache, state: LayerState, positions, config: MACConfig, scale: float,
    workspace: DecodeWorkspace, launch: Launch | None = None, match_launch: MatchLaunch | None = None, match: bool = True,
):
    """The kernels of one decode step, without checks (graph-capturable); writes the rings.

    Args:
        q_pre, q_post: ``[B, Hq, D]`` pre- and post-RoPE queries.
        k_cache, v_cache: ``[B, Hkv, T, D]``, or two :class:`~mac_core.kv.PagedKV` (made
            outside the captured region: building one reads its table on the host).
        state: rings, updated in place (``next_pos`` is left to the caller).
        positions: ``[B]`` int64 positions ``t``.
        config: the MAC configuration (``config.softcap`` caps the scores).
        scale: softmax scale.
        workspace: the step's :class:`DecodeWorkspace` (its keys are left clean).
        launch: attend and reduce launch settings (default: :func:`mac_triton.launch.launch_for`).
        match_launch: the match scan's launch settings (default: :func:`mac_triton.launch.match_launch_for`).
        match: ``False`` skips the scan: every head is a miss, so the step is full attention
            that still writes the rings (a later matching step finds them current); what a
            fallback to full decoding runs.

    Returns:
        ``(out [B, Hq, D] in q_pre's dtype, lse [B, Hq] float32, StepStats)``.
    """
    B, Hq, D = q_pre.shape
    Hkv = k_cache.shape[1]
    launch = launch or launch_for(B * Hkv, D)
    rule = config.rule
    keys = workspace.keys  # all NO_CANDIDATE without a scan: every head misses
    if match:
        group = Hq // Hkv if config.group_match else None
        keys = match_keys(q_pre, state.ring_q, positions, keys, state.ring_depth, config.max_chain, match_launch, group)
    verify = None
    if match and (rule.verifies or rule.per_group):  # decided after the fresh part, by the prefix kernel
        verify = Verify(rule.name, rule.per_group, workspace.rule_radius_sq, state)
    partials = launch_attend(
        q_post, k_cache, v_cache, positions, launch, scale, band_source="match", band=config.band, sinks=config.sinks,
        keys=keys, radius_sq=workspace.radius_sq, min_context=config.min_context, softcap=config.softcap, verify=verify,
    )
    res = launch_step_reduce(
        partials, launch, q_pre=q_pre, state=state, workspace=workspace, config=config, out_dtype=q_pre.dtype, kv_heads=Hkv,
    )
    stats = StepStats(
        hit=res.hit, matched_pos=res.matched_pos, distance=res.distance, keys_read=res.keys_read, context=res.context,
        ill_conditioned=res.ill_conditioned, chain_depth=res.chain_depth, candidate=res.candidate, mass_share=res.mass_share,
    )
    return res.out, res.lse, stats


def decode_step(q_pre, k_cache, v_cache, state: LayerState, positions, config: MACConfig, q_post=None, *, launch: Launch | None = None):
    """One MAC-Attention decode step for a batch of requests (updates ``state`` in place).

    Same contract as :func:`mac_ref.decode.decode_step`, for float16 / bfloat16 / float32
    inputs, float32 rows and inputs contiguous in the head dimension. Each call makes its
    own :class:`DecodeWorkspace`; a loop that replays steps uses :func:`mac_step`.

    Args:
        q_pre: ``[B, Hq, D]`` pre-RoPE queries.
        k_cache, v_cache: ``[B, Hkv, T, D]`` post-RoPE keys and values, or two
            :class:`~mac_core.kv.PagedKV` of one table (any page size, either layout).
        state: the layer's rings (``ring_q`` in the queries' dtype, rows float32).
        positions: ``[B]`` int64, must equal ``state.next_pos``.
        config: the MAC configuration.
        q_post: ``[B, Hq, D]`` post-RoPE queries; by default RoPE of ``q_pre``.
        launch: attend and reduce launch settings (default: :func:`mac_triton.launch.launch_for`).

    Returns:
        ``(out [B, Hq, D] in q_pre's dtype, lse [B, Hq] float32, StepStats)``.

    Example:
        The reference's example (:func:`mac_ref.decode.decode_step`) through the kernels: the
        same decisions, the same output within float32 rounding (CPU tensors run in the
        Triton interpreter, ``TRITON_INTERPRET=1``; on a GPU pass CUDA tensors).

        >>> import torch, mac_ref, mac_triton
        >>> g = torch.Generator().manual_seed(0)
        >>> q_pre, k, v = (torch.randn(1, h, 41, 16, generator=g) for h in (2, 1, 1))
        >>> q_pre[:, :, 40] = q_pre[:, :, 30]
        >>> config = mac_ref.MACConfig(window=16, band=4, tau=0.5)
        >>> _, _, state = mac_ref.prefill(q_pre[:, :, :40], k, v, 40, config)
        >>> twin = state.clone()
        >>> out, lse, stats = mac_triton.decode_step(q_pre[:, :, 40], k, v, state, torch.tensor([40]), config)
        >>> want, _, ref = mac_ref.decode_step(q_pre[:, :, 40], k, v, twin, torch.tensor([40]), config)
        >>> stats.hit.tolist(), stats.keys_read.tolist(), torch.equal(stats.matched_pos, ref.matched_pos)
        ([[True, True]], [[14, 14]], True)
        >>> torch.allclose(out, want, atol=1e-5)
        True
    """
    check_step_inputs(q_pre, k_cache, v_cache, state, positions, config, q_post, LIMITS)
    positions = positions.to(torch.int64)
    B, Hq, D = q_pre.shape
    scale = config.softmax_scale(D)
    if q_post is None:
        q_post = apply_rope(q_pre, positions[:, None], config.rope_base)
    workspace = DecodeWorkspace.new(config, B, Hq, D, q_pre.device)
    result = mac_step(q_pre, q_post, k_cache, v_cache, state, positions, config, scale, workspace, launch)
    state.advance(positions)
    return result


def full_decode(
    q_post, k_cache, v_cache, positions, scale: float | None = None, *, softcap: float | None = None, launch: Launch | None = None
):
    """Full-attention decode over keys ``[0, t+1)`` with the same kernels (every head a miss).

    The baseline MAC-Attention is measured against, and the path a miss takes.

    Args:
        q_post: ``[B, Hq, D]`` post-RoPE queries.
        k_cache, v_cache: ``[B, Hkv, T, D]``, or two :class:`~mac_core.kv.PagedKV` of one table.
        positions: ``[B]`` int32/int64 positions ``t`` (``t < T``; below each paged request's length).
        scale: softmax scale, ``1/sqrt(D)`` by default.
        softcap: ``None`` (no cap) or the soft-cap ``c``: scores ``c·tanh(scale·q·k / c)``.
        launch: attend and reduce launch settings (default: :func:`mac_triton.launch.launch_for`).

    Returns:
        ``(out [B, Hq, D] in q_post's dtype, lse [B, Hq] float32)``.
    """
    check_attention_inputs(q_post, k_cache, v_cache, positions, LIMITS)
    return full_step(q_post, k_cache, v_cache, positions, scale, launch, softcap=softcap)


def full_step(
    q_post, k_cache, v_cache, positions, scale: float | None = None, launch: Launch | None = None, *, softcap: float | None = None
):
    """:func:`full_decode` without checks: no validation, no host sync, so a CUDA graph can
    capture it (the twin of :func:`mac_step`)."""
    B, Hq, D = q_post.shape
    Hkv = k_cache.shape[1]
    scale = softmax_scale(D, scale)
    launch = launch or launch_for(B * Hkv, D)
    partials = launch_attend(q_post, k_cache, v_cache, positions, launch, scale, band_source="full", band=FULL_BAND, softcap=softcap)
    return launch_full_reduce(partials, launch, out_dtype=q_post.dtype, batch=B, q_heads=Hq, kv_heads=Hkv, head_dim=D)
