"""The verify stage: full attention of a block of ``L`` queries per request, with each query's exact row.

- ``mac_ref.verify_attention`` against a literal float64 loop over every (request, head,
  query, key), blocks below the band and below the sinks included;
- ``mac_triton.verify_attention`` against the reference on the same inputs, the cache NaN
  past each block (a read beyond the block shows), with and without a soft cap;
- the kernel's batch invariance: a query's row does not depend on the block's length, on
  where in the block it sits or on the other requests (bit for bit at a fixed ``rows``);
- errors that name the argument.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mac_ref
import mac_triton
from mac_ref import MACConfig
from tolerances import assert_close
from triton_cases import DEVICE, assert_summary_close


def block_inputs(B, Hq, Hkv, L, D, positions, dtype, seed, spare=3):
    """``q [B, Hq, L, D]``, ``k, v [B, Hkv, T, D]`` (NaN from each request's ``p_b + L`` on), ``positions [B]``."""
    gen = torch.Generator().manual_seed(seed)
    T = max(positions) + L + spare
    q = torch.randn(B, Hq, L, D, generator=gen)
    k, v = torch.randn(B, Hkv, T, D, generator=gen), torch.randn(B, Hkv, T, D, generator=gen)
    for b, p in enumerate(positions):
        k[b, :, p + L :], v[b, :, p + L :] = math.nan, math.nan
    as_device = lambda x: x.to(dtype).to(DEVICE)  # noqa: E731
    return as_device(q), as_device(k), as_device(v), torch.tensor(positions, dtype=torch.int64, device=DEVICE)


def literal(q, k, v, positions, config: MACConfig):
    """``out`` and ``R_t`` by the definition, one query and one key at a time, in float64."""
    B, Hq, L, D = q.shape
    G = Hq // k.shape[1]
    scale = 1 / math.sqrt(D)
    out = torch.zeros(B, Hq, L, D, dtype=torch.float64)
    row = torch.zeros(B, Hq, L, D, dtype=torch.float64)
    out_lse = torch.full((B, Hq, L), -math.inf, dtype=torch.float64)
    row_lse = torch.full((B, Hq, L), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for i in range(L):
                t = int(positions[b]) + i
                end = max(t + 1 - config.band, 0)
                start = min(config.sinks, end)
                s = [scale * float(q[b, h, i].double() @ k[b, h // G, j].double()) for j in range(t + 1)]
                if config.softcap is not None:
                    s = [config.softcap * math.tanh(x / config.softcap) for x in s]
                for target, lse, keys in ((out, out_lse, range(t + 1)), (row, row_lse, range(start, end))):
                    if not keys:
                        continue
                    top = max(s[j] for j in keys)
                    w = torch.tensor([math.exp(s[j] - top) for j in keys], dtype=torch.float64)
                    target[b, h, i] = (w[:, None] * v[b, h // G, list(keys)].double()).sum(0) / w.sum()
                    lse[b, h, i] = top + math.log(w.sum().item())
    return mac_ref.Summary(out, out_lse), mac_ref.Summary(row, row_lse)


blocks = st.fixed_dictionaries({
    "B": st.integers(1, 3), "Hkv": st.integers(1, 2), "G": st.sampled_from([1, 3, 4]), "L": st.integers(1, 5),
    "band": st.integers(1, 12), "sinks": st.integers(0, 4), "softcap": st.sampled_from([None, 4.0]),
    "positions": st.lists(st.integers(0, 40), min_size=3, max_size=3),
})  # fmt: skip


@given(blocks, st.integers(0, 2**16))
def test_reference_is_the_literal_loop(case, seed):
    B, L = case["B"], case["L"]
    positions = case["positions"][:B]
    config = MACConfig(window=16, band=case["band"], sinks=case["sinks"], softcap=case["softcap"])
    q, k, v, pos = block_inputs(B, case["Hkv"] * case["G"], case["Hkv"], L, 8, positions, torch.float64, seed)
    q, k, v, pos = q.cpu(), k.cpu(), v.cpu(), pos.cpu()
    got = mac_ref.verify_attention(q, k, v, pos, config)
    out, row = literal(q, k, v, pos, config)
    assert_close(got.out.o, out.o, "literal", msg="out o")
    assert_close(got.out.lse, out.lse, "literal", msg="out lse")
    assert_close(got.cached.o, row.o, "literal", msg="row o")
    assert_close(got.cached.lse, row.lse, "literal", msg="row lse")  # −inf where the row is empty


@settings(max_examples=12)
@given(blocks, st.sampled_from([8, 16]), st.integers(0, 2**16))
def test_triton_matches_the_reference(case, D, seed):
    B, L = case["B"], case["L"]
    config = MACConfig(window=16, band=case["band"], sinks=case["sinks"], softcap=case["softcap"])
    q, k, v, pos = block_inputs(B, case["Hkv"] * case["G"], case["Hkv"], L, D, case["positions"][:B], torch.float32, seed)
    ours = mac_triton.verify_attention(q, k, v, pos, config, chunk=32, block_n=16)  # several splits per request
    ref = mac_ref.verify_attention(q, k, v, pos, config)
    for name in ("out", "cached", "rest"):
        assert_summary_close(getattr(ours, name), getattr(ref, name), torch.float32, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu), pytest.param(torch.float16, marks=pytest.mark.gpu)])
def test_triton_matches_the_reference_at_the_models_shape(dtype):
    """SmolLM2's heads (Hq 9, Hkv 3, D 64), a block of 5 at ragged positions past the band, the demo's band and sinks."""
    config = MACConfig(window=64, band=32, sinks=4)
    q, k, v, pos = block_inputs(3, 9, 3, 5, 64, [300, 17, 2], dtype, seed=7)
    ours = mac_triton.verify_attention(q, k, v, pos, config, chunk=128)
    ref = mac_ref.verify_attention(q, k, v, pos, config)
    for name in ("out", "cached", "rest"):
        assert_summary_close(getattr(ours, name), getattr(ref, name), dtype, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_a_rows_result_does_not_depend_on_the_block(dtype):
    """Bit for bit at a fixed ``rows``: query 2 of a block of 4 is query 0 of a block of 1 at
    its position, in a batch of 2 or alone (what lossless MAC's bf16 identity rests on)."""
    config = MACConfig(window=64, band=16, sinks=4)
    q, k, v, pos = block_inputs(2, 9, 3, 4, 64, [200, 77], dtype, seed=3)
    wide = mac_triton.verify_attention(q, k, v, pos, config, rows=64, chunk=64)
    alone = mac_triton.verify_attention(q[1:, :, 2:3], k[1:], v[1:], pos[1:] + 2, config, rows=64, chunk=64)
    for name in ("out", "cached"):
        a, b = getattr(wide, name), getattr(alone, name)
        assert torch.equal(a.o[1:, :, 2:3], b.o), f"{name} o differs"
        assert torch.equal(a.lse[1:, :, 2:3], b.lse), f"{name} lse differs"


def test_errors_name_the_argument():
    config = MACConfig(window=16, band=4)
    q, k, v, pos = block_inputs(2, 4, 2, 3, 16, [5, 9], torch.float32, seed=0)
    paged = mac_ref.to_paged(k.contiguous(), v.contiguous(), pos + 3, 4)
    for verify in (mac_ref.verify_attention, mac_triton.verify_attention):
        with pytest.raises(ValueError, match=r"q_post must have 4 dimensions \[B, Hq, L, D\]"):
            verify(q[:, :, 0], k, v, pos, config)
        with pytest.raises(ValueError, match="positions"):
            verify(q, k, v, pos + k.shape[2] - 3, config)  # the block's last query past the cache
        with pytest.raises(TypeError, match="k_cache must be a dense"):
            verify(q, *paged, pos, config)
        with pytest.raises(TypeError, match="config must be a MACConfig"):
            verify(q, k, v, pos, {"band": 4})
    with pytest.raises(ValueError, match="rows must be a power of two >= 16"):
        mac_triton.verify_attention(q, k, v, pos, config, rows=24)
    with pytest.raises(ValueError, match="chunk must be a positive multiple of block_n=16"):
        mac_triton.verify_attention(q, k, v, pos, config, chunk=40, block_n=16)
    with pytest.raises(ValueError, match="max_keys must be an int"):
        mac_triton.verify_attention(q, k, v, pos, config, max_keys=k.shape[2] + 1)
    with pytest.raises(TypeError, match="float64"):
        mac_triton.verify_attention(q.double(), k.double(), v.double(), pos, config)
