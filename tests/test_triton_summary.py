"""mac_triton ⊕ / ⊖ against mac_ref on identical inputs (docs/spec.md#spec-merge, #spec-remove), empty inputs included."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mac_ref
import mac_triton
from mac_ref import Summary
from tolerances import assert_close, removal_atol
from triton_cases import DEVICE

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_summaries(shape, head_dim, dtype, seed, empty_share=0.25):
    """``Summary(o [*shape, D], lse [*shape])`` with a share of empty entries ``(0, −inf)``."""
    gen = torch.Generator().manual_seed(seed)
    o = torch.randn(*shape, head_dim, generator=gen)
    lse = 10.0 * torch.randn(*shape, generator=gen)
    empty = torch.rand(*shape, generator=gen) < empty_share
    o = o.masked_fill(empty[..., None], 0.0)
    lse = lse.masked_fill(empty, -math.inf)
    return Summary(o.to(dtype).to(DEVICE), lse.to(DEVICE))


@given(
    rows=st.integers(0, 40),
    head_dim=st.sampled_from([1, 16, 24, 64]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31),
)
def test_merge_matches_reference(rows, head_dim, dtype, seed):
    a = random_summaries((rows,), head_dim, dtype, seed)
    b = random_summaries((rows,), head_dim, dtype, seed + 1)
    got = mac_triton.merge(a, b)
    want = mac_ref.merge(a, b)
    assert_close(got.o, want.o, "exact", torch.float32)
    assert_close(got.lse, want.lse, "triton_lse", dtype)


def test_merge_of_two_empty_summaries_is_empty_and_nan_free():
    empty = mac_ref.empty_summary((3, 2), 16, device=DEVICE)
    got = mac_triton.merge(empty, empty)
    assert torch.equal(got.o, torch.zeros_like(got.o))
    assert torch.isneginf(got.lse).all()


@given(
    rows=st.integers(0, 6),
    parts=st.integers(0, 40),
    head_dim=st.sampled_from([16, 64]),
    dtype=st.sampled_from(DTYPES),
    empty_share=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**31),
)
@settings(max_examples=15)
def test_merge_all_matches_reference(rows, parts, head_dim, dtype, empty_share, seed):
    s = random_summaries((rows, parts), head_dim, dtype, seed, empty_share)
    got = mac_triton.merge_all(s.o, s.lse)
    want = mac_ref.merge_all(s.o, s.lse)
    assert got.o.shape == want.o.shape and got.lse.shape == want.lse.shape
    assert_close(got.o, want.o, "exact", torch.float32)
    assert_close(got.lse, want.lse, "triton_lse", dtype)


@given(
    rows=st.integers(1, 40),
    share=st.sampled_from([0.0, 0.3, 0.9, 0.999, 1.0]),
    seed=st.integers(0, 2**31),
)
def test_remove_matches_reference(rows, share, seed):
    """(a ⊕ b) ⊖ b against mac_ref, with b holding a share of the mass up to all of it."""
    a = random_summaries((rows,), 32, torch.float32, seed, empty_share=0.1)
    b = random_summaries((rows,), 32, torch.float32, seed + 1, empty_share=0.1)
    # place b's mass at the chosen share of the total where both are non-empty
    shift = torch.where(torch.isfinite(a.lse), a.lse, 0.0) + math.log(share / (1 - share)) if 0 < share < 1 else a.lse
    lse_b = torch.where(torch.isfinite(b.lse) & torch.isfinite(a.lse), shift, b.lse) if 0 < share < 1 else b.lse
    b = Summary(b.o, lse_b)
    total = mac_ref.merge(a, b)
    got, got_ill = mac_triton.remove(total, b)
    want, want_ill = mac_ref.remove(total, b)
    # the flag is a threshold on a rounded quantity: entries at the threshold may differ
    flagged_differently = got_ill != want_ill
    assert flagged_differently.float().mean() <= 0.05, f"{int(flagged_differently.sum())} flags differ"
    keep = ~(got_ill | want_ill)
    assert_close(got.lse[keep], want.lse[keep], "triton_lse", torch.float32)
    assert not torch.isnan(got.o).any()
    assert torch.isneginf(got.lse[got_ill]).all()
    # each side is within removal_atol of the truth, so they are within twice that of each other
    err = (got.o[keep] - want.o[keep]).abs().amax(-1).double()
    part_share = torch.exp(b.lse[keep].double() - total.lse[keep].double()).nan_to_num(0.0).clamp(max=1.0)
    scale = max(a.o.abs().max().item(), b.o.abs().max().item())
    bound = 2 * removal_atol(part_share, total.lse[keep], torch.float32, scale)
    assert (err <= bound).all(), f"max error {err.max():.3e} over its bound"


def test_float64_is_refused_with_a_clear_error():
    s = random_summaries((2,), 8, torch.float64, 0)
    with pytest.raises(TypeError, match="a.o must be float16, bfloat16 or float32"):
        mac_triton.merge(s, s)
