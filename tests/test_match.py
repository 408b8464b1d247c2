"""Stage 2: match, the nearest recent pre-RoPE query and the distance test (docs/spec.md#spec-match)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mac_ref import MACConfig, find_match, new_state, run_stream

f64 = torch.float64


def ring_with_history(history: torch.Tensor, positions: torch.Tensor, config: MACConfig):
    """A state whose ring holds the queries ``history [B, Hq, T, D]`` of tokens ``< positions[b]``.

    Only the last ``W`` tokens of each request fit in the ring, as after decoding.
    """
    B, Hq, _, D = history.shape
    state = new_state(B, Hq, D, config, dtype=history.dtype)
    W = config.window
    for b in range(B):
        t = int(positions[b])
        for j in range(max(0, t - W), t):
            state.ring_q[b, :, j % W] = history[b, :, j]
    state.next_pos = positions.clone()
    return state


def far_apart_queries(seed, batch, q_heads, length, head_dim, dtype=f64):
    """Queries whose pairwise distances are far beyond any hit radius of ``τ ≥ 0``."""
    gen = torch.Generator().manual_seed(seed)
    return (20.0 * torch.randn(batch, q_heads, length, head_dim, generator=gen, dtype=f64)).to(dtype)


@given(
    window=st.integers(1, 12),
    t=st.integers(0, 30),
    copies=st.integers(1, 4),
    offset=st.sampled_from([0.0, 0.1, 3.0]),
    seed=st.integers(0, 2**31),
)
def test_ties_go_to_the_most_recent_candidate(window, t, copies, offset, seed):
    """Equal distances (exact repeats) pick the smallest lag, hit or miss."""
    config = MACConfig(window=window, band=4, tau=0.45)
    history = far_apart_queries(seed, 1, 2, t + 1, 8)
    gen = torch.Generator().manual_seed(seed)
    lo = max(0, t - window)
    q_now = history[:, :, t]  # [1, 2, 8]
    nearby = q_now + offset * torch.randn(1, 2, 8, generator=gen, dtype=f64)
    tied = sorted(set(torch.randint(lo, max(t, lo + 1), (copies,), generator=gen).tolist())) if t > 0 else []
    for j in tied:
        history[:, :, j] = nearby
    state = ring_with_history(history, torch.tensor([t]), config)
    result = find_match(q_now, state, torch.tensor([t]), config)
    if not tied:
        assert (result.matched_pos == -1).all() and torch.isinf(result.distance).all() and not result.hit.any()
        return
    assert (result.matched_pos == max(tied)).all()
    expected = ((nearby - q_now) ** 2).sum(-1)
    assert torch.equal(result.distance, expected)
    assert torch.equal(result.hit, expected < config.hit_radius_sq(8))


def test_tie_break_from_a_stream():
    """The same token repeated: a stream decoded by the reference picks the latest repeat."""
    config = MACConfig(window=16, band=2, tau=0.5)
    q = far_apart_queries(0, 1, 1, 12, 8)
    q[:, :, [5, 7, 11]] = q[:, :, 2:3].clone()
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 1, 1, 12, 8, generator=gen, dtype=f64)
    stats = run_stream(q, k, v, 1, config).stats  # steps are positions 1 … 11
    assert stats.hit[:, 0, 0].nonzero().flatten().add(1).tolist() == [5, 7, 11]
    assert stats.matched_pos[[4, 6, 10], 0, 0].tolist() == [2, 5, 7]


@pytest.mark.parametrize("window", [1, 3, 8])
def test_window_bounds(window):
    """The candidate ``t − W`` is in the window; ``t − W − 1`` is not."""
    config = MACConfig(window=window, band=2, tau=0.5)
    T = 3 * window + 4
    q = far_apart_queries(1, 1, 2, T, 8)
    oldest, too_old = 2 * window + 1, 3 * window + 3
    q[:, 0, oldest] = q[:, 0, oldest - window]  # head 0: exactly W back
    q[:, 1, too_old] = q[:, 1, too_old - window - 1]  # head 1: W + 1 back
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 1, 1, T, 8, generator=gen, dtype=f64)
    stats = run_stream(q, k, v, 0, config).stats  # step s is position s
    assert stats.hit[oldest, 0, 0] and stats.matched_pos[oldest, 0, 0] == oldest - window
    assert not stats.hit[too_old, 0, 1]
    assert stats.matched_pos[too_old, 0, 1] >= too_old - window
    assert not stats.hit[:, 0, 0].logical_and(torch.arange(T) != oldest).any()


@pytest.mark.parametrize("t", [0, 1, 5])
def test_before_the_window_fills_empty_slots_are_no_candidates(t):
    """``t < W``: only ``[0, t)`` are candidates; unwritten slots (zeros) never match a zero query."""
    config = MACConfig(window=8, band=2, tau=0.0)
    history = far_apart_queries(2, 2, 2, t + 1, 4)
    history[:, :, t] = 0.0  # distance 0 to every unwritten slot
    state = ring_with_history(history, torch.tensor([t, t]), config)
    result = find_match(history[:, :, t], state, torch.tensor([t, t]), config)
    if t == 0:
        assert (result.matched_pos == -1).all() and torch.isinf(result.distance).all() and not result.hit.any()
    else:
        assert ((result.matched_pos >= 0) & (result.matched_pos < t)).all()
        assert (result.distance > 0).all()


@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_threshold_is_strict(dtype):
    """Hit iff ``d < 2D(1 − τ)²``: ``τ = 0.5, D = 8`` gives a radius² of exactly 4."""
    config = MACConfig(window=4, band=2, tau=0.5)
    assert config.hit_radius_sq(8) == 4.0
    base = torch.arange(8, dtype=dtype).div(4).reshape(1, 1, 1, 8).repeat(1, 3, 4, 1)
    step = torch.zeros(1, 3, 8, dtype=dtype)
    step[0, :, 0] = torch.tensor([2.0, 2.0 - 2.0**-10, 2.0 + 2.0**-10], dtype=dtype)
    history = base.clone()
    history[:, :, 1:] += 100.0  # only token 0 is near
    state = ring_with_history(history, torch.tensor([4]), config)
    result = find_match(base[:, :, 0] + step, state, torch.tensor([4]), config)
    assert result.matched_pos.tolist() == [[0, 0, 0]]
    assert result.distance[0, 0].item() == 4.0
    assert result.hit.tolist() == [[False, True, False]]


@given(tau=st.floats(-0.5, 1.5), spread=st.floats(0.0, 3.0), seed=st.integers(0, 2**31))
def test_hit_follows_the_radius_for_any_tau(tau, spread, seed):
    config = MACConfig(window=6, band=2, tau=tau)
    gen = torch.Generator().manual_seed(seed)
    history = spread * torch.randn(2, 4, 10, 8, generator=gen, dtype=f64)
    positions = torch.tensor([9, 3])
    state = ring_with_history(history, positions, config)
    q_now = history[torch.arange(2), :, positions]
    result = find_match(q_now, state, positions, config)
    radius = (1.0 - tau) * math.sqrt(2 * 8)
    expected_hit = (result.distance.sqrt() < radius) if tau < 1 else torch.zeros_like(result.hit)
    assert torch.equal(result.hit, expected_hit)


@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_tau_at_least_one_never_hits(tau):
    config = MACConfig(window=4, band=2, tau=tau)
    history = torch.ones(1, 2, 5, 8, dtype=f64)  # every candidate at distance 0
    state = ring_with_history(history, torch.tensor([4]), config)
    result = find_match(history[:, :, 4], state, torch.tensor([4]), config)
    assert (result.distance == 0).all() and not result.hit.any()
    assert (result.matched_pos == 3).all()


def test_min_context_forbids_early_hits_but_reports_the_candidate():
    config = MACConfig(window=8, band=2, tau=0.5, min_context=5)
    history = torch.ones(2, 2, 8, 8, dtype=f64)
    positions = torch.tensor([4, 5])
    state = ring_with_history(history, positions, config)
    result = find_match(history[:, :, 0], state, positions, config)
    assert result.hit.tolist() == [[False, False], [True, True]]
    assert result.matched_pos.tolist() == [[3, 3], [4, 4]]


def test_heads_and_requests_match_independently():
    """Heads of one group and requests of one batch each find their own ``j*``."""
    config = MACConfig(window=8, band=2, tau=0.5)
    history = far_apart_queries(3, 2, 4, 12, 8)
    plan = {(0, 0): 2, (0, 1): 7, (0, 2): 3, (1, 3): 1}  # (request, head) -> planted j*
    positions = torch.tensor([10, 4])
    for (b, h), j in plan.items():
        history[b, h, int(positions[b])] = history[b, h, j]
    state = ring_with_history(history, positions, config)
    result = find_match(history[torch.arange(2), :, positions], state, positions, config)
    for b in range(2):
        for h in range(4):
            assert bool(result.hit[b, h]) == ((b, h) in plan)
            if (b, h) in plan:
                assert result.matched_pos[b, h] == plan[(b, h)]
