"""The per-layer state (``mac_core.state.LayerState``): seeding from a prompt, advancing, its size.

Seeding is the one path by which ``mac_ref.prefill``, the real model's backend and the
benchmarks fill the rings; these tests pin it to the prefill's exact rows.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mac_ref
from mac_core import LayerState, MACConfig, Summary, row_range
from tolerances import assert_close

f64 = torch.float64


@given(
    window=st.integers(1, 12),
    band=st.integers(0, 6),
    sinks=st.integers(0, 3),
    prompt=st.lists(st.integers(0, 20), min_size=2, max_size=2),
    seed=st.integers(0, 2**31),
)
def test_seeding_from_the_prompt_tail_equals_the_prefill(window, band, sinks, prompt, seed):
    """Rows of only the last ``min(W, n)`` positions give the same rings as a prefill of them all."""
    config = MACConfig(window=window, band=band, sinks=sinks)
    L = max(prompt)
    q, k, v = mac_ref.synthetic_stream(2, 4, 2, L + 1, 8, seed=seed, dtype=f64)
    lengths = torch.tensor(prompt)
    _, _, want = mac_ref.prefill(q[:, :, :L], k, v, lengths, config)
    if len(set(prompt)) == 1:  # one length: seed from just the positions that enter the ring
        n = prompt[0]
        first = max(0, n - window)
        pos = torch.arange(first, n)
        q_post = mac_ref.apply_rope(q[:, :, first:n], pos, config.rope_base)
        rows = mac_ref.attend(q_post, k, v, *row_range(pos, band, sinks))
        got = LayerState.empty(2, 4, 8, window, dtype=f64).seed(q[:, :, first:n], rows, lengths, first_position=first)
        for name in ("ring_q", "ring_depth", "next_pos"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        # the rows: the same sums over fewer positions at once (another summation order)
        assert_close(got.ring_o, want.ring_o, "exact", f64)
        assert_close(got.ring_lse, want.ring_lse, "exact", f64)
    for b, n in enumerate(prompt):  # slot s holds the newest prompt token j ≡ s (mod W), or nothing
        for s in range(window):
            newest = [j for j in range(n) if j % window == s and j >= n - window]
            if newest:
                assert torch.equal(want.ring_q[b, :, s], q[b, :, newest[-1]])
            else:
                assert torch.isneginf(want.ring_lse[b, :, s]).all() and not want.ring_q[b, :, s].any()
    assert torch.equal(want.next_pos, lengths) and not want.ring_depth.any()


def test_seeding_refuses_positions_it_was_not_given():
    state = LayerState.empty(1, 2, 4, 8)
    q = torch.randn(1, 2, 3, 4)
    rows = Summary(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3))
    with pytest.raises(ValueError, match=r"the last min\(W=8, n\) prompt positions must lie in \[7, 10\)"):
        state.seed(q, rows, torch.tensor([10]), first_position=7)  # needs positions 2 … 9
    ok = LayerState.empty(1, 2, 4, 3).seed(q, rows, torch.tensor([10]), first_position=7)  # W = 3: positions 7 … 9
    assert torch.equal(ok.ring_q[0, :, 7 % 3], q[0, :, 0]) and torch.equal(ok.ring_q[0, :, 9 % 3], q[0, :, 2])


def test_advance_and_size():
    state = mac_ref.new_state(3, 4, 8, MACConfig(window=16), dtype=torch.bfloat16)
    state.advance(torch.tensor([5, 0, 9], dtype=torch.int32))
    assert state.next_pos.dtype == torch.int64 and state.next_pos.tolist() == [6, 1, 10]
    B, Hq, W, D = 3, 4, 16, 8
    # bf16 queries, float32 rows and LSEs, int32 depths
    assert state.nbytes == B * Hq * W * (D * 2 + D * 4 + 4 + 4)
    assert math.isinf(state.ring_lse.min().item())


@given(window=st.integers(1, 9), length=st.integers(1, 9), starts=st.lists(st.integers(0, 30), min_size=1, max_size=3), seed=st.integers(0, 2**31))
def test_writing_a_block_of_positions_equals_writing_them_one_by_one(window, length, starts, seed):
    """``write`` with positions ``[B, L]`` (lossless MAC's repair: ``L ≤ W`` consecutive rows
    per request, wrapping around the ring) leaves the rings a loop of ``[B]`` writes leaves."""
    length = min(length, window)
    B, Hq, D = len(starts), 2, 4
    g = torch.Generator().manual_seed(seed)
    block, loop = (LayerState.empty(B, Hq, D, window, dtype=torch.float32) for _ in range(2))
    positions = torch.tensor(starts)[:, None] + torch.arange(length)  # [B, L]
    q, o = torch.randn(B, Hq, length, D, generator=g), torch.randn(B, Hq, length, D, generator=g)
    lse, depth = torch.randn(B, Hq, length, generator=g), torch.randint(0, 5, (B, Hq, length), generator=g)
    block.write(positions, q, Summary(o, lse), depth)
    for j in range(length):
        loop.write(positions[:, j], q[:, :, j], Summary(o[:, :, j], lse[:, :, j]), depth[:, :, j])
    for name in ("ring_q", "ring_o", "ring_lse", "ring_depth"):
        assert torch.equal(getattr(block, name), getattr(loop, name)), name


def test_stacked_layers_are_views_of_one_state():
    """``LayerState.stacked``: the layers' values are kept, a write through the stacked state
    (request ``i·B + b``) is layer ``i``'s request ``b``, and stacking again moves nothing."""
    g = torch.Generator().manual_seed(0)
    layers = [LayerState.empty(2, 3, 4, 5, dtype=torch.float32) for _ in range(3)]
    for state in layers:
        state.ring_q.normal_(generator=g)
        state.ring_lse.normal_(generator=g)
    before = [(s.ring_q.clone(), s.ring_lse.clone()) for s in layers]
    rings = LayerState.stacked(layers)
    assert all(torch.equal(s.ring_q, q) and torch.equal(s.ring_lse, lse) for s, (q, lse) in zip(layers, before))
    positions = torch.tensor([[7, 8]] * 6)  # [L·B, 2]
    q = torch.randn(6, 3, 2, 4, generator=g)
    rings.write(positions, q, Summary(torch.randn(6, 3, 2, 4, generator=g), torch.randn(6, 3, 2, generator=g)), torch.ones(6, 3, 2, dtype=torch.int32))
    for i, state in enumerate(layers):
        got = state.read(positions[:2])
        assert torch.equal(got[0], q[2 * i : 2 * i + 2]) and int(got[2].min()) == 1, i
    again = LayerState.stacked(layers)
    assert again.ring_q.data_ptr() == rings.ring_q.data_ptr() and layers[2].ring_q.data_ptr() == rings.ring_q[4].data_ptr()
