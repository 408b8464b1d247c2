"""Stage 2b: the acceptance rules (docs/spec.md#spec-acceptance) in the reference.

The mass rule against the paper's, exactly where they must agree (``w`` forced to 1 and
``τ_m = τ_cap``); rejected candidates are exact; ``w`` is a share of the step's mass; the
group-aware variant costs no group reads and only turns hits into exact misses. The
literal float64 loop (``test_literal_loop.py``) checks the decisions and ``w`` independently.
The strictness of the mass rule's comparison (``τ_m ≥ 1`` accepts nothing, not even an exact
repeat) is held in both backends, mac_ref and mac_triton.
"""

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mac_ref
import mac_triton
from mac_ref import MACConfig, MassRule, PaperRule, run_stream, synthetic_stream
from tolerances import assert_close
from triton_cases import DEVICE

f64 = torch.float64


def stream(seed=0, noise=0.2, T=140, prompt=(100, 92)):
    q, k, v = synthetic_stream(2, 4, 2, T, 16, reuse=0.8, noise=noise, max_lag=12, seed=seed, dtype=f64)
    return q, k, v, torch.tensor(prompt)


def exact_outputs(q, k, v, config):
    T = q.shape[2]
    o, lse = mac_ref.causal_attention(mac_ref.apply_rope(q, torch.arange(T), config.rope_base), k, v)
    return o, lse


def w_of_one(result, *args):
    """``w`` forced to 1 for every candidate."""
    return torch.where(result.hit, 1.0, 0.0).to(f64)


@given(tau=st.sampled_from([0.2, 0.45, 0.6]), sinks=st.sampled_from([0, 3]), max_chain=st.sampled_from([None, 1]), seed=st.integers(0, 2**31))
def test_mass_rule_with_w_one_and_equal_thresholds_is_the_papers_rule(tau, sinks, max_chain, seed):
    """``w = 1`` and ``τ_m = τ_cap``: the same decisions, outputs and rows, step for step."""
    q, k, v, prompt = stream(seed % 1000)
    base = MACConfig(window=24, band=8, tau=tau, sinks=sinks, max_chain=max_chain)
    paper = run_stream(q, k, v, prompt, base)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mac_ref.accept, "mass_share", w_of_one)
        mass = run_stream(q, k, v, prompt, dataclasses.replace(base, rule=MassRule(tau_m=tau)))
    for name in ("hit", "matched_pos", "distance", "keys_read", "chain_depth", "candidate"):
        assert torch.equal(getattr(mass.stats, name), getattr(paper.stats, name)), name
    assert torch.equal(mass.out.nan_to_num(), paper.out.nan_to_num()) and torch.equal(mass.state.ring_o, paper.state.ring_o)


@pytest.mark.parametrize("per_group", [False, True])
def test_rejected_candidates_are_full_attention(per_group):
    """A loose cap, a strict τ_m: many candidates are rejected, and each is exactly full attention."""
    q, k, v, prompt = stream(1)
    config = MACConfig(window=24, band=8, tau=0.0, sinks=2, max_chain=2, rule=MassRule(tau_m=0.7, per_group=per_group))
    result = run_stream(q, k, v, prompt, config)
    stats = result.stats
    rejected = stats.candidate & ~stats.hit  # [S, B, Hq]
    assert rejected.float().mean() > 0.1 and stats.hit.float().mean() > 0.1
    o_ref, lse_ref = exact_outputs(q, k, v, config)
    pos = prompt[None, :] + torch.arange(stats.hit.shape[0])[:, None]  # [S, B]
    b = torch.arange(2)[None, :].expand_as(pos)
    out = result.out.permute(0, 2, 1, 3)[b, pos]  # [S, B, Hq, D]
    ref = o_ref.permute(0, 2, 1, 3)[b, pos]
    assert_close(out[rejected], ref[rejected], "exact", f64, msg="rejected candidates")
    full = stats.context[..., None].expand_as(stats.keys_read)
    assert torch.equal(stats.keys_read[rejected], full[rejected])  # a rejection reads what a miss reads


def test_tau_m_of_one_never_hits_and_w_is_a_share():
    q, k, v, prompt = stream(2)
    result = run_stream(q, k, v, prompt, MACConfig(window=24, band=8, tau=0.3, rule=MassRule(tau_m=1.0)))
    stats = result.stats
    assert stats.candidate.any() and not stats.hit.any()
    o_ref, _ = exact_outputs(q, k, v, MACConfig())
    decoded = ~torch.isnan(result.lse)
    assert_close(result.out[decoded], o_ref[decoded], "exact", f64)
    w = stats.mass_share
    assert ((w > 0) & (w < 1))[stats.candidate].all() and (w[~stats.candidate] == 0).all()


@pytest.mark.parametrize("per_group", [False, True], ids=["per-head", "per-group"])
@pytest.mark.parametrize("backend", [mac_ref, pytest.param(mac_triton, marks=pytest.mark.interpreter)], ids=["mac_ref", "mac_triton"])
def test_tau_m_of_one_rejects_exact_repeats(backend, per_group):
    """``τ_m = 1`` makes the rule's radius 0, and ``d·w² < 0`` is false even at ``d = 0``: queries
    that repeat earlier ones exactly pass the loose distance test (candidates at distance 0)
    but never hit, in either backend, and every step is full attention. Whole KV groups of
    exact repeats are present, so a ``≤`` in either backend's comparison fails here."""
    q, k, v = (x.to(DEVICE) for x in synthetic_stream(2, 4, 2, 24, 16, reuse=0.8, noise=0.0, max_lag=6, seed=1, dtype=torch.float32))
    prompt = [20, 16]
    config = MACConfig(window=8, band=3, tau=0.0, sinks=1, rule=MassRule(tau_m=1.0, per_group=per_group))
    result = run_stream(q, k, v, prompt, config, step_fn=backend.decode_step)
    stats = result.stats
    exact_repeat = stats.candidate & (stats.distance == 0)  # [S, B, Hq]
    assert exact_repeat.view(*exact_repeat.shape[:2], 2, 2).all(-1).any(), "a whole KV group should repeat exactly"
    assert not stats.hit.any(), f"{int(stats.hit.sum())} hits at τ_m = 1 ({int(exact_repeat.sum())} exact repeats)"
    o_ref, lse_ref = exact_outputs(*(x.cpu().double() for x in (q, k, v)), config)
    decoded = ~torch.isnan(result.lse.cpu())
    assert_close(result.out.cpu()[decoded], o_ref[decoded], "exact", torch.float32, msg="out")
    assert_close(result.lse.cpu()[decoded], lse_ref[decoded], "exact", torch.float32, msg="lse")


def test_mass_share_is_the_rows_share_of_the_steps_mass():
    """``w`` of a step, against its definition computed from whole ranges: on a hit the output's mass
    is the row's plus the fresh keys' (sinks, band, tail)."""
    q, k, v, prompt = stream(3, noise=0.05)
    config = MACConfig(window=24, band=8, tau=0.45, sinks=2)
    _, _, state = mac_ref.prefill(q[:, :, :100], k, v, torch.tensor([100, 100]), config)
    positions = torch.tensor([100, 100])
    q_pre = q[:, :, 100]
    q_post = mac_ref.apply_rope(q_pre, positions[:, None])
    result = mac_ref.find_match(q_pre, state, positions, config)
    spans = mac_ref.step_spans(positions, result, config)
    rest = mac_ref.merge(*mac_ref.edge_summaries(q_post, k, v, spans, config.softmax_scale(16)))
    decision = mac_ref.accept_candidates(config, result, state, q_post, k, v, positions, config.softmax_scale(16), rest)
    row = state.rows(result.matched_pos.clamp(min=0))
    fresh = mac_ref.merge(mac_ref.attend(q_post, k, v, 0, spans.sink_end), mac_ref.attend(q_post, k, v, spans.band_start, spans.tail_end))
    total = torch.logaddexp(row.lse, fresh.lse)
    want = torch.where(result.hit, torch.exp(row.lse - total), 0.0)
    assert result.hit.any()
    assert_close(decision.mass_share, want, "exact", f64)


@pytest.mark.parametrize("rule", [PaperRule(per_group=True), MassRule(tau_m=0.6, per_group=True)], ids=["paper", "mass"])
def test_per_group_decisions_cost_no_group_reads(rule):
    """Each step from the same state both ways: the group-aware variant hits in exactly the
    groups where every head hits per head, reads per group what the per-head variant reads,
    and only turns hits into (exact) misses; it measures ``w`` only in the groups whose heads
    are all candidates (the others miss whole: 0)."""
    q, k, v, _ = stream(4, noise=0.3)
    config = MACConfig(window=24, band=8, tau=0.2, rule=dataclasses.replace(rule, per_group=False))
    _, _, state = mac_ref.prefill(q[:, :, :100], k, v, torch.tensor([100, 100]), config)
    partial_groups = unmeasured = 0
    for t in range(100, 130):
        positions = torch.tensor([t, t])
        other = mac_ref.decode_step(q[:, :, t], k, v, state.clone(), positions, dataclasses.replace(config, rule=rule))[2]
        per_head = mac_ref.decode_step(q[:, :, t], k, v, state, positions, config)[2]
        groups = per_head.hit.view(2, 2, 2)
        assert torch.equal(other.hit, groups.all(-1, keepdim=True).expand(2, 2, 2).reshape(2, 4))
        assert torch.equal(other.keys_read.view(2, 2, 2).amax(-1), per_head.keys_read.view(2, 2, 2).amax(-1))
        partial_groups += int((groups.any(-1) & ~groups.all(-1)).sum())
        whole = per_head.candidate.view(2, 2, 2).all(-1, keepdim=True).expand(2, 2, 2).reshape(2, 4)
        assert torch.equal(other.mass_share, torch.where(whole, per_head.mass_share, 0.0))
        unmeasured += int((per_head.candidate & ~whole).sum())
    assert partial_groups > 3 and unmeasured > 0  # the variant had groups to turn into misses, and candidates it did not measure
