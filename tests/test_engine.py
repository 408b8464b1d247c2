"""``mac_llm.engine.DecodeEngine`` on the CPU at a tiny size (eager: graphs are a GPU matter).

The engine's batched, ragged decode step against the model's own forward pass (one request
at a time, full attention); MAC at τ ≥ 1 against full attention; a short batched MAC run
against the reference backend's tokens; the fallback policy's steps (full attention, MAC's miss step, the
resumption on marked rows). The CUDA-graph replay against the eager step is tested on a GPU
(``tests/test_engine_gpu.py``).
"""

import dataclasses
import gc
import math
import weakref

import pytest
import torch

from mac_core import MACConfig, MassRule
from mac_llm.attention import FullAttention, MACAttention
from mac_llm.decoding import forced_decode, greedy_decode, mac_continuation, prefill
from mac_llm.engine import DecodeEngine, FallbackPolicy
from mac_llm.llama import LAYER_WEIGHTS, LlamaModel, ModelConfig
from tolerances import assert_close

pytestmark = pytest.mark.interpreter
CAPACITY = 64


def tiny_model() -> LlamaModel:
    """A 2-layer Llama with random weights (Hq 4, Hkv 2, D 8), on the CPU."""
    cfg = ModelConfig(n_layers=2, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=50, context_length=128, rope_base=10000.0, norm_eps=1e-5)
    gen = torch.Generator().manual_seed(0)
    shapes = {"attn_norm": (32,), "attn_q": (32, 32), "attn_k": (16, 32), "attn_v": (16, 32), "attn_output": (32, 32),
              "ffn_norm": (32,), "ffn_gate": (64, 32), "ffn_up": (64, 32), "ffn_down": (32, 64)}  # fmt: skip
    weights = {"token_embd.weight": torch.randn(50, 32, generator=gen), "output_norm.weight": 1 + 0.1 * torch.randn(32, generator=gen)}
    for i in range(cfg.n_layers):
        for _, gguf, _ in LAYER_WEIGHTS:
            w = torch.randn(shapes[gguf], generator=gen) * (0.3 if len(shapes[gguf]) == 2 else 0.1)
            weights[f"blk.{i}.{gguf}.weight"] = w + (1.0 if gguf.endswith("norm") else 0.0)
    return LlamaModel(cfg, weights)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def prompts(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (n,), generator=gen).tolist() for n in lengths]


def reference_logits(model, ids, steps_tokens):
    """The model's own path for one request: prefill, then teacher-forced steps (full attention)."""
    pre = prefill(model, torch.tensor([ids]), CAPACITY, keep=1)
    steps = forced_decode(model, pre.cache, FullAttention(), torch.tensor([steps_tokens]))  # [1, S, V]
    return pre.last_logits[0], steps[0]


@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_ragged_batch_equals_the_model_one_request_at_a_time(model, attention):
    lengths = [9, 20, 14]
    batch = prompts(lengths)
    forced = torch.randint(0, 50, (6, 3), generator=torch.Generator().manual_seed(2))  # [steps, B]
    engine = DecodeEngine(model, 3, CAPACITY, attention, dtype=torch.float32, device="cpu")
    first = engine.prefill(batch)
    got = torch.stack([engine.step(forced[s]).clone() for s in range(6)])  # [S, B, V]
    for b, ids in enumerate(batch):
        want_first, want_steps = reference_logits(model, ids, forced[:, b].tolist())
        assert_close(first[b], want_first, "model_logits", torch.float32, msg=f"prefill {b}")
        assert_close(got[:, b], want_steps, "model_logits", torch.float32, msg=f"steps {b}")
    assert engine.host_positions == [n + 6 for n in lengths] and engine.positions.tolist() == engine.host_positions


@pytest.mark.parametrize("rule", [None, MassRule(tau_m=0.5)], ids=["paper", "mass"])
def test_mac_at_tau_one_is_full_attention(model, rule):
    batch = prompts([12, 17])
    config = MACConfig(window=8, band=4, tau=1.0, **({} if rule is None else {"rule": rule}))
    full = DecodeEngine(model, 2, CAPACITY, "triton", dtype=torch.float32, device="cpu")
    mac = DecodeEngine(model, 2, CAPACITY, "mac", config, dtype=torch.float32, device="cpu")
    full.prefill(batch), mac.prefill(batch)
    for _ in range(5):  # greedy, on the device
        assert_close(mac.step(), full.step(), "model_logits", torch.float32)
    assert torch.equal(mac.tokens, full.tokens) and not mac.step_stats().hit.any()


def test_a_short_mac_run_gives_the_reference_backends_tokens(model):
    """Greedy MAC decoding in the engine (mac_triton, batched, ragged) against the model with
    mac_ref's decode step, one request at a time: the same tokens, hits included."""
    lengths = [20, 26]
    batch = prompts(lengths, seed=3)
    config = MACConfig(window=8, band=4, tau=-2.0, sinks=1)  # a wide radius: hits on random weights too
    engine = DecodeEngine(model, 2, CAPACITY, "mac", config, dtype=torch.float32, device="cpu")
    engine.prefill(batch)
    tokens, hits = [], 0
    for _ in range(6):
        tokens.append(engine.tokens.clone())
        engine.step()
        hits += int(engine.step_stats().hit.sum())
    tokens = torch.stack(tokens, 1)  # [B, 6]
    assert hits > 0
    for b, ids in enumerate(batch):
        pre = prefill(model, torch.tensor([ids]), CAPACITY, keep=config.window)
        backend, cache = mac_continuation(model, pre, dataclasses.replace(config, rope_base=model.config.rope_base))
        want, _ = greedy_decode(model, cache, backend, pre.last_logits, 6)
        assert torch.equal(tokens[b], want[0]), f"request {b}"


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_rewind_replays_the_same_run(model, backend):
    """checkpoint → steps → rewind → the same steps: the same tokens and hits (the reference's
    step advances each state's next position, which the rewind must restore too)."""
    config = MACConfig(window=8, band=4, tau=-2.0, sinks=1)
    engine = DecodeEngine(model, 2, CAPACITY, "mac", config, dtype=torch.float32, device="cpu", mac_backend=backend)
    engine.prefill(prompts([20, 26], seed=4))
    saved = engine.checkpoint()
    runs = []
    for _ in range(2):
        tokens, hits = [], []
        for _ in range(4):
            engine.step()
            tokens.append(engine.tokens.clone())
            hits.append(engine.step_stats().hit.clone())
        runs.append((torch.stack(tokens), torch.stack(hits)))
        engine.rewind(saved)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert bool(runs[0][1].any())


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_a_threshold_per_layer_is_each_layers_own(model, backend):
    """``MassRule.layer_tau_m``: the same threshold in every layer is the scalar rule, step for
    step; a layer at τ_m ≥ 1 never reuses while the other reuses as the scalar rule's first layer does."""
    def run(rule, steps=4):
        config = MACConfig(window=8, band=4, tau=-2.0, sinks=1, max_chain=1, rule=rule)
        engine = DecodeEngine(model, 2, CAPACITY, "mac", config, dtype=torch.float32, device="cpu", mac_backend=backend)
        engine.prefill(prompts([20, 26], seed=4))
        logits, hits = [], []
        for _ in range(steps):
            logits.append(engine.step().clone())
            hits.append(engine.step_stats().hit.clone())  # [layers, B, Hq]
        return torch.stack(logits), torch.stack(hits)

    scalar_logits, scalar_hits = run(MassRule(tau_m=0.2))
    same_logits, same_hits = run(MassRule(tau_m=0.9, layer_tau_m=(0.2, 0.2)))  # (tau_m is then unused)
    assert torch.equal(same_logits, scalar_logits) and torch.equal(same_hits, scalar_hits)
    _, split_hits = run(MassRule(tau_m=0.2, layer_tau_m=(0.2, 1.0)))
    assert bool(split_hits[:, 0].any()) and not bool(split_hits[:, 1].any())
    assert torch.equal(split_hits[0, 0], scalar_hits[0, 0])  # layer 0's first step sees the same inputs
    with pytest.raises(ValueError, match="layer_tau_m must hold one threshold per layer"):
        run(MassRule(tau_m=0.2, layer_tau_m=(0.2, 0.2, 0.2)))


def test_a_step_refuses_a_rule_with_thresholds_per_layer():
    """A decode step is one layer's: a config whose rule holds a threshold per layer is
    refused by name until ``MACConfig.for_layer`` resolves it."""
    config = MACConfig(window=8, band=4, rule=MassRule(tau_m=0.5, layer_tau_m=(0.3, 0.7)))
    with pytest.raises(ValueError, match="layer_tau_m"):
        config.check_heads(4)
    assert config.for_layer(1, 2).rule == MassRule(tau_m=0.7)
    assert config.for_layer(0, 2).check_heads(4) is None
    assert MACAttention(config, 2).configs == [config.for_layer(0, 2), config.for_layer(1, 2)]  # (the transformers path's)
    with pytest.raises(ValueError, match="layer_tau_m must be None or a non-empty tuple"):
        MassRule(layer_tau_m=(0.5, float("nan")))


def test_low_hit_rate_steps_are_misses_that_keep_the_rings(model):
    """Under the policy's hit-rate threshold every step is MAC's step without matching: full
    attention, writing the rows a step without hits writes (a later probe finds them current)."""
    batch = prompts([15, 15], seed=4)
    config = MACConfig(window=8, band=4, tau=0.5)
    policy = FallbackPolicy(min_batch=1, min_context=0, min_hit_rate=2.0, recent_hit_rate=0.0, steps=1)  # no probe in 4 steps
    fallback = DecodeEngine(model, 2, CAPACITY, "mac", config, dtype=torch.float32, device="cpu", policy=policy)
    never = DecodeEngine(model, 2, CAPACITY, "mac", MACConfig(window=8, band=4, tau=1.0), dtype=torch.float32, device="cpu")
    fallback.prefill(batch), never.prefill(batch)
    for _ in range(4):
        assert_close(fallback.step(), never.step(), "model_logits", torch.float32)
    for a, b in zip(fallback.states, never.states):
        assert torch.equal(a.ring_q, b.ring_q) and torch.equal(a.ring_depth, b.ring_depth)
        assert_close(a.ring_o, b.ring_o, "triton", torch.float32)
    assert policy.steps == 5 and not fallback.step_stats().hit.any()


def test_while_falling_back_for_the_hit_rate_a_probe_measures_it_again(model):
    """The hit-rate fallback alternates probes (MAC steps, whose hit rate is read) and miss steps."""
    config = MACConfig(window=8, band=4, tau=-2.0, sinks=1)
    policy = FallbackPolicy(min_batch=1, min_context=0, min_hit_rate=2.0, probe_every=2, recent_hit_rate=-1.0)  # never enough
    engine = DecodeEngine(model, 2, CAPACITY, "mac", config, dtype=torch.float32, device="cpu", policy=policy)
    engine.prefill(prompts([20, 26], seed=4))
    hits, rates, measured = [], [], []
    for _ in range(4):
        engine.step()
        hit = engine.step_stats().hit
        hits.append(bool(hit.any()))
        measured.append(hit.float().mean().item())
        rates.append(policy.recent_hit_rate)
    assert hits == [True, False, True, False]
    assert rates == pytest.approx([measured[0], measured[0], measured[2], measured[2]])


def test_below_the_thresholds_steps_are_the_full_attention_and_mac_resumes_on_fresh_rows(model):
    """Below ``min_context`` the steps are the policy's full attention (by default the engine's
    fastest: the Triton full decode with the Triton backend) and write no rows;
    when MAC resumes, the rows they left stale are no candidates: the first MAC step is all
    misses (so exact) and every later hit reuses a row written after the resumption."""
    batch = prompts([15, 15], seed=4)
    config = MACConfig(window=8, band=4, tau=-2.0, sinks=1, max_chain=1)  # a loose radius: hits wherever a row may be reused
    policy = FallbackPolicy(min_batch=1, min_context=19)  # contexts 16, 17, 18: full attention
    engine = DecodeEngine(model, 2, CAPACITY, "mac", config, dtype=torch.float32, device="cpu", policy=policy)
    sdpa = DecodeEngine(model, 2, CAPACITY, "sdpa", dtype=torch.float32, device="cpu")
    engine.prefill(batch), sdpa.prefill(batch)
    assert engine.full_kind() == "triton"
    for _ in range(3):
        assert_close(engine.step(), sdpa.step(), "model_logits", torch.float32)
        assert engine.step_stats() is None and engine.rings_stale
    assert_close(engine.step(), sdpa.step(), "model_logits", torch.float32)  # position 18: MAC on marked rings
    first = engine.step_stats()
    assert not first.candidate.any() and bool((first.matched_pos == -1).all()) and not engine.rings_stale
    hits = 0
    for _ in range(6):
        engine.step()
        stats = engine.step_stats()
        assert bool((stats.matched_pos[stats.hit] >= 18).all())
        hits += int(stats.hit.sum())
    assert hits > 0


def test_switching_to_mac_after_full_steps_marks_the_stale_rows(model):
    batch = prompts([15, 15], seed=4)
    for max_chain in (1, None):
        config = MACConfig(window=8, band=4, tau=-2.0, max_chain=max_chain)
        engine = DecodeEngine(model, 2, CAPACITY, "sdpa", config, dtype=torch.float32, device="cpu")
        engine.prefill(batch)
        saved = engine.checkpoint()
        engine.step()
        engine.switch("mac")
        if max_chain is None:
            with pytest.raises(ValueError, match="stale rows"):
                engine.step()
            engine.rewind(saved)  # back before the full step: the rings are whole again
            engine.step()
            assert engine.step_stats().candidate.any()
        else:
            engine.step()
            assert not engine.step_stats().candidate.any()


def test_policy_refuses_an_unknown_full_attention():
    with pytest.raises(ValueError, match="FallbackPolicy.full must be None or one of"):
        FallbackPolicy(full="mac")


def test_policy_full_attention_is_the_engines_unless_named(model):
    config = MACConfig(window=8, band=4, max_chain=1)
    for backend, named, kind in (("triton", None, "triton"), ("ref", None, "sdpa"), ("triton", "sdpa", "sdpa"), ("ref", "triton", "triton")):
        engine = DecodeEngine(model, 1, CAPACITY, "mac", config, dtype=torch.float32, device="cpu", policy=FallbackPolicy(full=named), mac_backend=backend)
        assert engine.full_kind() == kind, (backend, named)
    unbounded = DecodeEngine(model, 1, CAPACITY, "mac", MACConfig(window=8, band=4), device="cpu", dtype=torch.float32, policy=FallbackPolicy())
    assert unbounded.full_kind() == "miss"  # stale rows could not be marked afterwards


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_a_deleted_engine_is_freed_at_once(model, backend):
    """No reference cycle holds an engine (and its cache) once it is deleted: a benchmark's next point
    needs the memory before the garbage collector runs."""
    config = MACConfig(window=8, band=4, max_chain=1)
    collecting = gc.isenabled()
    gc.disable()
    try:
        engine = DecodeEngine(model, 2, CAPACITY, "sdpa", config, device="cpu", dtype=torch.float32, mac_backend=backend, policy=FallbackPolicy())
        engine.prefill(prompts([9, 12]))
        for attention in ("mac", "sdpa", "triton"):
            engine.switch(attention)
            engine.step()
        alive = weakref.ref(engine)
        del engine
        assert alive() is None
    finally:
        if collecting:
            gc.enable()


def test_the_prefill_keeps_only_the_queries_the_rings_take(model, monkeypatch):
    """The prompt's last ``window`` queries of each layer wait for the rings' seeding while the other
    requests run; kept as views, each would hold its whole prompt's queries (at batch 128, 8K: 72 GB)."""
    config = MACConfig(window=8, band=4, max_chain=1)
    engine = DecodeEngine(model, 2, CAPACITY, "sdpa", config, device="cpu", dtype=torch.float32)
    kept, seed = [], engine._seed
    monkeypatch.setattr(engine, "_seed", lambda queries, lengths, layer: kept.extend(t for pair in queries for t in pair) or seed(queries, lengths, layer))
    engine.prefill(prompts([40, 12]))
    assert len(kept) == 2 * 2 * model.config.n_layers
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in kept)


def test_bad_arguments_are_refused(model):
    with pytest.raises(ValueError, match="attention must be one of"):
        DecodeEngine(model, 1, 8, "dense", device="cpu")
    with pytest.raises(ValueError, match="needs a MACConfig"):
        DecodeEngine(model, 1, 8, "mac", device="cpu")
    engine = DecodeEngine(model, 2, 8, "sdpa", dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="one prompt per request"):
        engine.prefill(prompts([3]))
    with pytest.raises(ValueError, match=r"prompt lengths must lie in \[1, 8\]"):
        engine.prefill(prompts([3, 9]))
    engine.prefill(prompts([7, 7]))
    with pytest.raises(ValueError, match=r"kind must be None, or for a MAC engine one of .*got 'miss' for attention='sdpa'"):
        engine.step(kind="miss")
    engine.step()
    with pytest.raises(ValueError, match="the KV cache is full"):
        engine.step()


@pytest.mark.parametrize("attention", ["sdpa", "mac"])
def test_the_compiled_step_equals_the_eager_one(model, attention):
    """``compile=True`` (Inductor around the attention, here its CPU backend): the same logits
    as the eager step within float32 rounding (fusion reorders sums), the same MAC decisions."""
    config = MACConfig(window=8, band=4, tau=-2.0, sinks=1)
    runs = []
    for compiled in (False, True):
        engine = DecodeEngine(model, 2, CAPACITY, attention, config, dtype=torch.float32, device="cpu", compile=compiled)
        engine.prefill(prompts([20, 26], seed=4))
        forced = torch.randint(0, 50, (3, 2), generator=torch.Generator().manual_seed(5))
        logits = torch.stack([engine.step(forced[s]).clone() for s in range(3)])
        runs.append((logits, None if attention != "mac" else engine.step_stats().hit.clone()))
    assert_close(runs[1][0], runs[0][0], "model_logits", torch.float32)
    if attention == "mac":
        assert torch.equal(runs[0][1], runs[1][1]) and bool(runs[0][1].any())


def test_the_demos_gpu_section_times_every_attention_on_one_prefill(model):
    """``mac_llm.demo.engine_speed`` (what ``make demo`` prints on CUDA), here eagerly on the CPU."""
    from mac_llm.demo import engine_speed

    rates = engine_speed(model, prompts([30])[0], MACConfig(window=8, band=4, tau=-2.0, sinks=1, max_chain=1), "cpu", batch=2, steps=3)
    assert list(rates) == ["sdpa", "triton", "mac", "mac_policy"]
    assert all(math.isfinite(r) and r > 0 for r in rates.values())
