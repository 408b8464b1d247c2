"""Attention-logit soft-capping (``MACConfig.softcap``, Gemma 2's ``attn_logit_softcapping``)
through the stages of both backends (docs/spec.md#spec-conventions).

With a cap ``c`` every score is ``c·tanh(scale·q·k / c)``; summaries, ⊕ and ⊖ are unchanged.
Stage 1 (``attend``, ⊕ and ⊖ of capped summaries against float64) is in ``test_summary.py``;
the rejected configurations in ``test_errors.py``. Here, by stage:

- configuration: a cap shows in ``describe()``;
- amend + complete: mac_triton's one pass equals mac_ref's for the same decisions;
- decode step: at ``τ ≥ 1`` a capped stream (mac_ref) and a capped step, full decode and
  full-step op (mac_triton) are capped full attention; over streams with hits mac_triton
  equals mac_ref, and the custom op equals the eager kernels bit for bit.

Every case checks that its cap changes the result beyond the band it is compared in, so a
backend that ignored the cap would fail. Caches are NaN past each request's position.
"""

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mac_ref
import mac_triton
from mac_ref import MACConfig, MassRule
from mac_triton import decode, ops
from tolerances import assert_close, rel_rms, tolerance
from triton_cases import DEVICE, assert_states_close, assert_summary_close, prefilled_step, stream_inputs

pytestmark = pytest.mark.interpreter

f64 = torch.float64


def assert_cap_matters(capped, uncapped, operation, dtype):
    """Without the cap the result is 10 bands ``(operation, dtype)`` (relative RMS) away from
    the capped one, so a backend that ignored the cap would fail the comparison."""
    err, band = rel_rms(uncapped, capped), tolerance(operation, dtype).rel_rms
    assert err > 10 * band, f"the cap should change the result: relative RMS {err:.1e} <= 10 x {band:.0e}"


# ---------------------------------------------------------------- configuration


def test_describe_mentions_the_cap():
    assert "softcap 50" in MACConfig(softcap=50.0).describe()
    assert "softcap" not in MACConfig().describe()


# ---------------------------------------------------------------- amend + complete


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_amend_complete_with_a_cap_matches_reference(dtype):
    """Same state, hits and spans in: out, C and sinks ⊕ tail of the capped scores, both backends."""
    config = MACConfig(window=16, band=8, tau=0.45, sinks=2, softcap=2.0)
    q_pre, q_post, k, v, state, pos = prefilled_step(2, 4, 2, 32, dtype, 3, [30, 51], config, reuse=0.9)
    result = mac_ref.find_match(q_pre, state, pos, config)
    assert result.hit.any() and not result.hit.all(), "the step should mix hits and misses"
    spans = mac_ref.step_spans(pos, result, config)
    scale = config.softmax_scale(q_pre.shape[-1])
    got = mac_triton.amend_complete(q_post, k, v, state, result, spans, scale, config.softcap)
    want = mac_ref.amend_complete(q_post, k, v, state, result, spans, scale, config.softcap)
    for name in ("out", "cached", "rest"):
        assert_summary_close(getattr(got, name), getattr(want, name), dtype, name)
    uncapped = mac_ref.amend_complete(q_post, k, v, state, result, spans, scale)
    assert_cap_matters(want.out.o, uncapped.out.o, "triton", dtype)


# ---------------------------------------------------------------- decode step


@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    head_dim=st.sampled_from([8, 16]),
    prompt=st.lists(st.integers(0, 10), min_size=2, max_size=2),
    steps=st.integers(1, 8),
    window=st.integers(1, 8),
    band=st.integers(0, 8),
    sinks=st.integers(0, 2),
    row_update=st.sampled_from(["split", "subtract"]),
    softcap=st.sampled_from([2.0, 50.0]),
    seed=st.integers(0, 2**31),
)
def test_tau_one_capped_stream_is_capped_full_attention(
    batch, kv_heads, group, head_dim, prompt, steps, window, band, sinks, row_update, softcap, seed
):
    """mac_ref, no hits: prefill and every step are the float64 causal oracle of capped scores."""
    prompt = prompt[:batch]
    T = max(prompt) + steps
    q, k, v = mac_ref.synthetic_stream(batch, kv_heads * group, kv_heads, T, head_dim, reuse=0.9, seed=seed, dtype=f64)
    # 20x the default scale: scores in the tens, so Gemma's cap of 50 bites too
    config = MACConfig(window=window, band=band, tau=1.0, sinks=sinks, row_update=row_update, softcap=softcap, scale=20 / math.sqrt(head_dim))
    result = mac_ref.run_stream(q, k, v, torch.tensor(prompt), config)
    q_post = mac_ref.apply_rope(q, torch.arange(T), config.rope_base)
    o_ref, lse_ref = mac_ref.causal_attention(q_post, k, v, config.scale, softcap)
    computed = ~torch.isnan(result.lse)  # [B, Hq, T]: the positions run_stream filled, the rest NaN
    assert computed.any()
    assert_close(result.out[computed], o_ref[computed], "exact", f64, msg="out")
    assert_close(result.lse[computed], lse_ref[computed], "exact", f64, msg="lse")
    assert_cap_matters(lse_ref, mac_ref.causal_attention(q_post, k, v, config.scale)[1], "exact", f64)


@pytest.mark.parametrize("softcap, gain", [(2.0, 1.0), (50.0, 8.0)], ids=["cap-2", "gemma-cap-50"])
def test_triton_tau_one_capped_step_is_capped_full_attention(softcap, gain):
    """mac_triton, every head a miss: the step, ``full_decode`` and the full-step op are the
    float64 oracle of capped scores (the op bit for bit ``full_decode``); scores up to
    ``5·gain``."""
    D = 32
    config = MACConfig(window=8, band=4, tau=1.0, softcap=softcap, scale=gain / math.sqrt(D))
    q_pre, q_post, k, v, state, pos = prefilled_step(2, 4, 2, D, torch.float32, 7, [30, 51], config, reuse=1.0)
    want_o, want_lse = mac_ref.full_attention(q_post, k, v, pos + 1, config.scale, softcap)
    out, lse, stats = mac_triton.decode_step(q_pre, k, v, state, pos, config, q_post=q_post)
    assert not stats.hit.any()
    full_o, full_lse = mac_triton.full_decode(q_post, k, v, pos, config.scale, softcap=softcap)
    op_o, op_lse = ops.full_step(q_post, k, v, pos, config.scale, softcap)
    for name, (o, l) in {"step": (out, lse), "full_decode": (full_o, full_lse)}.items():
        assert_close(o, want_o, "exact", torch.float32, msg=f"{name} out")
        assert_close(l, want_lse, "triton_lse", torch.float32, msg=f"{name} lse")
    assert torch.equal(op_o, full_o) and torch.equal(op_lse, full_lse)
    assert_cap_matters(want_o, mac_ref.full_attention(q_post, k, v, pos + 1, config.scale)[0], "exact", torch.float32)


CAPPED_STREAMS = [
    # (dtype, config), a cap of 2 against scores up to ~5 (the default scale): the paper's rule;
    # the two-phase mass rule (phase 2 attends the rejected prefixes) with sinks and subtract
    # rows. (Scores 4x larger make the subtract rows ill-conditioned beyond the triton_lse band,
    # capped or not: 1.4e-5 uncapped, 3.4e-4 with a cap of 50, on bf16.)
    (torch.float32, MACConfig(window=16, band=8, tau=0.45, softcap=2.0)),
    (torch.bfloat16, MACConfig(window=16, band=8, tau=0.0, sinks=2, row_update="subtract", rule=MassRule(tau_m=0.6), softcap=2.0)),
]


@pytest.mark.parametrize("dtype, config", CAPPED_STREAMS, ids=["paper-f32", "mass-bf16"])
def test_capped_stream_with_hits_matches_reference(dtype, config):
    """Prefill, then 5 decode steps of a ragged batch with hits: same decisions, outputs, rows and rings."""
    q, k, v = stream_inputs(2, 4, 2, 47, 32, dtype, seed=3, reuse=0.8)
    prefill = torch.tensor([40, 42], device=DEVICE)
    want = mac_ref.run_stream(q, k, v, prefill, config)
    got = mac_ref.run_stream(q, k, v, prefill, config, step_fn=mac_triton.decode_step)
    assert want.stats.hit.any() and not want.stats.hit.all(), "the stream should mix hits and misses"
    if config.rule.verifies:
        assert (want.stats.candidate & ~want.stats.hit).any(), "the stream should reject candidates"
    for name in ("hit", "matched_pos", "keys_read", "ill_conditioned", "chain_depth", "candidate"):
        assert torch.equal(getattr(got.stats, name), getattr(want.stats, name)), f"stats.{name} differ"
    assert_close(got.stats.mass_share, want.stats.mass_share, "triton_lse", dtype)
    decoded = ~torch.isnan(want.lse)
    assert torch.equal(decoded, ~torch.isnan(got.lse))
    assert_close(got.out[decoded], want.out[decoded], "triton", dtype, msg="out")
    assert_close(got.lse[decoded], want.lse[decoded], "triton_lse", dtype, msg="lse")
    assert_states_close(got.state, want.state, dtype, config)
    uncapped = mac_ref.run_stream(q, k, v, prefill, dataclasses.replace(config, softcap=None))
    assert_cap_matters(want.out[decoded], uncapped.out[decoded], "triton", dtype)


def test_capped_op_equals_the_eager_kernels():
    """``ops.mac_step`` carries the cap through its schema: bit for bit the eager step."""
    config = MACConfig(window=8, band=4, tau=0.6, sinks=2, softcap=2.0)
    B, Hq, D = 2, 4, 16
    q, k, v = stream_inputs(B, Hq, 2, 40, D, torch.float32, seed=0, reuse=0.9)
    pos = torch.tensor([30, 25], device=DEVICE)
    _, _, state = mac_ref.prefill(q, k, v, pos, config)
    eager, through_op = state.clone(), state.clone()
    ws_eager, ws_op = (decode.DecodeWorkspace.new(config, B, Hq, D, DEVICE) for _ in range(2))
    scale = config.softmax_scale(D)
    hits = 0
    for step in range(2):
        q_pre = q[torch.arange(B, device=DEVICE), :, pos + step]  # [B, Hq, D]
        q_post = mac_ref.apply_rope(q_pre, (pos + step)[:, None], config.rope_base)
        want = decode.mac_step(q_pre, q_post, k, v, eager, pos + step, config, scale, ws_eager)
        got = ops.mac_step(q_pre, q_post, k, v, through_op, pos + step, config, scale, ws_op)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        hits += int(want[2].hit.sum())
    assert hits > 0, "the stream should reuse"
    assert torch.equal(through_op.ring_o, eager.ring_o)
