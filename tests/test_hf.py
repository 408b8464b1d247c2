"""``mac_llm.hf``: MAC-Attention inside a transformers Llama, on a tiny random model.

The bugs a first user met, each pinned: the module tree after enabling (no recursion),
one hook per layer however often it is enabled, statistics per ``generate`` call, a
second ``generate`` with a one-token prompt, and a clear error for what MAC cannot do
correctly yet (padded batches, ``use_cache=False``, a static cache, beam search).
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
        (dict(attention_mask=torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])), "padded batches"),
        (dict(use_cache=False), "use_cache=False"),
        (dict(cache_implementation="static"), "DynamicCache only, got StaticCache"),
        (dict(num_beams=2), "beam search"),
    ],
    ids=["padded", "no-cache", "static-cache", "beams"],
)
def test_what_mac_cannot_do_yet_is_an_error(model, kwargs, message):
    enable_mac_attention(model, EXACT)
    ids = prompt(batch=2, length=5)
    with pytest.raises(ValueError, match=message):
        generate(model, ids, **kwargs)
