"""MAC-Attention in Hugging Face ``transformers`` models of the Llama family.

Switch an existing model to MAC-Attention decoding in a few lines::

    from mac_llm.hf import enable_mac_attention
    mac = enable_mac_attention(model, mac_ref.MACConfig(window=256, band=256, tau=0.6, sinks=4))
    out = model.generate(input_ids, max_new_tokens=64, do_sample=False)
    print(mac.layer_stats().hit_rate)

How it plugs in:

- The attention function is registered with ``transformers.AttentionInterface`` under the
  name ``"mac"`` and selected with ``model.set_attn_implementation("mac")``. transformers
  calls it per layer with the post-RoPE query and the cache's keys and values (after this
  step's key was appended), which is exactly what a decode step needs.
- The **pre-RoPE query** that MAC matches on is **captured by a forward hook** on each
  layer's ``q_proj`` (its output, reshaped to heads), not recovered by inverting RoPE: the
  hook is exact and works for any rotary variant (scaled RoPE included).
- A multi-token forward pass (the prompt) is full attention and seeds the rings; each
  single-token pass is one MAC decode step per layer. Batches must not be padded (one
  prompt, or prompts of one length): MAC's positions are the cache's.

:func:`smollm2_hf` builds SmolLM2-135M-Instruct as a ``transformers`` ``LlamaForCausalLM``
from the same GGUF file as the demo (no download), for the example and the tests.
"""

from __future__ import annotations

import torch

import mac_ref

from .attention import MACAttention
from .gguf_model import read_gguf, build_tokenizer

ATTENTION_NAME = "mac"


def _mac_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: ``query [B, Hq, L, D]``, ``key/value [B, Hkv, T, D]``.

    Returns ``(out [B, L, Hq, D], None)`` as transformers expects.
    """
    backend: MACAttention = module.mac_backend
    B, Hq, L, D = query.shape
    if scaling is not None and abs(scaling - D**-0.5) > 1e-12:
        raise ValueError(f"MAC-Attention here uses the softmax scale 1/sqrt(D); the model asks for {scaling}")
    q_pre = module.mac_q_pre  # [B, Hq, L, D] from the q_proj hook
    start = key.shape[2] - L  # the cache holds positions [0, start + L)
    out = backend(module.layer_idx, q_pre.to(query.dtype), query, key, value, start)  # [B, Hq, L, D]
    return out.transpose(1, 2).contiguous(), None


def _capture_q_pre(module, inputs, output):
    """Forward hook on ``q_proj``: keep the pre-RoPE query ``[B, Hq, L, D]`` on the attention module."""
    attention = module.mac_owner
    B, L, _ = output.shape
    attention.mac_q_pre = output.view(B, L, -1, attention.head_dim).transpose(1, 2)


def enable_mac_attention(model, configs, rule: str = "paper", step_fn=mac_ref.decode_step) -> MACAttention:
    """Switch a Llama-family ``transformers`` model to MAC-Attention decoding (in place).

    Args:
        model: e.g. ``LlamaForCausalLM`` (any model whose attention modules have ``q_proj``,
            ``head_dim``, ``layer_idx`` and dispatch through ``AttentionInterface``).
        configs: a :class:`mac_ref.MACConfig` for every layer, or one per layer.
        rule: acceptance rule, see :mod:`mac_llm.calibrate`.
        step_fn: ``mac_ref.decode_step`` or ``mac_triton.decode_step``.

    Returns:
        The :class:`~mac_llm.attention.MACAttention` backend: its ``stats`` / ``layer_stats()``
        hold every decode step's hits and reads. Call :func:`disable_mac_attention` to undo.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _mac_attention_forward)
    attentions = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]
    if not attentions:
        raise TypeError(f"{type(model).__name__} has no Llama-style attention modules (q_proj, layer_idx)")
    backend = MACAttention(configs, len(attentions), rule=rule, step_fn=step_fn)
    for attention in attentions:
        attention.mac_backend = backend
        attention.q_proj.mac_owner = attention
        attention.mac_hook = attention.q_proj.register_forward_hook(_capture_q_pre)
    model.mac_previous_attention = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    return backend


def disable_mac_attention(model) -> None:
    """Undo :func:`enable_mac_attention`: remove the hooks and restore the attention function."""
    for m in model.modules():
        if hasattr(m, "mac_hook"):
            m.mac_hook.remove()
            del m.mac_hook, m.mac_backend
    model.set_attn_implementation(model.mac_previous_attention)


def smollm2_hf(path=None):
    """SmolLM2-135M-Instruct as ``(transformers.LlamaForCausalLM, PreTrainedTokenizerFast)`` from its GGUF file."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config, weights, tokenizer_fields = read_gguf(path)
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=config.context_length,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_base,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=tokenizer_fields["eos_token_id"],
        pad_token_id=tokenizer_fields["eos_token_id"],
        attn_implementation="sdpa",
    )
    names = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    state = {"model.embed_tokens.weight": weights["token_embd.weight"], "model.norm.weight": weights["output_norm.weight"]}
    for i in range(config.n_layers):
        for hf_name, gguf_name in names.items():
            state[f"model.layers.{i}.{hf_name}.weight"] = weights[f"blk.{i}.{gguf_name}.weight"]
    model = LlamaForCausalLM(hf_config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(tokenizer_fields), eos_token="<|im_end|>", pad_token="<|im_end|>")
    return model, tokenizer
