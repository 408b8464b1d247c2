"""mac_triton match against mac_ref on identical rings (docs/spec.md#spec-match): hits, j*, distances."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mac_ref
import mac_triton
from mac_ref import MACConfig
from tolerances import assert_close
from triton_cases import DEVICE

pytestmark = pytest.mark.interpreter


def ring_and_queries(batch, q_heads, head_dim, window, positions, dtype, seed, repeats):
    """A filled ring (every slot written, as after decoding) and current queries, with
    ``repeats`` exact copies of the current query planted at random lags (exact ties)."""
    gen = torch.Generator().manual_seed(seed)
    config = MACConfig(window=window, band=4, tau=0.45)
    state = mac_ref.new_state(batch, q_heads, head_dim, config, dtype=dtype, device=DEVICE)
    state.ring_q.copy_(torch.randn(state.ring_q.shape, generator=gen).to(dtype))
    q = torch.randn(batch, q_heads, head_dim, generator=gen).to(dtype)
    near = (q + 0.05 * torch.randn(q.shape, generator=gen)).to(dtype)
    for b, t in enumerate(positions):
        for _ in range(repeats if t > 0 else 0):
            lag = int(torch.randint(1, min(window, t) + 1, (1,), generator=gen))
            state.ring_q[b, :, (t - lag) % window] = near[b].to(DEVICE)
    return state, q.to(DEVICE), torch.tensor(positions, device=DEVICE)


def assert_same_match(got, want, q, state, positions, dtype):
    """Same hits and j*; a different j* only where its reference distance ties within rounding."""
    differ = got.matched_pos != want.matched_pos
    if differ.any():
        # the reference distance of the kernel's choice must equal the reference minimum to rounding
        W = state.window
        slots = torch.remainder(got.matched_pos[differ], W)
        b_idx, h_idx = differ.nonzero(as_tuple=True)
        rows = state.ring_q[b_idx, h_idx, slots].float()
        d = ((q[b_idx, h_idx].float() - rows) ** 2).sum(-1)
        tie = torch.isclose(d, want.distance[differ], rtol=1e-5, atol=1e-6)
        assert tie.all(), f"{int((~tie).sum())} of {differ.numel()} j* differ beyond rounding ties"
    assert differ.float().mean() <= 0.05, f"{int(differ.sum())} rounding ties of {differ.numel()} decisions"
    same = ~differ
    assert torch.equal(got.hit[same], want.hit[same])
    assert_close(got.distance, want.distance, "triton_lse", dtype)


@given(
    batch=st.integers(1, 3),
    q_heads=st.integers(1, 3),
    head_dim=st.sampled_from([8, 64, 128]),
    window=st.sampled_from([1, 5, 64, 130]),
    t_max=st.integers(0, 300),
    repeats=st.integers(0, 3),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**31),
)
@settings(max_examples=20)
def test_match_matches_reference(batch, q_heads, head_dim, window, t_max, repeats, dtype, seed):
    """Ragged positions, t < W and t = 0 included; exact repeats tie and go to the most recent."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, t_max + 1, (batch,), generator=gen).tolist()
    state, q, pos = ring_and_queries(batch, q_heads, head_dim, window, positions, dtype, seed, repeats)
    # τ chosen so that the planted copies hit and random rows do not
    config = MACConfig(window=window, band=4, tau=0.45)
    got = mac_triton.find_match(q, state, pos, config)
    want = mac_ref.find_match(q, state, pos, config)
    assert got.hit.dtype == torch.bool and got.matched_pos.dtype == torch.int64
    assert_same_match(got, want, q, state, pos, dtype)


@pytest.mark.parametrize("tau, min_context", [(1.0, 0), (1.5, 0), (0.45, 10**6)])
def test_no_hits_when_radius_is_zero_or_context_is_short(tau, min_context):
    """τ ≥ 1 (radius 0) and t < min_context never hit, even on exact repeats; j* still reported."""
    state, q, pos = ring_and_queries(2, 2, 16, 32, [40, 7], torch.float32, 0, repeats=2)
    config = MACConfig(window=32, band=4, tau=tau, min_context=min_context)
    got = mac_triton.find_match(q, state, pos, config)
    want = mac_ref.find_match(q, state, pos, config)
    assert not got.hit.any()
    assert torch.equal(got.matched_pos, want.matched_pos)


def test_first_token_has_no_candidate():
    state, q, pos = ring_and_queries(1, 2, 16, 8, [0], torch.float32, 0, repeats=0)
    got = mac_triton.find_match(q, state, pos, MACConfig(window=8))
    assert (got.matched_pos == -1).all() and torch.isinf(got.distance).all() and not got.hit.any()


def test_per_head_radius_scale_matches_reference():
    """``config.radius_scale``: one radius factor per query head, as in mac_ref."""
    state, q, pos = ring_and_queries(2, 3, 32, 16, [20, 9], torch.float32, 4, repeats=1)
    config = MACConfig(window=16, band=4, tau=0.45, radius_scale=(1e-3, 1.0, 5.0))
    got = mac_triton.find_match(q, state, pos, config)
    want = mac_ref.find_match(q, state, pos, config)
    assert torch.equal(got.hit, want.hit) and torch.equal(got.matched_pos, want.matched_pos)
    assert not got.hit[:, 0].any() and got.hit[:, 2].all()


def test_max_chain_skips_deep_rows_as_in_reference():
    """``config.max_chain``: rows of chain depth ``≥ K`` are no candidates; the planted copy
    at a deep row is passed over for the next nearest row."""
    state, q, pos = ring_and_queries(2, 3, 32, 16, [20, 9], torch.float32, 4, repeats=1)
    gen = torch.Generator().manual_seed(5)
    state.ring_depth.copy_(torch.randint(0, 4, state.ring_depth.shape, generator=gen, dtype=torch.int32))
    free = mac_ref.find_match(q, state, pos, MACConfig(window=16, band=4, tau=0.45))
    for K in (1, 2, 3):
        config = MACConfig(window=16, band=4, tau=0.45, max_chain=K)
        got = mac_triton.find_match(q, state, pos, config)
        want = mac_ref.find_match(q, state, pos, config)
        assert torch.equal(got.hit, want.hit) and torch.equal(got.matched_pos, want.matched_pos)
        found = want.matched_pos >= 0
        assert (state.depths(want.matched_pos.clamp(min=0))[found] < K).all()
    assert not torch.equal(mac_ref.find_match(q, state, pos, MACConfig(window=16, band=4, tau=0.45, max_chain=1)).matched_pos, free.matched_pos)


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("max_chain", [None, 2])
def test_group_match_matches_reference(group, max_chain):
    """``config.group_match`` at GQA ratios 1, 3, 4 and 8 (two KV groups, ragged positions, t < W
    included): the same shared row per group, each head's own distance to it, the same tests;
    rows some head of the group may not reuse (``max_chain``) are no candidates for the group."""
    q_heads = 2 * group
    state, q, pos = ring_and_queries(2, q_heads, 32, 64, [100, 30], torch.float32, group, repeats=2)
    gen = torch.Generator().manual_seed(group)
    state.ring_depth.copy_(torch.randint(0, 3, state.ring_depth.shape, generator=gen, dtype=torch.int32))
    config = MACConfig(window=64, band=4, tau=0.45, max_chain=max_chain, group_match=True)
    got = mac_triton.find_match(q, state, pos, config, kv_heads=2)
    want = mac_ref.find_match(q, state, pos, config, kv_heads=2)
    assert_same_match(got, want, q, state, pos, torch.float32)
    by_group = want.matched_pos.view(2, 2, group)
    assert (by_group == by_group[..., :1]).all() and want.hit.any()
    with pytest.raises(ValueError, match="kv_heads"):
        mac_triton.find_match(q, state, pos, config, kv_heads=3 if group != 3 else 5)
