"""mac_triton against mac_ref on a CUDA GPU at realistic shapes (marker ``gpu``).

Hq = 32 with GQA 4 and 8, head dims 128 and 64, rings of 1024, contexts of thousands of
keys, bf16 / fp16 / fp32. Both sides run on the GPU with the same inputs; mac_ref computes
in float32 (TF32 off).
"""

import pytest
import torch

import mac_ref
import mac_triton
from mac_ref import MACConfig, MassRule
from tolerances import assert_close
from triton_cases import assert_states_close, prefilled_step, random_decode_inputs, stream_inputs

pytestmark = pytest.mark.gpu

CASES = [
    (torch.bfloat16, 32, 8, 128, MACConfig(window=1024, band=256, tau=0.45)),
    (torch.float16, 32, 4, 64, MACConfig(window=512, band=128, tau=0.45, sinks=4, max_chain=4)),
    (torch.float32, 16, 16, 128, MACConfig(window=1024, band=256, tau=0.45, row_update="subtract")),
]


@pytest.mark.parametrize("dtype, q_heads, kv_heads, head_dim, config", CASES)
def test_decode_stream_matches_reference_on_gpu(dtype, q_heads, kv_heads, head_dim, config):
    """Prefill of ~3K tokens (ragged), then 48 decode steps: decisions equal, outputs, LSEs,
    rows and rings within the bands."""
    torch.backends.cuda.matmul.allow_tf32 = False
    q, k, v = stream_inputs(3, q_heads, kv_heads, 3200, head_dim, dtype, seed=7, reuse=0.7, max_lag=200)
    prefill = torch.tensor([3000, 3152, 2900], device=q.device)
    want = mac_ref.run_stream(q, k, v, prefill, config)
    got = mac_ref.run_stream(q, k, v, prefill, config, step_fn=mac_triton.decode_step)
    assert 0.2 < want.stats.hit_rate < 0.95
    for name in ("hit", "matched_pos", "keys_read", "context", "ill_conditioned", "chain_depth"):
        assert torch.equal(getattr(got.stats, name), getattr(want.stats, name)), f"stats.{name} differ"
    decoded = ~torch.isnan(want.lse)
    assert_close(got.out[decoded], want.out[decoded], "triton", dtype, msg="out")
    assert_close(got.lse[decoded], want.lse[decoded], "triton_lse", dtype, msg="lse")
    assert_states_close(got.state, want.state, dtype, config)


@pytest.mark.parametrize("dtype, head_dim", [(torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 128)])
@pytest.mark.parametrize("kv_heads", [8, 4, 1])
def test_full_decode_matches_oracle_on_gpu(dtype, head_dim, kv_heads):
    """Full attention of a ragged batch up to 20K keys against the float64 oracle."""
    q_post, k, v, pos = random_decode_inputs(4, 32, kv_heads, head_dim, dtype, 3, [20000, 1, 7777, 12345])
    out, lse = mac_triton.full_decode(q_post, k, v, pos)
    want_o, want_lse = mac_ref.full_attention(q_post, k, v, pos + 1)
    assert_close(out, want_o, "exact", dtype)
    assert_close(lse, want_lse, "triton_lse", dtype)


@pytest.mark.parametrize(
    "config",
    [MACConfig(window=1024, band=256, tau=0.45), MACConfig(window=1024, band=256, tau=0.2, rule=MassRule(tau_m=0.6))],
    ids=["paper", "mass-two-phase"],
)
def test_step_is_deterministic_and_graph_capturable(config):
    """Repeated runs are bitwise identical, and a CUDA-graph replay gives the eager result."""
    q_pre, q_post, k, v, state, pos = prefilled_step(4, 32, 8, 128, torch.bfloat16, 5, [2500, 2000, 2300, 1500], config, reuse=0.8)
    scale = config.softmax_scale(128)

    def fresh():
        return state.clone()

    workspace = mac_triton.DecodeWorkspace.new(config, 4, 32, 128, q_pre.device)
    runs = []
    for _ in range(3):
        s = fresh()
        out, lse, stats = mac_triton.mac_step(q_pre, q_post, k, v, s, pos, config, scale, workspace)
        runs.append((out, lse, stats.hit, s.ring_o, s.ring_lse, s.ring_q))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    assert runs[0][2].any() and not runs[0][2].all()

    s = fresh()
    graph = torch.cuda.CUDAGraph()
    mac_triton.mac_step(q_pre, q_post, k, v, fresh(), pos, config, scale, workspace)  # warm up (compile) outside capture
    with torch.cuda.graph(graph):
        out, lse, stats = mac_triton.mac_step(q_pre, q_post, k, v, s, pos, config, scale, workspace)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip((out, lse, stats.hit, s.ring_o, s.ring_lse, s.ring_q), runs[0]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rule", [MassRule(tau_m=0.6), MassRule(tau_m=0.6, per_group=True)], ids=["mass", "mass-per-group"])
def test_mass_rule_steps_match_reference_on_gpu(rule):
    """The two-phase step at realistic shapes, in lockstep with the reference from the same
    state at each of 24 steps: the same candidates and ``j*``; the same decisions but where
    the rule's margin ``d·w² − 2D(1 − τ_m)² s_h²`` is within float32 rounding of 0 (counted);
    outputs, LSEs, ``w`` and the written rows within the bands."""
    torch.backends.cuda.matmul.allow_tf32 = False
    config = MACConfig(window=1024, band=256, tau=0.2, sinks=4, max_chain=2, rule=rule)
    q, k, v = stream_inputs(3, 32, 8, 3224, 128, torch.bfloat16, seed=11, reuse=0.7, max_lag=200)
    prefill = torch.tensor([3000, 3100, 2900], device=q.device)
    _, _, state = mac_ref.prefill(q[:, :, :3100], k, v, prefill, config)
    rows = torch.arange(3, device=q.device)
    rejected = differ = 0
    for _ in range(24):
        pos = state.next_pos.clone()
        q_pre = q[rows, :, pos]
        twin = state.clone()
        want_o, want_lse, want = mac_ref.decode_step(q_pre, k, v, twin, pos, config)
        got_o, got_lse, got = mac_triton.decode_step(q_pre, k, v, state, pos, config)
        assert torch.equal(got.candidate, want.candidate) and torch.equal(got.matched_pos, want.matched_pos)
        assert_close(got.mass_share, want.mass_share, "triton_lse", torch.bfloat16)
        radius = torch.tensor(config.radius_sq_per_head(32, 128, tau=rule.tau_m), device=q.device)
        margin = (want.distance * want.mass_share**2 - radius).abs() / radius
        same = got.hit == want.hit
        assert (same | (margin < 1e-4)).all(), "a decision differs away from the threshold"
        differ += int((~same).sum())
        rejected += int((want.candidate & ~want.hit).sum())
        if same.all():
            assert_close(got_o, want_o, "triton", torch.bfloat16, msg="out")
            assert_close(got_lse, want_lse, "triton_lse", torch.bfloat16, msg="lse")
            assert_states_close(state, twin, torch.bfloat16, config)
        state = twin  # both continue from the reference's rings
    assert rejected > 0 and differ <= 2


@pytest.mark.parametrize("per_group", [False, True], ids=["per-head", "per-group"])
def test_verifying_step_at_many_groups_is_exact_where_rejected_and_deterministic(per_group):
    """The verifying step with 128 KV groups (the wide launch) and ragged contexts
    up to 1200 keys: every rejected head is full attention within the band, and ten runs from the
    same state are bitwise identical."""
    config = MACConfig(window=256, band=32, tau=-0.5, sinks=4, rule=MassRule(tau_m=0.9, per_group=per_group))
    prompts = [1200 - 37 * i for i in range(16)]
    q_pre, q_post, k, v, state, pos = prefilled_step(16, 32, 8, 128, torch.bfloat16, 5, prompts, config, reuse=0.3)
    runs = []
    for _ in range(10):
        s = state.clone()
        out, lse, stats = mac_triton.decode_step(q_pre, k, v, s, pos, config, q_post=q_post)
        runs.append((out, lse, stats.hit, s.ring_o, s.ring_lse))
    rejected = stats.candidate & ~stats.hit
    assert rejected.float().mean() > 0.2 and (stats.hit.any() or per_group)
    want_o, want_lse = mac_ref.full_attention(q_post, k, v, pos + 1)  # on the CPU
    rejected = rejected.cpu()
    assert_close(out.cpu()[rejected], want_o[rejected], "exact", torch.bfloat16)
    assert_close(lse.cpu()[rejected], want_lse[rejected], "triton_lse", torch.bfloat16)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))
