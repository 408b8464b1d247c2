"""mac_triton amend + complete, decode_step and full_decode against mac_ref
(docs/spec.md#spec-decode-step, #spec-exactness).

Identical inputs on both sides; outputs and rows within the ``triton`` band of the input
dtype, LSEs within float32 rounding, hits / j* / keys read equal, rings equal after many
steps, repeated runs bitwise identical. Caches are NaN past each request's position.
"""

import dataclasses
import functools
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mac_ref
import mac_triton
from mac_ref import MACConfig, MassRule, PaperRule, to_paged
from tolerances import assert_close
from triton_cases import DEVICE, assert_states_close, assert_summary_close, prefilled_step, stream_inputs

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 3, 4]),
    head_dim=st.sampled_from([16, 64]),
    window=st.sampled_from([4, 16, 64]),
    band=st.sampled_from([0, 3, 16, 400]),
    sinks=st.sampled_from([0, 2]),
    t_max=st.integers(0, 150),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31),
)
@settings(max_examples=10)
def test_amend_complete_matches_reference(batch, kv_heads, group, head_dim, window, band, sinks, t_max, dtype, seed):
    """Same state, match result and spans in; out, C and sinks ⊕ tail within the dtype band out."""
    config = MACConfig(window=window, band=band, tau=0.45, sinks=sinks)
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, t_max + 1, (batch,), generator=gen).tolist()
    q_pre, q_post, k, v, state, pos = prefilled_step(batch, kv_heads * group, kv_heads, head_dim, dtype, seed, positions, config, reuse=0.9)
    result = mac_ref.find_match(q_pre, state, pos, config)
    spans = mac_ref.step_spans(pos, result, config)
    scale = config.softmax_scale(head_dim)
    want = mac_ref.amend_complete(q_post, k, v, state, result, spans, scale)
    paged = to_paged(k, v, pos + 1, page_size=8, layout=["NHD", "HND"][seed % 2], generator=gen)  # the same keys in shuffled pages
    for cache in ((k, v), paged):
        got = mac_triton.amend_complete(q_post, *cache, state, result, spans, scale)
        for name in ("out", "cached", "rest"):
            assert_summary_close(getattr(got, name), getattr(want, name), dtype, name)


STREAMS = [
    # (dtype, Hq, Hkv, D, config): GQA ratios 1, 2, 3 and 4, head dims 32 and 64, both row rules, a bounded chain
    (torch.float32, 4, 2, 32, MACConfig(window=16, band=8, tau=0.45)),
    (torch.bfloat16, 6, 2, 64, MACConfig(window=16, band=8, tau=0.45, sinks=2, row_update="subtract")),
    (torch.float16, 2, 2, 32, MACConfig(window=8, band=4, tau=0.45, min_context=44)),
    (torch.float32, 4, 1, 32, MACConfig(window=16, band=8, tau=0.45, max_chain=2)),
    # the two-phase step: a loose cap and the mass rule (rejections), its group-aware variant, the paper's per group
    (torch.float32, 4, 2, 32, MACConfig(window=16, band=8, tau=0.0, max_chain=2, rule=MassRule(tau_m=0.7))),
    (torch.bfloat16, 6, 2, 64, MACConfig(window=16, band=8, tau=0.0, sinks=2, row_update="subtract", rule=MassRule(tau_m=0.6, per_group=True))),
    (torch.float16, 4, 2, 32, MACConfig(window=16, band=8, tau=0.3, rule=PaperRule(per_group=True))),
]


LAUNCHES = {
    "wide": mac_triton.WIDE,
    "wide-small-heads": mac_triton.launch.WIDE_SMALL_HEADS,  # 4-warp prefix programs (heads of ≤ 64 dims)
    "narrow": mac_triton.NARROW,
    "split-by-keys": dataclasses.replace(mac_triton.NARROW, unit_cost=0),
    "costly-units": dataclasses.replace(mac_triton.NARROW, unit_cost=4096),  # ranges that hold no keys
}


# Every stream under every launch on a GPU; in the interpreter (CI's 2 cores) each stream under one
# launch, in turn, so that every launch and every stream still run (a stream takes 10-20 s there).
STREAM_CASES = [
    pytest.param(*stream, launch, id=f"{i}-{launch}")
    for i, stream in enumerate(STREAMS)
    for j, launch in enumerate(LAUNCHES)
    if os.environ.get("TRITON_INTERPRET") != "1" or j == i % len(LAUNCHES)
]


def test_default_launch_by_groups_and_head_width():
    """Up to NARROW_MAX_GROUPS groups the narrow launch; past it the wide one, whose prefix
    programs have 4 warps for heads of at most 64 dims (8 for wider heads, not timed with 4)."""
    from mac_triton.launch import NARROW_MAX_GROUPS, WIDE_SMALL_HEADS

    assert mac_triton.launch_for(NARROW_MAX_GROUPS, 64) is mac_triton.NARROW
    assert mac_triton.launch_for(NARROW_MAX_GROUPS + 1, 64) is WIDE_SMALL_HEADS
    assert mac_triton.launch_for(NARROW_MAX_GROUPS + 1, 128) is mac_triton.WIDE
    assert (WIDE_SMALL_HEADS.prefix_warps, mac_triton.WIDE.prefix_warps) == (4, 8)
    assert dataclasses.replace(WIDE_SMALL_HEADS, prefix_warps=8) == mac_triton.WIDE  # nothing else differs


def test_default_match_launch_by_head_width():
    """The match scan takes 256-slot, 8-warp tiles for heads of at most 64 dims, MATCH for wider ones."""
    from mac_triton.launch import MATCH_SMALL_HEADS

    assert mac_triton.match_launch_for(64) is MATCH_SMALL_HEADS and mac_triton.match_launch_for(128) is mac_triton.MATCH
    assert (MATCH_SMALL_HEADS.block_w, MATCH_SMALL_HEADS.warps) == (256, 8)
    assert MATCH_SMALL_HEADS.programs_per_sm == mac_triton.MATCH.programs_per_sm  # nothing else differs


@pytest.mark.parametrize("dtype, q_heads, kv_heads, head_dim, config, launch", STREAM_CASES)
def test_decode_stream_matches_reference(dtype, q_heads, kv_heads, head_dim, config, launch):
    """Prefill, then 10 decode steps of a ragged batch: same decisions, outputs, rows and rings,
    with each of the attend kernel's launch settings."""
    q, k, v = stream_inputs(2, q_heads, kv_heads, 52, head_dim, dtype, seed=3, reuse=0.8)
    prefill = torch.tensor([40, 42], device=DEVICE)
    want = mac_ref.run_stream(q, k, v, prefill, config)
    got = mac_ref.run_stream(q, k, v, prefill, config, step_fn=functools.partial(mac_triton.decode_step, launch=LAUNCHES[launch]))
    assert_streams_match(got, want, dtype, config)


def assert_streams_match(got, want, dtype, config):
    """mac_triton's stream ``got`` against mac_ref's ``want``: same decisions, outputs, rows and
    rings; ``want`` must mix hits and misses (and reject candidates, for a two-phase rule)."""
    assert want.stats.hit.any() and not want.stats.hit.all(), "the stream should mix hits and misses"
    if config.rule.verifies or config.rule.per_group:
        assert (want.stats.candidate & ~want.stats.hit).any(), "the stream should reject candidates"
    for name in ("hit", "matched_pos", "keys_read", "context", "ill_conditioned", "chain_depth", "candidate"):
        assert torch.equal(getattr(got.stats, name), getattr(want.stats, name)), f"stats.{name} differ"
    assert_close(got.stats.distance, want.stats.distance, "triton_lse", dtype)
    assert_close(got.stats.mass_share, want.stats.mass_share, "triton_lse", dtype)
    if config.max_chain is not None:
        assert 0 < want.stats.chain_depth.max() <= config.max_chain
    decoded = ~torch.isnan(want.lse)
    assert torch.equal(decoded, ~torch.isnan(got.lse))
    assert_close(got.out[decoded], want.out[decoded], "triton", dtype, msg="out")
    assert_close(got.lse[decoded], want.lse[decoded], "triton_lse", dtype, msg="lse")
    assert_states_close(got.state, want.state, dtype, config)


SECOND_STREAMS = {
    # (dtype, Hq, Hkv, D, prompts, launch, config): a second stream for two-phase paths that had one
    # the fresh LSE with sinks, per head: GQA 3, head dim 16, 3 sinks beside a band of 3, short
    # ragged prompts (sinks carry much of the mass), the keys split into many units
    "mass-sinks": (torch.float32, 3, 1, 16, [19, 9, 27], "split-by-keys", MACConfig(window=8, band=3, tau=0.0, sinks=3, rule=MassRule(tau_m=0.8))),
    # the paper's rule per group: GQA 4, bf16, no band (a row covers up to its token), a sink,
    # the subtract rule, bounded chains
    "paper-per-group": (
        torch.bfloat16, 8, 2, 16, [19, 9, 27], "wide",
        MACConfig(window=8, band=0, tau=0.2, sinks=1, max_chain=2, row_update="subtract", rule=PaperRule(per_group=True)),
    ),
    # a group match (one row per KV group, GQA 4) with the mass rule: shared rows, per-head tests
    "group-match": (torch.float32, 8, 2, 16, [19, 9, 27], "narrow", MACConfig(window=8, band=3, tau=0.0, sinks=1, rule=MassRule(tau_m=0.7), group_match=True)),
}  # fmt: skip


@pytest.mark.parametrize("dtype, q_heads, kv_heads, head_dim, prompts, launch, config", list(SECOND_STREAMS.values()), ids=list(SECOND_STREAMS))
def test_two_phase_stream_second_configuration(dtype, q_heads, kv_heads, head_dim, prompts, launch, config):
    """Prefill of three ragged prompts, then 6 decode steps, in configurations unlike those of
    :data:`STREAMS`: same hits, candidates and ``j*``, ``w`` and outputs within the band, same rings."""
    q, k, v = stream_inputs(len(prompts), q_heads, kv_heads, max(prompts) + 6, head_dim, dtype, seed=3, reuse=0.7)
    prefill = torch.tensor(prompts, device=DEVICE)
    want = mac_ref.run_stream(q, k, v, prefill, config)
    got = mac_ref.run_stream(q, k, v, prefill, config, step_fn=functools.partial(mac_triton.decode_step, launch=LAUNCHES[launch]))
    assert_streams_match(got, want, dtype, config)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads, group", [(1, 1), (2, 3), (1, 8)])
def test_full_decode_matches_oracle(dtype, kv_heads, group):
    """Every head a miss: full attention over [0, t+1), ragged positions, against float64."""
    positions = [0, 37, 300]
    config = MACConfig(window=8)
    _, q_post, k, v, _, pos = prefilled_step(3, kv_heads * group, kv_heads, 64, dtype, 5, positions, config)
    out, lse = mac_triton.full_decode(q_post, k, v, pos)
    want_o, want_lse = mac_ref.full_attention(q_post, k, v, pos + 1)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, want_o, "exact", dtype)
    assert_close(lse, want_lse, "triton_lse", dtype)


def test_radius_zero_gives_full_attention():
    """τ ≥ 1: no hit, and every step's output is full attention (spec: exactness facts)."""
    config = MACConfig(window=8, band=4, tau=1.0)
    q_pre, q_post, k, v, state, pos = prefilled_step(2, 4, 2, 32, torch.float32, 7, [30, 51], config, reuse=1.0)
    out, lse, stats = mac_triton.decode_step(q_pre, k, v, state, pos, config, q_post=q_post)
    assert not stats.hit.any()
    want_o, want_lse = mac_ref.full_attention(q_post, k, v, pos + 1)
    assert_close(out, want_o, "exact", torch.float32)
    assert_close(lse, want_lse, "triton_lse", torch.float32)


def test_repeated_runs_are_bitwise_identical():
    config = MACConfig(window=16, band=4, tau=0.45)
    q_pre, q_post, k, v, state, pos = prefilled_step(2, 4, 2, 32, torch.bfloat16, 11, [40, 63], config, reuse=0.9)
    runs = []
    for _ in range(2):
        s = state.clone()
        out, lse, stats = mac_triton.decode_step(q_pre, k, v, s, pos, config, q_post=q_post)
        runs.append((out, lse, stats.hit, stats.matched_pos, s.ring_q, s.ring_o, s.ring_lse))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert runs[0][2].any(), "the step should have hits"


def test_bad_inputs_are_refused():
    config = MACConfig(window=8, band=4)
    q_pre, q_post, k, v, state, pos = prefilled_step(1, 2, 1, 16, torch.float32, 0, [10], config)
    with pytest.raises(ValueError, match="do not follow the previous step"):
        mac_triton.decode_step(q_pre, k, v, state, pos - 1, config)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        s64 = mac_ref.prefill(*(x.double() for x in stream_inputs(1, 2, 1, 11, 16, torch.float32, 0)), 10, config)[2]
        mac_triton.decode_step(q_pre.double(), k.double(), v.double(), s64, pos, config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_stream_with_exact_ties_and_a_match_at_position_zero(dtype):
    """The fused step's tie rule and its ``j = 0`` candidate, along a stream.

    ``t < W`` with a prefill of 3 tokens, so every earlier token, position 0 included, is a
    candidate. Step 3 repeats query 0 exactly (its only copy: ``j* = 0``); step 5 repeats
    query 1, which steps 2 and 4 already repeated exactly (a three-way tie at distance 0:
    the most recent, ``j* = 4``, must win); the other queries are far apart.
    """
    gen = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, T = 1, 2, 1, 32, 9
    config = MACConfig(window=16, band=2, tau=0.45)
    q = 20.0 * torch.randn(B, Hq, T, D, generator=gen)  # far apart: no hit but the planted ones
    q[:, :, 3] = q[:, :, 0]
    q[:, :, 2] = q[:, :, 1]
    q[:, :, 4] = q[:, :, 1]
    q[:, :, 5] = q[:, :, 1]
    k = mac_ref.apply_rope(torch.randn(B, Hkv, T, D, generator=gen), torch.arange(T))
    v = torch.randn(B, Hkv, T, D, generator=gen)
    q, k, v = q.to(dtype).to(DEVICE), k.to(dtype).to(DEVICE), v.to(dtype).to(DEVICE)
    want = mac_ref.run_stream(q, k, v, 3, config)
    got = mac_ref.run_stream(q, k, v, 3, config, step_fn=mac_triton.decode_step)
    steps = {int(t): s for s, t in enumerate(range(3, T))}
    assert (want.stats.matched_pos[steps[3]] == 0).all() and want.stats.hit[steps[3]].all(), "step 3 matches position 0"
    assert (want.stats.matched_pos[steps[5]] == 4).all() and want.stats.hit[steps[5]].all(), "the tie goes to the most recent"
    for name in ("hit", "matched_pos", "keys_read", "chain_depth"):
        assert torch.equal(getattr(got.stats, name), getattr(want.stats, name)), f"stats.{name} differ"
    decoded = ~torch.isnan(want.lse)
    assert_close(got.out[decoded], want.out[decoded], "triton", dtype, msg="out")
    assert_states_close(got.state, want.state, dtype, config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rejected_candidates_are_full_attention(dtype):
    """The two-phase step: every head whose candidate the mass rule rejects gives full
    attention over ``[0, t+1)`` within the dtype's band, and reads ``t + 1`` keys."""
    config = MACConfig(window=16, band=8, tau=-0.5, sinks=2, rule=MassRule(tau_m=0.9))
    q_pre, q_post, k, v, state, pos = prefilled_step(2, 6, 2, 32, dtype, 9, [60, 47], config, reuse=0.3)
    out, lse, stats = mac_triton.decode_step(q_pre, k, v, state, pos, config, q_post=q_post)
    rejected = stats.candidate & ~stats.hit
    assert rejected.any() and stats.hit.any()
    want_o, want_lse = mac_ref.full_attention(q_post, k, v, pos + 1)  # on the CPU
    rejected = rejected.cpu()
    assert_close(out.cpu()[rejected], want_o[rejected], "exact", dtype)
    assert_close(lse.cpu()[rejected], want_lse[rejected], "triton_lse", dtype)
    assert torch.equal(stats.keys_read.cpu()[rejected], (pos + 1)[:, None].expand_as(stats.keys_read).cpu()[rejected])



@pytest.mark.parametrize("batch, kv_heads, prompts", [(1, 1, [170]), (2, 2, [160, 131])], ids=["one-group", "four-groups"])
def test_rejected_prefixes_split_into_many_pieces(batch, kv_heads, prompts):
    """The prefix kernel splits a group's rejected prefix ``[S, lo)`` into up to ``max_pieces``
    pieces of at least ``4 · min_chunk`` keys. With short pieces (``min_chunk`` 4) groups take
    several pieces, and every rejected head is still full attention over ``[0, t+1)``."""
    config = MACConfig(window=16, band=8, tau=-0.5, sinks=2, rule=MassRule(tau_m=0.9))
    q_pre, q_post, k, v, state, pos = prefilled_step(batch, 4 * kv_heads, kv_heads, 32, torch.float32, 9, prompts, config, reuse=0.3)
    launch = dataclasses.replace(mac_triton.NARROW, min_chunk=4)
    workspace = mac_triton.DecodeWorkspace.new(config, batch, 4 * kv_heads, 32, q_pre.device)
    keys = mac_triton.match.match_keys(q_pre, state.ring_q, pos, workspace.keys.clone(), state.ring_depth)
    verify = mac_triton.attend.Verify(config.rule.name, False, workspace.rule_radius_sq, state)
    partials = mac_triton.attend.launch_attend(
        q_post, k, v, pos, launch, config.softmax_scale(32), band_source="match", band=config.band, sinks=config.sinks, keys=keys,
        radius_sq=workspace.radius_sq, verify=verify,
    )
    assert partials.plan[:, mac_triton.plan.PLAN_PREFIX_UNITS.value].max() > 1, "no group took several pieces"
    out, lse, stats = mac_triton.decode_step(q_pre, k, v, state, pos, config, q_post=q_post, launch=launch)
    rejected = stats.candidate & ~stats.hit
    assert rejected.any()
    want_o, want_lse = mac_ref.full_attention(q_post, k, v, pos + 1)  # on the CPU
    rejected = rejected.cpu()
    assert_close(out.cpu()[rejected], want_o[rejected], "exact", torch.float32)
    assert_close(lse.cpu()[rejected], want_lse[rejected], "triton_lse", torch.float32)
