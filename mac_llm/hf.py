"""MAC-Attention in Hugging Face ``transformers`` models of the Llama family.

Switch an existing model to MAC-Attention decoding in a few lines::

    from mac_core import preset
    from mac_llm.hf import enable_mac_attention
    mac = enable_mac_attention(model, preset("demo"))
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
- A forward pass that starts at position 0 (the prompt of a ``generate`` call) is full
  attention and seeds the rings afresh; each single-token pass after it is one MAC decode
  step per layer. The statistics are those of the latest ``generate`` call
  (``mac.request_stats()`` per request).
- **Padded batches**: prompts of different lengths, left-padded (``padding_side="left"``)
  with an ``attention_mask``. Request ``b``'s padding slots ``p_b`` come from the
  ``position_ids`` that ``generate`` passes (they count from each request's first token);
  its keys are read at slots ``p_b + j`` through :func:`mac_core.kv.left_padded` (no copy),
  so each request decodes at its own positions with its own rings.
- **The rings belong to one cache**: the cache a prompt pass filled is tagged; a decode
  pass over any other cache (one kept from an earlier call, a copy) is refused, as is a
  cache continued with a multi-token prompt.
- What MAC cannot do correctly is refused with a ``ValueError`` before any attention
  runs: right padding or holes in the mask, ``use_cache=False``, a cache other than
  ``DynamicCache`` (a static cache), and beam search (``num_beams > 1``: it reorders the KV
  cache between steps and the rings would not follow).
- ``attn_implementation="mac"`` at load time works once ``mac_llm.hf`` is imported (the
  name is registered then): MAC with the ``demo`` preset, the pre-RoPE query recovered by
  inverting the model's default RoPE (float rounding of the query apart, the hooked
  query); :func:`enable_mac_attention` picks the configuration and hooks ``q_proj``.

:func:`smollm2_hf` builds SmolLM2-135M-Instruct as a ``transformers`` ``LlamaForCausalLM``
from the same GGUF file as the demo (no download), for the example and the tests.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch

import mac_ref
from mac_core import preset
from mac_core.rope import invert_rope

from .attention import MACAttention
from .gguf_model import LAYER_WEIGHTS, MODEL_WEIGHTS, build_tokenizer, read_gguf

ATTENTION_NAME = "mac"


def _request_pads(start: int, query_len: int, position_ids, batch: int):
    """``[B]`` int64 left-padding slots per request, from transformers' ``position_ids``
    (``None`` without them): the last query sits at slot ``start + L − 1`` and position
    ``position_ids[b, −1]``."""
    if position_ids is None:
        return None
    pads = start + query_len - 1 - position_ids[:, -1].to(torch.int64).expand(batch)
    if bool((pads < 0).any()):
        raise ValueError(f"position_ids {position_ids[:, -1].tolist()} run past their cache slots (start {start}): not a left-padded batch")
    return pads


def _mac_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: ``query [B, Hq, L, D]``, ``key/value [B, Hkv, T, D]``.

    Returns ``(out [B, L, Hq, D], None)`` as transformers expects.
    """
    B, Hq, L, D = query.shape
    if scaling is not None and abs(scaling - D**-0.5) > 1e-12:
        raise ValueError(f"MAC-Attention here uses the softmax scale 1/sqrt(D); the model asks for {scaling}")
    start = key.shape[2] - L  # the cache holds slots [0, start + L)
    position_ids = kwargs.get("position_ids")
    pads = _request_pads(start, L, position_ids, B)
    backend = getattr(module, "mac_backend", None)
    if backend is None:  # loaded with attn_implementation="mac": no hook, invert RoPE
        backend = _load_time_backend(module.config)
        positions = position_ids if position_ids is not None else torch.arange(start, start + L, device=query.device)[None]
        q_pre = invert_rope(query, positions[:, None, :].expand(B, 1, L), _rope_base(module.config))
    else:
        q_pre = module.mac_q_pre.to(query.dtype)  # [B, Hq, L, D] from the q_proj hook
    out = backend(module.layer_idx, q_pre, query, key, value, start, pads)  # [B, Hq, L, D]
    return out.transpose(1, 2).contiguous(), None


_LOAD_TIME_BACKENDS: dict[int, MACAttention] = {}  # id(model config) -> backend of a model loaded with "mac"


def _load_time_backend(config) -> MACAttention:
    key = id(config)
    if key not in _LOAD_TIME_BACKENDS:
        _LOAD_TIME_BACKENDS[key] = MACAttention(preset("demo"), config.num_hidden_layers)
        weakref.finalize(config, _LOAD_TIME_BACKENDS.pop, key, None)
    return _LOAD_TIME_BACKENDS[key]


def load_time_backend(model) -> MACAttention:
    """The backend (statistics included) of a model loaded with ``attn_implementation="mac"``."""
    return _load_time_backend(model.config)


def _rope_base(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}  # (transformers 5 and 4)
    if params.get("rope_type", params.get("type", "default")) != "default":
        raise ValueError(
            "attn_implementation='mac' recovers pre-RoPE queries by inverting the default RoPE; this model scales it: "
            "call mac_llm.hf.enable_mac_attention(model, config), which hooks q_proj instead"
        )
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _capture_q_pre(attention, q_proj, inputs, output):
    """Forward hook on ``q_proj``: keep the pre-RoPE query ``[B, Hq, L, D]`` on its attention module.

    ``attention`` is bound with :func:`functools.partial`, not stored on ``q_proj``: a module
    attribute would make the attention module a child of its own ``q_proj``."""
    B, L, _ = output.shape
    attention.mac_q_pre = output.view(B, L, -1, attention.head_dim).transpose(1, 2)


def _cache_of(kwargs):
    return kwargs.get("past_key_values", kwargs.get("cache"))  # (the argument's name in transformers 4 and 5)


def _refuse_unsupported_inputs(backend: MACAttention, model, args, kwargs):
    """Forward pre-hook on the model: what would make MAC silently wrong is an error."""
    if kwargs.get("use_cache") is False:
        raise ValueError("MAC-Attention needs the KV cache (use_cache=False recomputes the whole sequence at every step)")
    cache = _cache_of(kwargs)
    if cache is not None and type(cache).__name__ != "DynamicCache":
        raise ValueError(f"MAC-Attention works with transformers' DynamicCache only, got {type(cache).__name__}")
    seen = cache.get_seq_length() if cache is not None else 0
    if seen and getattr(cache, "_mac_prompt", None) != backend.prompts:
        raise ValueError(
            "this KV cache is not the one MAC's rings were seeded for (a cache kept from an earlier generate call, "
            "or a copy): MAC decodes only the cache of the latest prompt"
        )
    backend.prompt_pass = seen == 0
    mask = kwargs.get("attention_mask")
    if mask is None or bool(mask.all()):
        return
    if mask.dim() != 2:
        raise ValueError(f"MAC-Attention reads padding from a 2-D attention_mask [B, T], got shape {tuple(mask.shape)}")
    real = mask.bool()
    if bool((real[:, 1:] < real[:, :-1]).any()):
        raise ValueError(
            "MAC-Attention supports left padding only (tokenizer.padding_side = 'left'): "
            "this attention_mask has a zero after a one (right padding, or a hole)"
        )
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise ValueError("a left-padded batch needs position_ids that count each request from its first token (model.generate passes them)")
    pads = _request_pads(seen, position_ids.shape[-1], position_ids, mask.shape[0])
    if not torch.equal(pads, (~real).sum(1).to(pads.device)):
        raise ValueError(
            f"position_ids imply {pads.tolist()} padding slots per request, the attention_mask {(~real).sum(1).tolist()}: "
            "positions must count each request from its first token"
        )


def _tag_cache(backend: MACAttention, model, args, kwargs, output):
    """Forward hook on the model: after a prompt pass, mark the cache the rings belong to."""
    if backend.prompt_pass:
        fields = output.keys() if hasattr(output, "keys") else ()
        cache = output["cache"] if "cache" in fields else output["past_key_values"] if "past_key_values" in fields else None
        if cache is not None:
            backend.prompts += 1
            cache._mac_prompt = backend.prompts


def _generate_without_beams(generate, model):
    """``model.generate`` that refuses beam search (it reorders the KV cache, not MAC's rings)."""

    @functools.wraps(generate)
    def wrapper(*args, **kwargs):
        config = kwargs.get("generation_config") or model.generation_config
        beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
        if beams > 1:
            raise ValueError(
                f"MAC-Attention does not support beam search (num_beams={beams}): beams reorder the KV cache "
                "between steps and MAC's rings would not follow; use greedy decoding or sampling"
            )
        return generate(*args, **kwargs)

    return wrapper


@dataclass
class _Enabled:
    """What :func:`enable_mac_attention` changed on a model, to undo it."""

    backend: MACAttention
    previous_attention: str
    hooks: list = field(default_factory=list)


def enable_mac_attention(model, configs, step_fn=mac_ref.decode_step) -> MACAttention:
    """Switch a Llama-family ``transformers`` model to MAC-Attention decoding (in place).

    Enabling again replaces the previous backend (its hooks are removed first).

    Args:
        model: e.g. ``LlamaForCausalLM`` (any model whose attention modules have ``q_proj``,
            ``head_dim``, ``layer_idx`` and dispatch through ``AttentionInterface``).
        configs: a :class:`~mac_core.config.MACConfig` for every layer, or one per layer
            (a ``calibration`` is applied to each layer's prompt).
        step_fn: ``mac_ref.decode_step`` or ``mac_triton.decode_step``.

    Returns:
        The :class:`~mac_llm.attention.MACAttention` backend: its ``stats`` /
        ``layer_stats()`` hold the decode steps of the latest ``generate`` call. Call
        :func:`disable_mac_attention` to undo.
    """
    if getattr(model, "mac_enabled", None) is not None:
        disable_mac_attention(model)
    attentions = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]
    if not attentions:
        raise TypeError(f"{type(model).__name__} has no Llama-style attention modules (q_proj, layer_idx)")
    backend = MACAttention(configs, len(attentions), step_fn=step_fn)
    enabled = _Enabled(backend, model.config._attn_implementation)
    for attention in attentions:
        attention.mac_backend = backend
        enabled.hooks.append(attention.q_proj.register_forward_hook(functools.partial(_capture_q_pre, attention)))
    enabled.hooks.append(model.register_forward_pre_hook(functools.partial(_refuse_unsupported_inputs, backend), with_kwargs=True))
    enabled.hooks.append(model.register_forward_hook(functools.partial(_tag_cache, backend), with_kwargs=True))
    model.generate = _generate_without_beams(type(model).generate.__get__(model), model)
    model.mac_enabled = enabled
    model.set_attn_implementation(ATTENTION_NAME)
    return backend


def disable_mac_attention(model) -> None:
    """Undo :func:`enable_mac_attention`: remove the hooks and restore the attention function."""
    enabled: _Enabled | None = getattr(model, "mac_enabled", None)
    if enabled is None:
        raise ValueError("MAC-Attention is not enabled on this model")
    for hook in enabled.hooks:
        hook.remove()
    for m in model.modules():
        for name in ("mac_backend", "mac_q_pre"):
            if name in m.__dict__:
                delattr(m, name)
    del model.generate, model.mac_enabled
    model.set_attn_implementation(enabled.previous_attention)


def _register() -> None:
    """``attn_implementation="mac"``: the name transformers resolves, from this import on."""
    try:
        from transformers import AttentionInterface
    except ImportError:  # transformers is optional: nothing to register with
        return
    AttentionInterface.register(ATTENTION_NAME, _mac_attention_forward)


_register()


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
    state = {hf: weights[gguf] for gguf, hf in MODEL_WEIGHTS}
    for i in range(config.n_layers):
        for _, gguf, hf in LAYER_WEIGHTS:
            state[f"model.layers.{i}.{hf}.weight"] = weights[f"blk.{i}.{gguf}.weight"]
    model = LlamaForCausalLM(hf_config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(tokenizer_fields), eos_token="<|im_end|>", pad_token="<|im_end|>")
    return model, tokenizer
