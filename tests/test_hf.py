"""``mac_llm.hf``: MAC-Attention inside a transformers Llama, on a tiny random model.

The bugs a first user met, each pinned: the module tree after enabling (no recursion),
one hook per layer however often it is enabled, statistics per ``generate`` call, a
second ``generate`` with a one-token prompt, and a clear error for what MAC cannot do
correctly (right padding, ``use_cache=False``, a static cache, beam search, a cache that
is not the one the rings were seeded for). Left-padded batches of prompts of different
lengths decode each request at its own positions: at ``τ = 1`` full attention's tokens,
request by request; ``attn_implementation="mac"`` works at load time.
"""

import pytest
import torch

from mac_core import MACConfig

transformers = pytest.importorskip("transformers")
from mac_llm.hf import disable_mac_attention, enable_mac_attention  # noqa: E402

EXACT = MACConfig(window=16, band=4, tau=1.0)  # radius 0: no hit, exactly full attention
ALL_HITS = MACConfig(window=16, band=4, tau=-50.0)  # a huge radius: every candidate hits


@pytest.fixture
def model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        attn_implementation="sdpa",
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def generate(model, ids, n=6, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)


def prompt(batch=1, length=20, seed=1):
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def q_proj_hooks(model) -> int:
    return sum(len(m.q_proj._forward_hooks) for m in model.modules() if hasattr(m, "q_proj"))


def test_the_module_tree_survives_enable_and_disable(model):
    """``.to``, ``.eval``, ``state_dict`` and ``repr`` work, and the modules are the model's own."""
    modules, keys = len(list(model.modules())), set(model.state_dict())
    for switch in (lambda: enable_mac_attention(model, EXACT), lambda: disable_mac_attention(model)):
        switch()
        model.to(torch.float32).eval()
        assert set(model.state_dict()) == keys
        assert "LlamaForCausalLM" in repr(model)
        assert len(list(model.modules())) == modules


def test_enabling_twice_keeps_one_hook_per_layer(model):
    enable_mac_attention(model, EXACT)
    second = enable_mac_attention(model, ALL_HITS)
    assert q_proj_hooks(model) == 2 and len(model._forward_pre_hooks) == 1
    generate(model, prompt())
    assert second.layer_stats().hit.all()  # the second backend is the one in use
    disable_mac_attention(model)
    assert q_proj_hooks(model) == 0 and not model._forward_pre_hooks
    assert model.config._attn_implementation == "sdpa"


def test_statistics_are_per_generate_call_and_a_one_token_prompt_works(model):
    full_long, full_short = generate(model, prompt(length=20)), generate(model, prompt(length=1, seed=2))
    mac = enable_mac_attention(model, EXACT)
    assert torch.equal(generate(model, prompt(length=20)), full_long)
    assert len(mac.stats[0]) == 5  # 6 new tokens: a prompt pass, then 5 decode steps
    assert torch.equal(generate(model, prompt(length=1, seed=2)), full_short)  # a fresh prompt of one token
    stats = mac.layer_stats()
    assert stats.hit.shape[0] == 5 and not stats.hit.any()
    assert stats.context[:, 0].tolist() == [[2], [3], [4], [5], [6]]  # the second call's positions, not the first's


def test_equal_length_batches_give_full_attention_at_tau_one(model):
    ids = prompt(batch=3, length=12, seed=3)
    full = generate(model, ids)
    mac = enable_mac_attention(model, EXACT)
    assert torch.equal(generate(model, ids), full)
    assert mac.layer_stats().hit.shape[2] == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])), "left padding only"),
        (dict(attention_mask=torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]])), "a zero after a one"),
        (dict(use_cache=False), "use_cache=False"),
        (dict(cache_implementation="static"), "DynamicCache only, got StaticCache"),
        (dict(num_beams=2), "beam search"),
    ],
    ids=["right-padded", "hole", "no-cache", "static-cache", "beams"],
)
def test_what_mac_cannot_do_yet_is_an_error(model, kwargs, message):
    enable_mac_attention(model, EXACT)
    ids = prompt(batch=2, length=5)
    with pytest.raises(ValueError, match=message):
        generate(model, ids, **kwargs)


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


def test_padded_batch_at_tau_one_gives_each_requests_full_attention_tokens(model):
    ids, mask = left_padded_batch(LENGTHS)
    L = ids.shape[1]
    alone = [generate(model, ids[b : b + 1, L - n :])[0, n:] for b, n in enumerate(LENGTHS)]
    full = generate(model, ids, attention_mask=mask)
    mac = enable_mac_attention(model, EXACT)
    tokens = generate(model, ids, attention_mask=mask)
    assert torch.equal(tokens, full)
    for b in range(len(LENGTHS)):
        assert torch.equal(tokens[b, L:], alone[b]), f"request {b}"
    stats = mac.layer_stats()
    assert not stats.hit.any()
    assert stats.context[:, 0].tolist() == [[n + s + 1 for n in LENGTHS] for s in range(5)]  # each request's own positions


def test_padded_batch_statistics_are_per_request(model):
    """Each request's statistics in the padded batch are those of the request decoded alone."""
    ids, mask = left_padded_batch(LENGTHS)
    L = ids.shape[1]
    mac = enable_mac_attention(model, MACConfig(window=16, band=4, tau=0.97))
    batch_tokens = generate(model, ids, attention_mask=mask)
    batch = mac.request_stats()
    for b, n in enumerate(LENGTHS):
        alone_tokens = generate(model, ids[b : b + 1, L - n :])
        assert torch.equal(alone_tokens[0, n:], batch_tokens[b, L:]), f"request {b}"
        alone = mac.request_stats()[0]
        mass = batch[b].pop("mass_share_mean"), alone.pop("mass_share_mean")
        assert batch[b] == alone, f"request {b}"  # the same decisions and reads
        assert mass[0] == pytest.approx(mass[1], rel=1e-6)  # float32 sums over other layouts
    assert 0 < batch[0]["hit_rate"] < 1  # the test would not see a hit or a miss otherwise


def test_a_cache_the_rings_do_not_belong_to_is_refused(model):
    enable_mac_attention(model, EXACT)
    ids = prompt(length=8)
    with torch.no_grad():
        first = model(ids, use_cache=True)
        model(prompt(length=8, seed=9), use_cache=True)  # a new prompt: the rings are its own now
        with pytest.raises(ValueError, match="not the one MAC's rings were seeded for"):
            model(ids[:, :1], cache=first.cache, use_cache=True)


def test_attn_implementation_mac_at_load_time(tmp_path, model):
    """Saved, then loaded with ``attn_implementation="mac"``: the demo preset, queries from
    inverted RoPE; at τ = 1 the full-attention tokens."""
    import dataclasses

    from mac_llm import hf

    ids = prompt(length=24)
    full = generate(model, ids)
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="mac").eval()
    backend = hf.load_time_backend(loaded)
    assert backend.base_configs[0] == hf.preset("demo")
    backend.base_configs = [dataclasses.replace(c, tau=1.0) for c in backend.base_configs]
    assert torch.equal(generate(loaded, ids), full)
    assert len(backend.stats[0]) == 5 and not backend.layer_stats().hit.any()
