"""Stage 1: attention summaries, ``attend``, ⊕ ``merge``, ``merge_all`` and ⊖ ``remove`` (docs/spec.md#spec-summaries,
#spec-merge, #spec-remove).

Hypothesis draws the structure (lengths, head counts, the removed share) and a seed; a
seeded ``torch.Generator`` draws the values. The reference is direct float64 arithmetic.
"""

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from mac_ref import (
    Summary,
    attend,
    causal_attention,
    empty_summary,
    full_attention,
    merge,
    merge_all,
    remove,
    removal_epsilon,
)
from tolerances import assert_close, removal_atol

f64 = torch.float64


def random_qkv(seed, batch=1, q_heads=2, kv_heads=1, length=16, head_dim=8, dtype=f64):
    """``q [B, Hq, D]``, ``k, v [B, Hkv, T, D]`` of unit-variance entries."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, head_dim, generator=gen, dtype=f64)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=gen, dtype=f64)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=gen, dtype=f64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def dense_summary(q, k, v, start, end, scale=None, softcap=None):
    """Float64 ``A(q, [start[b,h], end[b,h]))`` by direct loops over (request, head); with
    ``softcap = c`` the scores are ``c·tanh(scale·q·k / c)``."""
    B, Hq, D = q.shape
    group = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    o = torch.zeros(B, Hq, D, dtype=f64)
    lse = torch.full((B, Hq), -math.inf, dtype=f64)
    for b in range(B):
        for h in range(Hq):
            a, e = int(start[b, h]), int(end[b, h])
            if e <= a:
                continue
            scores = scale * (k[b, h // group, a:e].double() @ q[b, h].double())  # [e - a]
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            lse[b, h] = torch.logsumexp(scores, 0)
            o[b, h] = torch.softmax(scores, 0) @ v[b, h // group, a:e].double()
    return o, lse


def random_summary(seed, shape=(3, 4), head_dim=8, lse_spread=5.0, dtype=f64) -> Summary:
    gen = torch.Generator().manual_seed(seed)
    o = torch.randn(*shape, head_dim, generator=gen, dtype=f64)
    lse = lse_spread * torch.randn(shape, generator=gen, dtype=f64)
    return Summary(o.to(dtype), lse.to(dtype))


def assert_summary_close(actual: Summary, expected, operation="exact", dtype=None, msg=""):
    assert_close(actual.o, expected[0], operation, dtype, msg=f"{msg} o")
    assert_close(actual.lse, expected[1], operation, dtype, msg=f"{msg} lse")


# ---------------------------------------------------------------- attend


@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2, 4]),
    length=st.integers(1, 24),
    head_dim=st.sampled_from([2, 8, 16]),
    seed=st.integers(0, 2**31),
)
def test_attend_lse_is_logsumexp_of_scores(batch, kv_heads, group, length, head_dim, seed):
    q, k, v = random_qkv(seed, batch, kv_heads * group, kv_heads, length, head_dim)
    gen = torch.Generator().manual_seed(seed + 1)
    # per-head ranges, some empty and some reversed (also empty)
    start = torch.randint(0, length + 1, (batch, kv_heads * group), generator=gen)
    end = torch.randint(0, length + 1, (batch, kv_heads * group), generator=gen)
    got = attend(q, k, v, start, end)
    assert got.o.dtype == f64 and got.lse.dtype == f64
    assert_summary_close(got, dense_summary(q, k, v, start, end))


def test_attend_lse_is_natural_log_with_custom_scale():
    q, k, v = random_qkv(0, length=12)
    scale = 0.37
    got = attend(q, k, v, 0, 12, scale)
    scores = scale * torch.einsum("bhd,bhtd->bht", q, k.expand(-1, 2, -1, -1))
    assert_close(got.lse, torch.logsumexp(scores, -1), "exact")
    assert_close(got.o, torch.softmax(scores, -1) @ v[:, 0], "exact")


@pytest.mark.parametrize("start, end", [(0, 0), (5, 5), (7, 3), (16, 16)])
def test_attend_empty_range_is_the_empty_summary(start, end):
    q, k, v = random_qkv(1, length=16)
    got = attend(q, k, v, start, end)
    assert torch.equal(got.o, torch.zeros_like(got.o))
    assert torch.isneginf(got.lse).all()


def test_attend_clips_ranges_to_the_cache():
    q, k, v = random_qkv(2, length=10)
    assert_summary_close(attend(q, k, v, -3, 25), attend(q, k, v, 0, 10))


@given(length=st.integers(1, 20), seed=st.integers(0, 2**31))
def test_attend_never_reads_outside_its_ranges(poison, length, seed):
    """NaN in every key and value outside ``[a, b)`` of a request leaves the summary unchanged."""
    q, k, v = random_qkv(seed, batch=2, q_heads=4, kv_heads=2, length=length + 6)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(0, length + 1, (2,), generator=gen)
    b = a + torch.randint(0, length + 1 - int(a.max()), (2,), generator=gen)
    clean = attend(q, k, v, a[:, None], b[:, None])
    k_bad, v_bad = poison.beyond(k, b), poison.beyond(v, b)
    k_bad[0, :, : int(a[0])] = math.nan
    v_bad[1, :, : int(a[1])] = math.nan
    k_bad[1, :, : int(a[1])] = -math.inf
    got = attend(q, k_bad, v_bad, a[:, None], b[:, None])
    assert torch.equal(got.o, clean.o) and torch.equal(got.lse, clean.lse)


def test_attend_many_queries_per_head_is_causal_attention(poison):
    """``q [B, Hq, L, D]`` with per-query ends ``t + 1`` is causal attention (the prefill path)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 9, 8, generator=gen, dtype=f64)
    k = torch.randn(2, 2, 12, 8, generator=gen, dtype=f64)
    v = torch.randn(2, 2, 12, 8, generator=gen, dtype=f64)
    ends = torch.arange(1, 10)
    got = attend(q, poison.beyond(k, [9, 9]), poison.beyond(v, [9, 9]), 0, ends)
    o_ref, lse_ref = causal_attention(q, k[:, :, :9], v[:, :, :9])
    assert_summary_close(got, (o_ref, lse_ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, f64])
def test_attend_dtypes(dtype):
    """Low-precision inputs compute in float32 (LSE float32); float64 stays float64 and exact."""
    q, k, v = random_qkv(4, batch=2, q_heads=4, kv_heads=2, length=32, head_dim=16, dtype=dtype)
    got = attend(q, k, v, 0, 32)
    compute = f64 if dtype == f64 else torch.float32
    assert got.o.dtype == compute and got.lse.dtype == compute
    # the oracle sees the same rounded inputs: what is left is the compute error
    o_ref, lse_ref = full_attention(q, k, v, [32, 32])
    assert_summary_close(got, (o_ref, lse_ref), dtype=compute)
    # against the unrounded float64 inputs, the input rounding band of the dtype holds
    o_64, lse_64 = full_attention(*random_qkv(4, 2, 4, 2, 32, 16), [32, 32])
    assert_close(got.o, o_64, "exact", dtype)


def test_attend_very_negative_finite_scores():
    """Scores near −1e4 stay finite and exact: no finite sentinel swallows them."""
    q, k, v = random_qkv(5, length=12)
    k = -k.abs() * q[:, :1, None].sign()  # every product q·k negative for head 0
    scale = 2000.0
    got = attend(q, k, v, 0, 12, scale)
    expected = dense_summary(q, k, v, torch.zeros(1, 2, dtype=torch.long), torch.full((1, 2), 12), scale)
    assert got.lse[0, 0] < -1000 and torch.isfinite(got.lse).all()
    assert_summary_close(got, expected)
    halves = merge(attend(q, k, v, 0, 5, scale), attend(q, k, v, 5, 12, scale))
    assert_summary_close(halves, expected)


# scores of std ``gain`` against caps below, near and above them
softcaps = st.sampled_from([0.5, 2.0, 50.0])


@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    length=st.integers(1, 24),
    softcap=softcaps,
    gain=st.sampled_from([1.0, 30.0]),
    seed=st.integers(0, 2**31),
)
@example(batch=1, kv_heads=1, group=1, length=1, softcap=0.5, gain=30.0, seed=0)
def test_attend_softcap_is_the_oracle_of_capped_scores(batch, kv_heads, group, length, softcap, gain, seed):
    """Scores ``c·tanh(scale·q·k / c)`` over per-head ranges, empty and reversed ones included:
    the float64 oracle, ``(0, −inf)`` where empty, and ``ℓ ≤ c + log n`` (every score is below ``c``)."""
    q, k, v = random_qkv(seed, batch, kv_heads * group, kv_heads, length)
    scale = gain / math.sqrt(q.shape[-1])
    gen = torch.Generator().manual_seed(seed + 1)
    start = torch.randint(0, length + 1, (batch, kv_heads * group), generator=gen)
    end = torch.randint(0, length + 1, (batch, kv_heads * group), generator=gen)
    start[0, 0], end[0, 0] = length, length  # at least one empty range
    got = attend(q, k, v, start, end, scale, softcap)
    assert_summary_close(got, dense_summary(q, k, v, start, end, scale, softcap))
    empty = end <= start
    assert torch.isneginf(got.lse[empty]).all() and (got.o[empty] == 0).all()
    assert (got.lse[~empty] <= softcap + torch.log((end - start)[~empty].double())).all()


@given(split=st.integers(0, 20), softcap=softcaps, seed=st.integers(0, 2**31))
def test_capped_summaries_compose_with_merge_and_remove(split, softcap, seed):
    """``A_c([0, m)) ⊕ A_c([m, n)) = A_c([0, n))`` and ``A_c([0, n)) ⊖ A_c([m, n)) ≈ A_c([0, m))``
    for capped summaries ``A_c``: ⊕ and ⊖ are unchanged, a summary being defined by its scores."""
    q, k, v = random_qkv(seed, batch=1, q_heads=4, kv_heads=2, length=20)
    scale = 30.0 / math.sqrt(q.shape[-1])  # scores of std 30: the cap bites
    head, tail = attend(q, k, v, 0, split, scale, softcap), attend(q, k, v, split, 20, scale, softcap)
    union = dense_summary(q, k, v, torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), 20), scale, softcap)
    assert_summary_close(merge(head, tail), union, msg="⊕")
    assert (attend(q, k, v, 0, 20, scale).lse - union[1]).abs().max() > 1.0, "the cap should change the summary"
    total = attend(q, k, v, 0, 20, scale, softcap)
    got, flagged = remove(total, tail)
    removed = torch.exp(tail.lse - total.lse)
    atol = removal_atol(removed, total.lse, f64, v.abs().max().item())
    assert ((got.o - head.o).abs().amax(-1)[~flagged] <= atol[~flagged]).all()
    assert ((got.lse - head.lse).abs()[~flagged] <= atol[~flagged]).all()


# ---------------------------------------------------------------- merge


@given(seed=st.integers(0, 2**31), spread=st.sampled_from([0.0, 1.0, 30.0]))
def test_merge_is_commutative_and_associative(seed, spread):
    a, b, c = (random_summary(seed + i, lse_spread=spread) for i in range(3))
    ab, ba = merge(a, b), merge(b, a)
    assert torch.equal(ab.o, ba.o) and torch.equal(ab.lse, ba.lse)
    assert_summary_close(merge(ab, c), merge(a, merge(b, c)))


def test_merge_identity_and_empty():
    a = random_summary(0)
    # one empty entry inside a, to check mixed rows too
    a.lse[0, 0] = -math.inf
    a.o[0, 0] = 0.0
    empty = empty_summary((3, 4), 8, dtype=f64)
    for merged in (merge(a, empty), merge(empty, a)):
        assert torch.equal(merged.o, a.o) and torch.equal(merged.lse, a.lse)
    both = merge(empty, empty)
    assert not torch.isnan(both.o).any() and not torch.isnan(both.lse).any()
    assert torch.equal(both.o, empty.o) and torch.equal(both.lse, empty.lse)


def test_merge_with_very_negative_lse_is_shift_invariant():
    a, b = random_summary(1), random_summary(2)
    shift = 1e4
    low = merge(Summary(a.o, a.lse - shift), Summary(b.o, b.lse - shift))
    ref = merge(a, b)
    assert_summary_close(low, (ref.o, ref.lse - shift))


segment_lengths = st.lists(st.integers(0, 5), min_size=0, max_size=8)


@given(lengths=segment_lengths, seed=st.integers(0, 2**31))
@example(lengths=[], seed=0)
@example(lengths=[0, 0], seed=0)
@example(lengths=[1], seed=0)
@example(lengths=[0, 1, 0, 3], seed=0)
def test_any_split_into_segments_merges_back_to_the_oracle(lengths, seed):
    """Split ``[0, T)`` into segments (lengths 0 and 1 included): fold ⊕ and ``merge_all`` give A."""
    T = sum(lengths)
    q, k, v = random_qkv(seed, batch=1, q_heads=4, kv_heads=2, length=max(T, 1))
    bounds = torch.tensor([0] + lengths).cumsum(0).tolist()
    parts = [attend(q, k, v, a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    folded = empty_summary((1, 4), 8, dtype=f64)
    for part in parts:
        folded = merge(folded, part)
    expected = full_attention(q, k, v, [T])
    assert_summary_close(folded, expected, msg="fold")
    if parts:
        stacked = merge_all(torch.stack([p.o for p in parts], -2), torch.stack([p.lse for p in parts], -1))
        assert_summary_close(stacked, expected, msg="merge_all")


@given(parts=st.integers(1, 6), seed=st.integers(0, 2**31), empties=st.integers(0, 6))
def test_merge_all_equals_folding_merge(parts, seed, empties):
    stack = random_summary(seed, shape=(2, 3, parts), lse_spread=10.0)
    stack.lse[..., : min(empties, parts)] = -math.inf
    folded = empty_summary((2, 3), 8, dtype=f64)
    for i in range(parts):
        folded = merge(folded, Summary(stack.o[..., i, :], stack.lse[..., i]))
    assert_summary_close(merge_all(*stack), folded)


def test_merge_all_of_nothing_is_empty():
    for parts in (0, 3):
        o = torch.ones(2, parts, 4, dtype=f64)
        lse = torch.full((2, parts), -math.inf, dtype=f64)
        got = merge_all(o, lse)
        assert torch.equal(got.o, torch.zeros(2, 4, dtype=f64)) and torch.isneginf(got.lse).all()


# ---------------------------------------------------------------- remove


@given(
    logit=st.floats(-30, 45),
    lse_spread=st.sampled_from([0.0, 3.0, 30.0]),
    dtype=st.sampled_from([f64, torch.float32]),
    seed=st.integers(0, 2**31),
)
@example(logit=0.0, lse_spread=0.0, dtype=f64, seed=0)
@example(logit=36.0, lse_spread=3.0, dtype=f64, seed=0)  # near-total: 1 − t ≈ 2e-16
@example(logit=16.0, lse_spread=3.0, dtype=torch.float32, seed=0)  # near-total in float32
def test_remove_inverts_merge_within_the_conditioning(logit, lse_spread, dtype, seed):
    """``(a ⊕ b) ⊖ b ≈ a`` with an error bound that grows like ``1/(1 − t)``, ``t`` = b's share."""
    a = random_summary(seed, lse_spread=lse_spread, dtype=dtype)
    b = Summary(random_summary(seed + 1, dtype=dtype).o, a.lse + logit)
    total = merge(a, b)
    got, flagged = remove(total, b)
    share = -torch.expm1(b.lse.double() - total.lse.double())  # 1 − t, from the exact definition
    eps = removal_epsilon(dtype)
    resolved = share > 2 * eps
    unresolved = share < eps / 2
    assert not flagged[resolved].any() and flagged[unresolved].all()
    # flagged entries come back empty, never NaN
    assert torch.isneginf(got.lse[flagged]).all() and (got.o[flagged] == 0).all()
    keep = ~flagged
    scale = max(a.o.abs().max().item(), b.o.abs().max().item())
    atol = removal_atol(1.0 - share, total.lse, dtype, scale)  # [3, 4]
    err = (got.o.double() - a.o.double()).abs().amax(-1)
    assert (err[keep] <= atol[keep]).all(), f"max err/bound {(err / atol)[keep].max():.2f}"
    lse_err = (got.lse.double() - a.lse.double()).abs()
    assert (lse_err[keep] <= atol[keep]).all()


@given(split=st.integers(0, 20), seed=st.integers(0, 2**31))
def test_remove_from_real_attention(split, seed):
    """``A([0, n)) ⊖ A([m, n)) ≈ A([0, m))`` for attention summaries (the ``subtract`` row rule)."""
    q, k, v = random_qkv(seed, batch=1, q_heads=4, kv_heads=2, length=20)
    total = attend(q, k, v, 0, 20)
    tail = attend(q, k, v, split, 20)
    got, flagged = remove(total, tail)
    expected = attend(q, k, v, 0, split)
    removed = torch.exp(tail.lse - total.lse)
    well_conditioned = 1.0 - removed > 2 * removal_epsilon(f64)
    assert not flagged[well_conditioned].any()
    atol = removal_atol(removed, total.lse, f64, v.abs().max().item())
    err = (got.o - expected.o).abs().amax(-1)
    assert (err[~flagged] <= atol[~flagged]).all()
    if split == 0:  # the part is everything: empty and flagged
        assert flagged.all() and torch.isneginf(got.lse).all()


def test_remove_empty_cases():
    a = random_summary(0)
    empty = empty_summary((3, 4), 8, dtype=f64)
    got, flagged = remove(a, empty)  # nothing removed: total unchanged
    assert torch.equal(got.o, a.o) and torch.equal(got.lse, a.lse) and not flagged.any()
    got, flagged = remove(empty, empty)  # empty stays empty, no NaN, not flagged
    assert torch.equal(got.o, empty.o) and torch.isneginf(got.lse).all() and not flagged.any()
    got, flagged = remove(a, a)  # everything removed
    assert flagged.all() and torch.isneginf(got.lse).all() and not torch.isnan(got.o).any()
    got, flagged = remove(empty, a)  # a part cannot exceed an empty total
    assert flagged.all() and torch.isneginf(got.lse).all() and not torch.isnan(got.o).any()
    bigger = Summary(a.o, a.lse + 1e-3)  # δ > 0: rounding beyond the total
    got, flagged = remove(a, bigger)
    assert flagged.all() and torch.isneginf(got.lse).all()


def test_remove_with_very_negative_lse():
    """LSEs near −1e4: ⊖ still recovers ``a`` within the bound, which grows with ``|ℓ|``."""
    a, b = random_summary(3), random_summary(4)
    shift = 1e4
    a, b = Summary(a.o, a.lse - shift), Summary(b.o, b.lse - shift)
    total = merge(a, b)
    got, flagged = remove(total, b)
    assert not flagged.any()
    removed = torch.exp(b.lse - total.lse)
    atol = removal_atol(removed, total.lse, f64, max(a.o.abs().max().item(), b.o.abs().max().item()))
    assert ((got.o - a.o).abs().amax(-1) <= atol).all()
    assert ((got.lse - a.lse).abs() <= atol).all()
