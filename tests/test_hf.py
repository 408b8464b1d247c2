"""``mac_llm.hf``: MAC-Attention inside transformers models, on tiny random models of five families.

Both ways in are run for every case: ``enable_mac_attention(model, config)`` and a model
built with ``attn_implementation="mac"`` (the demo preset). They must give the same answers
and the same refusals. Cases: at ``τ = 1`` (no hit) every family decodes full attention's
tokens; with hits the two ways agree token for token and statistic for statistic; Gemma 2's
soft-capping and query scale are carried into MAC; Qwen3's pre-RoPE query is taken after its
``q_norm``; left-padded batches decode each request at its own positions; and what MAC cannot
do is a ``ValueError`` that names it.
"""

import dataclasses

import pytest
import torch

from mac_core import MACConfig, preset

transformers = pytest.importorskip("transformers")
from mac_llm import hf  # noqa: E402
from mac_llm.hf import disable_mac_attention, enable_mac_attention, mac_backend  # noqa: E402

EXACT = MACConfig(window=16, band=4, tau=1.0)  # radius 0: no hit, exactly full attention
ALL_HITS = MACConfig(window=16, band=4, tau=-50.0)  # a huge radius: every candidate hits
FAMILIES = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 8}),
    # a query scale other than 1/sqrt(D) and a soft cap small enough to matter at this size
    "gemma2": (transformers.Gemma2Config, {"head_dim": 8, "query_pre_attn_scalar": 6, "attn_logit_softcapping": 1.0, "sliding_window": 512}),
}
WAYS = ["enable", "load"]


def model_of(family="llama", seed=0, attn="eager", **changes):
    cls, extra = FAMILIES[family]
    config = cls(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2, **{**extra, **changes},
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def mac_model(way, family="llama", config=None, **changes):
    """The family's model switched to MAC one way or the other (``config``: the enable way's; the
    load way runs the demo preset, or ``config`` set on its layers after a first pass)."""
    if way == "enable":
        model = model_of(family, **changes)
        enable_mac_attention(model, config or preset("demo"))
        return model
    model = model_of(family, attn="mac", **changes)
    if config is not None:
        with torch.no_grad():
            model(prompt(length=2))  # the first pass attaches the layers
        for layer in mac_backend(model).layers:
            layer.base_config = config
    return model


def generate(model, ids, n=6, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)


def prompt(batch=1, length=20, seed=1):
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_hit_gives_full_attention_in_every_family(family, way):
    """At τ = 1 MAC is exact: the family's eager attention's tokens, and a decode step per new token."""
    ids = prompt(batch=2, length=20)
    full = generate(model_of(family), ids)
    model = mac_model(way, family, EXACT)
    assert torch.equal(generate(model, ids), full)
    stats = mac_backend(model).layer_stats()
    assert stats.hit.shape == (5, 2, 2, 4) and not stats.hit.any()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_both_ways_in_give_the_same_answers_with_hits(family):
    """The demo preset both ways (prompts past its band of 256): the same tokens and decisions."""
    ids = prompt(batch=2, length=300, seed=4)
    runs = []
    for way in WAYS:
        model = mac_model(way, family)
        tokens = generate(model, ids, n=8)
        runs.append((tokens, mac_backend(model).layer_stats()))
    (tokens_a, stats_a), (tokens_b, stats_b) = runs
    assert torch.equal(tokens_a, tokens_b)
    assert torch.equal(stats_a.hit, stats_b.hit) and torch.equal(stats_a.keys_read, stats_b.keys_read)
    assert stats_a.candidate.any(), "the run must exercise the candidates"


def test_gemma2_soft_cap_and_scale_are_carried():
    """Gemma 2 (cap 1.0, query_pre_attn_scalar 6): MAC's prompt logits equal eager attention's,
    which ignoring the cap or the scale would not."""
    ids = prompt(length=24)
    with torch.no_grad():
        want = model_of("gemma2", initializer_range=0.5)(ids).logits  # scores of a few units: the cap bites
        uncapped = model_of("gemma2", attn_logit_softcapping=None, initializer_range=0.5)(ids).logits
        mac = mac_model("enable", "gemma2", EXACT, initializer_range=0.5)(ids).logits
    assert (uncapped - want).abs().max() > 1e-2  # the cap matters at this size
    torch.testing.assert_close(mac, want, rtol=1e-5, atol=1e-5)
    model = mac_model("load", "gemma2")
    with torch.no_grad():
        model(ids)
    config = mac_backend(model).layers[0].config
    assert config.softcap == 1.0 and config.scale == pytest.approx(6**-0.5)


def test_qwen3_pre_rope_query_is_taken_after_q_norm():
    """The rings hold q̃ = q_norm(q_proj(x)) (the spec's pre-RoPE query), not q_proj's output."""
    model = mac_model("enable", "qwen3", EXACT)
    attention = model.model.layers[0].self_attn
    seen = {}

    def keep(name):
        def hook(module, inputs, output):  # [B, L, Hq, D] after q_norm, [B, L, Hq·D] after q_proj
            seen[name] = output.reshape(*output.shape[:2], 4, 8).transpose(1, 2)

        return hook

    attention.q_norm.register_forward_hook(keep("after"))
    attention.q_proj.register_forward_hook(keep("before"))
    ids = prompt(length=10)
    with torch.no_grad():
        model(ids)
    ring = mac_backend(model).layers[0].state.ring_q[:, :, :10]  # [B, Hq, 10, D]: slots 0…9 hold positions 0…9
    torch.testing.assert_close(ring, seen["after"], rtol=1e-5, atol=1e-5)
    assert (ring - seen["before"]).abs().max() > 1e-2


@pytest.mark.parametrize("way", WAYS)
def test_statistics_before_any_decode_step_are_empty(way):
    model = mac_model(way, "llama", EXACT)
    with torch.no_grad():
        model(prompt(batch=2, length=8))  # a prompt, no decode step
    backend = mac_backend(model)
    stats = backend.layer_stats()
    assert stats.hit.shape == (0, 2, 2, 4) and stats.hit_rate == 0.0 and stats.skipped_fraction() == 0.0
    assert [r["hit_rate"] for r in backend.request_stats()] == [0.0, 0.0]


def test_mac_backend_before_any_pass_is_an_error():
    with pytest.raises(ValueError, match="has not run MAC-Attention"):
        mac_backend(model_of("llama", attn="mac"))


def test_two_models_of_one_config_keep_their_own_rings():
    """The load way attaches the rings to each model's own modules (not to their shared config)."""
    a = model_of("llama", attn="mac")
    b = transformers.AutoModelForCausalLM.from_config(a.config).eval()
    generate(a, prompt(length=12))
    generate(b, prompt(length=30, seed=2), n=3)
    assert mac_backend(a).layer_stats().context[:, 0].tolist() == [[n] for n in range(13, 18)]
    assert mac_backend(b).layer_stats().context[:, 0].tolist() == [[31], [32]]


def test_enabling_twice_replaces_the_rings_and_disable_restores():
    model = model_of("llama", attn="sdpa")
    enable_mac_attention(model, EXACT)
    second = enable_mac_attention(model, ALL_HITS)
    generate(model, prompt())
    assert second.layer_stats().hit.all() and mac_backend(model).layer_stats().hit.all()  # the second one is in use
    keys = set(model.state_dict())
    disable_mac_attention(model)
    assert model.config._attn_implementation == "sdpa" and set(model.state_dict()) == keys
    with pytest.raises(ValueError, match="not enabled"):
        disable_mac_attention(model)


@pytest.mark.parametrize("way", WAYS)
def test_statistics_are_per_generate_call_and_a_one_token_prompt_works(way):
    full = model_of("llama")
    full_long, full_short = generate(full, prompt(length=20)), generate(full, prompt(length=1, seed=2))
    model = mac_model(way, "llama", EXACT)
    assert torch.equal(generate(model, prompt(length=20)), full_long)
    assert torch.equal(generate(model, prompt(length=1, seed=2)), full_short)  # a fresh prompt of one token
    stats = mac_backend(model).layer_stats()
    assert stats.context[:, 0].tolist() == [[2], [3], [4], [5], [6]]  # the second call's positions, not the first's


REFUSALS = [
    pytest.param(dict(attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])), "left padding only", id="right-padded"),
    pytest.param(dict(attention_mask=torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]])), "left padding only", id="hole"),
    pytest.param(dict(use_cache=False), "use_cache=False", id="no-cache"),
    pytest.param(dict(cache_implementation="static"), "static", id="static-cache"),
    pytest.param(dict(num_beams=2, num_return_sequences=1), "beam search", id="beams"),
    pytest.param(dict(output_attentions=True, return_dict_in_generate=True), "output_attentions", id="attentions"),
]


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("kwargs, message", REFUSALS)
def test_what_mac_cannot_do_is_a_named_error_both_ways(way, kwargs, message):
    model = mac_model(way, "llama", EXACT)
    with pytest.raises(ValueError, match=message):
        generate(model, prompt(batch=2, length=5, seed=3), n=8, **kwargs)


@pytest.mark.parametrize("way", WAYS)
def test_a_sliding_window_that_masks_keys_is_refused_and_one_that_does_not_decodes(way):
    ids = prompt(length=20)
    short = mac_model(way, "mistral", EXACT, sliding_window=8)
    with pytest.raises(ValueError, match=r"sliding_window \(8\)"):
        generate(short, ids)
    full = generate(model_of("mistral", sliding_window=64), ids)
    assert torch.equal(generate(mac_model(way, "mistral", EXACT, sliding_window=64), ids), full)


@pytest.mark.parametrize("way", WAYS)
def test_training_mode_dropout_and_foreign_caches_are_refused(way):
    model = mac_model(way, "llama", EXACT, attention_dropout=0.5)
    model.train()
    with pytest.raises(ValueError, match="dropout=0.5"):
        model(prompt(length=6))
    model.eval()
    ids = prompt(length=8)
    with torch.no_grad():
        first = model(ids, use_cache=True)
        model(prompt(length=8, seed=9), use_cache=True)  # a new prompt: the rings are its own now
        with pytest.raises(ValueError, match="not the cache of the latest prompt"):
            name = "cache" if hasattr(first, "cache") else "past_key_values"  # (transformers ≥ 5.25, and before)
            model(ids[:, :1], use_cache=True, **{name: getattr(first, name)})


def test_an_attention_argument_mac_does_not_implement_is_refused_by_name():
    model = mac_model("enable", "llama", EXACT)
    attention = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 8)
    k = v = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match=r"\['s_aux'\]"):
        hf._mac_attention_forward(attention, q, k, v, None, s_aux=torch.zeros(4))


def test_an_unsupported_model_type_is_refused():
    model = model_of("llama")
    model.config.model_type = "phi3"
    with pytest.raises(ValueError, match="model types"):
        enable_mac_attention(model, EXACT)


def left_padded_batch(lengths, seed=5):
    """Prompts of the given lengths, left-padded with token 0: ``(ids [B, L], mask [B, L])``."""
    gen = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids, mask = torch.zeros(len(lengths), L, dtype=torch.long), torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, L - n :] = torch.randint(3, 64, (n,), generator=gen)
        mask[b, L - n :] = 1
    return ids, mask


LENGTHS = [20, 13, 7]


@pytest.mark.parametrize("way", WAYS)
def test_padded_batch_at_tau_one_gives_each_requests_full_attention_tokens(way):
    ids, mask = left_padded_batch(LENGTHS)
    L = ids.shape[1]
    full_model = model_of("llama")
    alone = [generate(full_model, ids[b : b + 1, L - n :])[0, n:] for b, n in enumerate(LENGTHS)]
    full = generate(full_model, ids, attention_mask=mask)
    model = mac_model(way, "llama", EXACT)
    tokens = generate(model, ids, attention_mask=mask)
    assert torch.equal(tokens, full)
    for b in range(len(LENGTHS)):
        assert torch.equal(tokens[b, L:], alone[b]), f"request {b}"
    stats = mac_backend(model).layer_stats()
    assert not stats.hit.any()
    assert stats.context[:, 0].tolist() == [[n + s + 1 for n in LENGTHS] for s in range(5)]  # each request's own positions


def test_padded_batch_statistics_are_per_request():
    """Each request's statistics in the padded batch are those of the request decoded alone."""
    ids, mask = left_padded_batch(LENGTHS)
    L = ids.shape[1]
    model = mac_model("enable", "llama", MACConfig(window=16, band=4, tau=0.97))
    batch_tokens = generate(model, ids, attention_mask=mask)
    batch = mac_backend(model).request_stats()
    for b, n in enumerate(LENGTHS):
        alone_tokens = generate(model, ids[b : b + 1, L - n :])
        assert torch.equal(alone_tokens[0, n:], batch_tokens[b, L:]), f"request {b}"
        alone = mac_backend(model).request_stats()[0]
        mass = batch[b].pop("mass_share_mean"), alone.pop("mass_share_mean")
        assert batch[b] == alone, f"request {b}"  # the same decisions and reads
        assert mass[0] == pytest.approx(mass[1], rel=1e-6)  # float32 sums over other layouts
    assert 0 < batch[0]["hit_rate"] < 1  # the test would not see a hit or a miss otherwise


def test_the_load_way_runs_the_demo_preset():
    model = model_of("llama", attn="mac")
    generate(model, prompt(length=12), n=2)
    configs = [dataclasses.replace(layer.base_config, scale=None) for layer in mac_backend(model).layers]  # scale: the model's
    assert configs == [preset("demo")] * 2
