"""Stage 3: the decode step and whole streams, prefill, sinks, batches, GQA and step statistics.

The exactness facts of the spec (docs/spec.md#spec-exactness) are asserted against the float64 causal oracle; the rest
checks that batching, GQA and ragged prompts change nothing but the layout.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mac_ref import (
    MACConfig,
    apply_rope,
    attend,
    causal_attention,
    decode_step,
    merge,
    prefill,
    run_stream,
    synthetic_stream,
)
from tolerances import assert_close

f64 = torch.float64


def oracle(q_pre, k, v, config: MACConfig):
    """Float64 causal attention of the whole stream with the reference's post-RoPE queries."""
    T = q_pre.shape[2]
    return causal_attention(apply_rope(q_pre, torch.arange(T), config.rope_base), k, v)


def computed_positions(prompt_lengths, T):
    """``[B, T]`` bool: positions :func:`run_stream` fills (prefill, then ``S`` steps each)."""
    n = torch.as_tensor(prompt_lengths)
    steps = T - int(n.max())
    pos = torch.arange(T)
    return pos[None, :] < (n + steps)[:, None]


def decoded_index(prompt_lengths, steps):
    """``[S, B]`` positions of each decode step."""
    return torch.as_tensor(prompt_lengths)[None, :] + torch.arange(steps)[:, None]


def assert_stream_is_full_attention(result, q_pre, k, v, prompt_lengths, config, dtype=None):
    o_ref, lse_ref = oracle(q_pre, k, v, config)
    mask = computed_positions(prompt_lengths, q_pre.shape[2])  # [B, T]
    assert torch.isnan(result.out[~mask[:, None].expand(-1, q_pre.shape[1], -1)]).all()
    for b in range(q_pre.shape[0]):
        m = mask[b]
        assert_close(result.out[b][:, m], o_ref[b][:, m], "exact", dtype, msg=f"request {b} out")
        assert_close(result.lse[b][:, m], lse_ref[b][:, m], "exact", dtype, msg=f"request {b} lse")


stream_structure = dict(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([2, 8, 16]),
    prompt=st.lists(st.integers(0, 12), min_size=3, max_size=3),
    steps=st.integers(1, 16),
    window=st.integers(1, 12),
    band=st.integers(0, 12),
    sinks=st.integers(0, 3),
    row_update=st.sampled_from(["split", "subtract"]),
    seed=st.integers(0, 2**31),
)


@given(tau=st.sampled_from([1.0, 1.5]), **stream_structure)
def test_tau_at_least_one_is_full_attention_at_every_step(
    tau, batch, kv_heads, group, head_dim, prompt, steps, window, band, sinks, row_update, seed
):
    prompt = prompt[:batch]
    T = max(prompt) + steps
    q, k, v = synthetic_stream(batch, kv_heads * group, kv_heads, T, head_dim, reuse=0.9, noise=0.0, seed=seed, dtype=f64)
    config = MACConfig(window=window, band=band, tau=tau, sinks=sinks, row_update=row_update)
    result = run_stream(q, k, v, torch.tensor(prompt), config)
    assert not result.stats.hit.any()
    assert_stream_is_full_attention(result, q, k, v, prompt, config)


@given(**stream_structure)
def test_band_covering_the_context_is_full_attention(
    batch, kv_heads, group, head_dim, prompt, steps, window, band, sinks, row_update, seed
):
    """``r ≥ t + 1``: rows are empty, every hit recomputes everything."""
    prompt = prompt[:batch]
    T = max(prompt) + steps
    q, k, v = synthetic_stream(batch, kv_heads * group, kv_heads, T, head_dim, reuse=0.9, noise=0.0, seed=seed, dtype=f64)
    config = MACConfig(window=window, band=T + band, tau=0.45, sinks=sinks, row_update=row_update)
    result = run_stream(q, k, v, torch.tensor(prompt), config)
    assert_stream_is_full_attention(result, q, k, v, prompt, config)


def test_band_covering_the_context_hits_and_stays_exact():
    q, k, v = synthetic_stream(2, 4, 2, 40, 8, reuse=0.9, noise=0.0, seed=1, dtype=f64)
    config = MACConfig(window=16, band=40, tau=0.45, sinks=2)
    result = run_stream(q, k, v, 4, config)
    assert result.stats.hit.float().mean() > 0.5
    assert_stream_is_full_attention(result, q, k, v, [4, 4], config)


@pytest.mark.parametrize("row_update", ["split", "subtract"])
@pytest.mark.parametrize("sinks", [0, 3])
def test_misses_equal_full_attention(row_update, sinks):
    """In a stream of mixed hits and misses, every miss is exactly full attention."""
    q, k, v = synthetic_stream(2, 4, 2, 120, 16, reuse=0.6, noise=0.05, seed=2, dtype=f64)
    config = MACConfig(window=32, band=8, tau=0.45, sinks=sinks, row_update=row_update)
    prompt = [20, 11]
    result = run_stream(q, k, v, torch.tensor(prompt), config)
    o_ref, _ = oracle(q, k, v, config)
    hit = result.stats.hit  # [S, B, Hq]
    assert 0.2 < hit.float().mean() < 0.8
    pos = decoded_index(prompt, hit.shape[0])  # [S, B]
    b = torch.arange(2)[None, :].expand_as(pos)
    out = result.out.permute(0, 2, 1, 3)[b, pos]  # [S, B, Hq, D]
    ref = o_ref.permute(0, 2, 1, 3)[b, pos]
    assert_close(out[~hit], ref[~hit], "exact")
    # hits are approximations: they differ from full attention (the test can fail)
    assert (out[hit] - ref[hit]).abs().max() > 1e-8


@pytest.mark.parametrize("dtype", [f64, torch.float32])
@pytest.mark.parametrize("sinks", [0, 2])
def test_split_and_subtract_rules_agree_over_long_streams(dtype, sinks):
    q, k, v = synthetic_stream(1, 4, 2, 300, 16, reuse=0.8, noise=0.05, max_lag=24, seed=3, dtype=dtype)
    results = {
        rule: run_stream(q, k, v, 8, MACConfig(window=64, band=16, tau=0.45, sinks=sinks, row_update=rule))
        for rule in ("split", "subtract")
    }
    split, subtract = results["split"], results["subtract"]
    assert torch.equal(split.stats.hit, subtract.stats.hit)
    assert torch.equal(split.stats.matched_pos, subtract.stats.matched_pos)
    assert split.stats.hit.float().mean() > 0.5
    assert_close(subtract.out, split.out, "row_rules", dtype, msg="out")
    assert_close(subtract.lse, split.lse, "row_rules", dtype, msg="lse")


@given(
    prompt=st.lists(st.integers(0, 14), min_size=3, max_size=3),
    steps=st.integers(1, 12),
    row_update=st.sampled_from(["split", "subtract"]),
    seed=st.integers(0, 2**31),
)
def test_batch_equals_its_requests_run_one_by_one(prompt, steps, row_update, seed):
    """Ragged prompts in one batch: each request's outputs and stats are those of running it alone."""
    T = max(prompt) + steps
    q, k, v = synthetic_stream(3, 4, 2, T, 8, reuse=0.8, noise=0.05, max_lag=6, seed=seed, dtype=f64)
    config = MACConfig(window=6, band=3, tau=0.45, sinks=1, row_update=row_update)
    batched = run_stream(q, k, v, torch.tensor(prompt), config)
    for b, n in enumerate(prompt):
        end = n + steps
        alone = run_stream(q[b : b + 1, :, :end], k[b : b + 1, :, :end], v[b : b + 1, :, :end], n, config)
        assert_close(batched.out[b, :, :end], alone.out[0], "exact", msg=f"request {b}")
        assert_close(batched.lse[b, :, :end], alone.lse[0], "exact", msg=f"request {b}")
        for name in ("hit", "matched_pos", "keys_read", "context"):
            assert torch.equal(getattr(batched.stats, name)[:, b], getattr(alone.stats, name)[:, 0]), name


@pytest.mark.parametrize("group", [2, 4])
def test_gqa_equals_the_repeated_kv_mha_run(group):
    q, k, v = synthetic_stream(2, 8, 8 // group, 60, 8, reuse=0.8, noise=0.05, seed=4, dtype=f64)
    config = MACConfig(window=16, band=4, tau=0.45, sinks=1)
    gqa = run_stream(q, k, v, torch.tensor([9, 3]), config)
    mha = run_stream(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), torch.tensor([9, 3]), config)
    assert gqa.stats.hit.any() and (~gqa.stats.hit).any()
    for name in ("hit", "matched_pos", "keys_read"):
        assert torch.equal(getattr(gqa.stats, name), getattr(mha.stats, name)), name
    mask = computed_positions([9, 3], 60)[:, None, :, None].expand_as(gqa.out)
    assert_close(gqa.out[mask], mha.out[mask], "exact")


def test_decode_never_reads_the_cache_beyond_the_current_token(poison):
    """Each step sees a cache poisoned with NaN past its position; outputs are unchanged."""
    q, k, v = synthetic_stream(2, 4, 2, 50, 8, reuse=0.8, noise=0.05, seed=5, dtype=f64)
    config = MACConfig(window=8, band=4, tau=0.45, sinks=2, row_update="subtract")
    prompt = torch.tensor([10, 6])
    clean = run_stream(q, k, v, prompt, config)
    _, _, state = prefill(q[:, :, :10], poison.beyond(k, prompt), poison.beyond(v, prompt), prompt, config)
    batch = torch.arange(2)
    for s in range(40):
        pos = state.next_pos.clone()
        out, lse, stats = decode_step(
            q[batch, :, pos], poison.beyond(k, pos + 1), poison.beyond(v, pos + 1), state, pos, config
        )
        assert torch.equal(out, clean.out[batch, :, pos])
        assert torch.equal(stats.hit, clean.stats.hit[s])
    assert clean.stats.hit.any()


def test_sinks_are_recomputed_and_rows_exclude_them():
    """A planted hit with sinks: ``out = A([0,F)) ⊕ R_j* ⊕ A([E(j*), t+1))`` with ``R_j* = A(q_j*, [F, E(j*)))``."""
    F, r, W = 3, 4, 16
    gen = torch.Generator().manual_seed(6)
    T, D = 15, 8
    q = 20.0 * torch.randn(1, 2, T, D, generator=gen, dtype=f64)  # far apart: no accidental hits
    k, v = torch.randn(2, 1, 1, T, D, generator=gen, dtype=f64)
    j, t = 10, 14  # prompt of 14 tokens: row j is seeded exactly; step t copies j's query
    q[:, :, t] = q[:, :, j]
    config = MACConfig(window=W, band=r, tau=0.45, sinks=F)
    result = run_stream(q, k, v, t, config)
    assert result.stats.hit[0].all() and (result.stats.matched_pos[0] == j).all()
    q_post = apply_rope(q, torch.arange(T))
    E = lambda p: max(p + 1 - r, 0)  # noqa: E731
    row = attend(q_post[:, :, j], k, v, F, E(j))
    # the seeded row excludes the sinks
    assert_close(result.state.ring_lse[:, :, j % W], row.lse, "exact")
    assert (row.lse < attend(q_post[:, :, j], k, v, 0, E(j)).lse).all()
    expected = merge(merge(attend(q_post[:, :, t], k, v, 0, F), row), attend(q_post[:, :, t], k, v, E(j), t + 1))
    assert_close(result.out[:, :, t], expected.o, "exact")
    assert_close(result.lse[:, :, t], expected.lse, "exact")
    assert (result.stats.keys_read[0] == F + (t + 1 - E(j))).all()


@given(
    prompt=st.lists(st.integers(0, 30), min_size=2, max_size=2),
    window=st.integers(1, 12),
    band=st.integers(0, 10),
    sinks=st.integers(0, 4),
    seed=st.integers(0, 2**31),
)
def test_prefill_is_causal_attention_and_seeds_exact_rows(prompt, window, band, sinks, seed):
    L = max(prompt)
    q, k, v = synthetic_stream(2, 4, 2, L + 2, 8, seed=seed, dtype=f64)
    config = MACConfig(window=window, band=band, sinks=sinks)
    out, lse, state = prefill(q[:, :, :L], k, v, torch.tensor(prompt), config)
    o_ref, lse_ref = oracle(q[:, :, :L], k[:, :, :L], v[:, :, :L], config)
    q_post = apply_rope(q, torch.arange(L + 2))
    assert state.next_pos.tolist() == prompt
    for b, n in enumerate(prompt):
        assert_close(out[b, :, :n], o_ref[b, :, :n], "exact")
        assert_close(lse[b, :, :n], lse_ref[b, :, :n], "exact")
        assert (out[b, :, n:] == 0).all() and torch.isneginf(lse[b, :, n:]).all()
        for t in range(max(0, n - window), n):
            end = max(t + 1 - band, 0)
            row = attend(q_post[b : b + 1, :, t], k[b : b + 1], v[b : b + 1], min(sinks, end), end)
            assert torch.equal(state.ring_q[b, :, t % window], q[b, :, t])
            assert_close(state.ring_o[b, :, t % window], row.o[0], "exact")
            assert_close(state.ring_lse[b, :, t % window], row.lse[0], "exact")


@pytest.mark.parametrize("sinks", [0, 2])
def test_step_stats_are_consistent(sinks):
    r = 6
    q, k, v = synthetic_stream(2, 4, 2, 90, 8, reuse=0.7, noise=0.05, seed=8, dtype=f64)
    prompt = torch.tensor([12, 5])
    config = MACConfig(window=16, band=r, tau=0.45, sinks=sinks)
    stats = run_stream(q, k, v, prompt, config).stats
    t = decoded_index(prompt, stats.hit.shape[0])[..., None].expand_as(stats.hit)  # [S, B, Hq]
    assert torch.equal(stats.context, t[..., 0] + 1)
    assert stats.hit.any() and (~stats.hit).any()
    assert torch.equal(stats.keys_read[~stats.hit], t[~stats.hit] + 1)
    N = (t + 1 - r).clamp(min=0)
    S = N.clamp(max=sinks)
    band_start = torch.maximum((stats.matched_pos + 1 - r).clamp(min=0), S)
    assert torch.equal(stats.keys_read[stats.hit], (S + t + 1 - band_start)[stats.hit])
    assert (stats.keys_read <= t + 1).all()
    expected_skip = 1.0 - stats.keys_read.sum().item() / (t + 1).sum().item()
    assert stats.skipped_fraction() == pytest.approx(expected_skip, rel=1e-12)
    assert 0 < stats.skipped_fraction() < 1
    assert stats.hit_rate == pytest.approx(stats.hit.double().mean().item())
    assert not stats.ill_conditioned.any()
    assert ((stats.matched_pos >= t - config.window) & (stats.matched_pos < t)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, f64])
def test_dtypes_of_outputs_and_accuracy(dtype):
    """Out in the input dtype, LSE float32 (float64 for float64); full attention within the dtype's band."""
    q, k, v = synthetic_stream(2, 4, 2, 40, 16, reuse=0.8, noise=0.05, seed=9, dtype=dtype)
    config = MACConfig(window=16, band=4, tau=1.0)
    prompt = torch.tensor([8, 8])
    _, _, state = prefill(q[:, :, :8], k, v, prompt, config)
    out, lse, _ = decode_step(q[:, :, 8], k, v, state, prompt, config)
    assert out.dtype == dtype and lse.dtype == (f64 if dtype == f64 else torch.float32)
    assert state.ring_q.dtype == dtype and state.ring_lse.dtype == lse.dtype
    result = run_stream(q, k, v, prompt, config)
    assert result.out.dtype == dtype
    assert_stream_is_full_attention(result, q, k, v, [8, 8], config, dtype=dtype)


def test_explicit_post_rope_queries_are_used():
    """``q_post`` replaces the built-in RoPE: the model's own rotation flows through unchanged."""
    q, k, v = synthetic_stream(1, 2, 1, 30, 8, seed=10, dtype=f64)
    config = MACConfig(window=8, band=4, tau=1.0)
    q_post = apply_rope(q, torch.arange(30), 500000.0)
    result = run_stream(q, k, v, 5, config, q_post=q_post)
    o_ref, _ = causal_attention(q_post, k, v)
    assert_close(result.out, o_ref, "exact")
    default = run_stream(q, k, v, 5, config)
    assert not torch.allclose(default.out[:, :, 5:], result.out[:, :, 5:])


@pytest.mark.parametrize("max_chain", [1, 3])
def test_reuse_chains_are_bounded_by_max_chain(max_chain):
    """``max_chain = K``: no row is more than ``K`` reuse links deep, a hit's depth is its
    row's plus one, a miss resets to 0; a bound longer than any chain changes nothing."""
    q, k, v = synthetic_stream(1, 4, 2, 300, 16, reuse=0.95, noise=0.02, max_lag=4, seed=3, dtype=f64)
    base = MACConfig(window=32, band=8, tau=0.45)
    free = run_stream(q, k, v, 40, base)
    assert free.stats.chain_depth.max() > 3 * max_chain  # without a bound, chains grow long
    bounded = run_stream(q, k, v, 40, MACConfig(window=32, band=8, tau=0.45, max_chain=max_chain))
    s = bounded.stats
    assert 0 < s.chain_depth.max() <= max_chain
    assert torch.equal(s.chain_depth == 0, ~s.hit)
    depth = {}  # (head, position) -> depth of its row; prefill rows are exact
    for step in range(s.hit.shape[0]):
        for h in range(4):
            j = int(s.matched_pos[step, 0, h])
            want = depth.get((h, j), 0) + 1 if s.hit[step, 0, h] else 0
            assert int(s.chain_depth[step, 0, h]) == want
            depth[(h, 40 + step)] = want
    assert s.hit_rate > 0.5  # the bound still leaves most steps hits
    unbounded = run_stream(q, k, v, 40, MACConfig(window=32, band=8, tau=0.45, max_chain=10**6))
    assert torch.equal(unbounded.out, free.out) and torch.equal(unbounded.stats.hit, free.stats.hit)
    # every miss is exact
    exact, _ = oracle(q, k, v, base)
    miss = ~s.hit[:, 0]  # [S, Hq]
    assert_close(bounded.out[0, :, 40:].transpose(0, 1)[miss], exact[0, :, 40:].transpose(0, 1)[miss], "exact")
