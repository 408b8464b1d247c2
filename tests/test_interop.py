"""Attention states across the FlashInfer boundary (mac_core.interop, docs/summaries.md#flashinfer-states).

- the converters are ``ℓ · log₂ e`` and back, with ``−inf`` (empty) kept;
- ``merge_state`` (both backends) takes FlashInfer's argument order and base-2 LSEs and
  gives the float64 oracle's state of the union of two segments;
- a MAC summary converted with ``to_flashinfer`` merges with a base-2 state of the other
  keys into full attention; fed without conversion it does not (the bug the converters prevent);
- FlashInfer's own ``merge_state`` agrees, where FlashInfer is installed (a CUDA GPU).
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mac_ref
import mac_triton
from mac_core.interop import from_flashinfer, lse_from_base2, lse_to_base2, to_flashinfer
from mac_ref import Summary
from tolerances import assert_close
from triton_cases import DEVICE

BACKENDS = [mac_ref, pytest.param(mac_triton, marks=pytest.mark.interpreter)]


def segments(seed, seq_len=5, heads=4, kv_heads=2, length=40, head_dim=16, split=17):
    """Queries ``[seq_len, H, D]`` (one query per row, as FlashInfer's states) over keys cut at
    ``split``: the two segment summaries and the whole, natural-log, float32."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(seq_len, heads, head_dim, generator=gen).to(DEVICE)
    k = torch.randn(seq_len, kv_heads, length, head_dim, generator=gen).to(DEVICE)
    v = torch.randn(seq_len, kv_heads, length, head_dim, generator=gen).to(DEVICE)
    return mac_ref.attend(q, k, v, 0, split), mac_ref.attend(q, k, v, split, length), mac_ref.attend(q, k, v, 0, length)


@given(lse=st.lists(st.floats(-1e4, 1e4) | st.just(-math.inf), min_size=1, max_size=8))
def test_converters_are_a_change_of_base(lse):
    x = torch.tensor(lse, dtype=torch.float64)
    s = lse_to_base2(x)
    # log₂ Σ e^s = log Σ e^s / ln 2, with −inf (the empty state) kept
    assert torch.equal(torch.isneginf(s), torch.isneginf(x))
    finite = torch.isfinite(x)
    assert torch.allclose(s[finite], x[finite] / math.log(2.0), rtol=1e-15, atol=0)
    assert torch.allclose(lse_from_base2(s)[finite], x[finite], rtol=1e-15, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS, ids=["mac_ref", "mac_triton"])
@pytest.mark.parametrize("seed", [0, 1])
def test_merge_state_is_flashinfers_formula(backend, seed):
    """``S = log₂(2^{s_a} + 2^{s_b})``, ``V = (2^{s_a} v_a + 2^{s_b} v_b) / 2^S``, in float64."""
    gen = torch.Generator().manual_seed(seed)
    v_a, v_b = torch.randn(2, 6, 4, 16, generator=gen).to(DEVICE)
    s_a, s_b = (torch.randn(2, 6, 4, generator=gen) * 20).to(DEVICE)
    s_b[0, 0] = -math.inf  # an empty segment
    V, S = backend.merge_state(v_a, s_a, v_b, s_b)
    sa, sb = s_a.double(), s_b.double()
    S_want = torch.logaddexp2(sa, sb)
    V_want = (torch.exp2(sa - S_want)[..., None] * v_a.double() + torch.exp2(sb - S_want)[..., None] * v_b.double())
    assert S.dtype == torch.float32 and V.dtype == v_a.dtype
    assert_close(S, S_want, "exact", torch.float32)
    assert_close(V, V_want, "exact", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS, ids=["mac_ref", "mac_triton"])
def test_a_mac_summary_merges_with_a_base2_state(backend):
    left, right, whole = segments(seed=3)
    v_r, s_r = to_flashinfer(right)  # as a FlashInfer decode of the right segment returns it
    V, S = backend.merge_state(*to_flashinfer(left), v_r, s_r)
    merged = from_flashinfer(V, S)
    assert_close(merged.o, whole.o, "exact", torch.float32)
    assert_close(merged.lse, whole.lse, "exact", torch.float32)

    # the mix-up the converters exist for: a natural-log LSE passed as base 2
    V_bad, _ = backend.merge_state(left.o, left.lse, v_r, s_r)
    assert (V_bad - whole.o).abs().max() > 1e-2, "a base mix-up should weigh the segments wrongly"


BAD = [
    ("s float64", lambda v, s: mac_ref.merge_state(v, s.double(), v, s), TypeError, "s_a must be float32"),
    ("s bf16", lambda v, s: mac_ref.merge_state(v, s, v, s.bfloat16()), TypeError, "s_b must be float32"),
    ("v 2-D", lambda v, s: mac_ref.merge_state(v[0], s, v, s), ValueError, r"v_a must have 3 dimensions \[seq_len, num_heads, head_dim\]"),
    ("s shape", lambda v, s: mac_ref.merge_state(v, s[:, :2], v, s), ValueError, r"s_a must have shape \[seq_len, num_heads\] = \(3, 4\)"),
    ("segments differ", lambda v, s: mac_ref.merge_state(v, s, v[:2], s[:2]), ValueError, "v_a and v_b must have one shape"),
    ("lse int", lambda v, s: lse_to_base2(s.long()), TypeError, "lse must have a floating dtype"),
    ("summary shapes", lambda v, s: to_flashinfer(Summary(v, s[:, :2])), ValueError, "summary must have o"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=lambda c: c[0])
def test_bad_states_are_refused(case):
    _, call, error, message = case
    v, s = torch.randn(3, 4, 8), torch.randn(3, 4)
    with pytest.raises(error, match=message):
        call(v, s)


@pytest.mark.gpu
def test_flashinfer_merge_state_agrees():
    flashinfer = pytest.importorskip("flashinfer")
    left, right, whole = segments(seed=5, head_dim=64)  # FlashInfer merges head_dim 64, 128, 256
    (v_a, s_a), (v_b, s_b) = to_flashinfer(left, torch.float16), to_flashinfer(right, torch.float16)
    V_ours, S_ours = mac_triton.merge_state(v_a, s_a, v_b, s_b)
    V_theirs, S_theirs = flashinfer.merge_state(v_a, s_a, v_b, s_b)
    assert_close(V_ours, V_theirs.float(), "triton", torch.float16)
    assert_close(S_ours, S_theirs, "triton_lse", torch.float16)
    assert_close(from_flashinfer(V_ours.float(), S_ours).lse, whole.lse, "triton_lse", torch.float16)
