"""MAC-Attention in Hugging Face ``transformers`` models (Llama, Mistral, Qwen2, Qwen3, Gemma 2).

Two ways in, the same answers and the same refusals::

    import mac_llm.hf                                   # registers the name "mac"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="mac")   # the demo preset
    # or, with a configuration of your own (one for every layer, or a list):
    mac = mac_llm.hf.enable_mac_attention(model, preset("demo", tau=0.35))
    out = model.generate(input_ids, max_new_tokens=64, do_sample=False)
    print(mac_llm.hf.mac_backend(model).layer_stats().hit_rate)

How it plugs in:

- The attention function is registered with ``transformers.AttentionInterface`` under the
  name ``"mac"`` (and a mask function with ``AttentionMaskInterface``: the exact boolean
  mask, which the function checks). transformers calls it per layer with the post-RoPE
  query and the cache's keys and values (after this step's key was appended).
- Each attention module carries its own :class:`~mac_llm.attention.LayerMAC` (rings,
  statistics): :func:`enable_mac_attention` attaches them with your configuration; a model
  loaded with ``attn_implementation="mac"`` (or switched with ``set_attn_implementation("mac")``)
  gets the ``demo`` preset at its first pass. Two models never share rings.
- The **pre-RoPE query** ``q̃`` that MAC matches on is recovered from the post-RoPE query by
  inverting the model's own rotary embedding (its class, its RoPE type and scaling, at the
  same positions): exact up to the rounding of the query, so it is the query *after* any
  per-head norm (Qwen3's ``q_norm``), as the specification defines it.
- The model's softmax ``scaling`` (Gemma 2's ``query_pre_attn_scalar``) and attention-logit
  soft-capping (``softcap``) are MAC's ``scale`` and ``softcap``: they change the scores,
  so the summaries carry them (:func:`mac_ref.attend`).
- A forward pass that starts at slot 0 (a prompt) is full attention and seeds the rings;
  each single-token pass after it is one MAC decode step per layer. **Padded batches**:
  prompts of different lengths, left-padded, with an ``attention_mask``; each request
  decodes at its own positions (from ``position_ids``) with its own rings.
- What MAC cannot do correctly is a ``ValueError`` that names it, from one check that both
  ways in run (:func:`_check_call`): right padding or a hole in the mask, a static (or
  any preallocated) cache, a sliding window that masks keys, ``use_cache=False``, a cache
  that is not the latest prompt's or whose rows were reordered (beam search), several new
  tokens in one pass after the prompt, ``output_attentions=True``, dropout, a model type or
  RoPE layout it does not know, and any other attention argument it does not implement.
- On CUDA the decode step is ``mac_triton.decode_step``; elsewhere the reference
  ``mac_ref.decode_step`` (:func:`mac_llm.attention.auto_step`; ``step_fn`` overrides it).

:func:`smollm2_hf` builds SmolLM2-135M-Instruct as a ``transformers`` ``LlamaForCausalLM``
from the same GGUF file as the demo (no download), for the example and the tests.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import torch

from mac_core import preset
from mac_core.numerics import softmax_scale

from .attention import LayerMAC, MACAttention, auto_step
from .gguf import build_tokenizer, read_gguf
from .llama import LAYER_WEIGHTS, MODEL_WEIGHTS

ATTENTION_NAME = "mac"
# model types whose attention MAC has been checked on: rotate-half RoPE over the whole head,
# one KV cache per layer, the keyword arguments of _IMPLEMENTED (tests/test_hf.py runs each)
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2")
# attention keyword arguments MAC implements (or checks): anything else is refused by name
_IMPLEMENTED = {"position_ids", "use_cache", "sliding_window", "softcap", "output_attentions", "is_causal", "output_hidden_states"}


def _attention_modules(model) -> list:
    """The model's attention modules, in layer order."""
    return sorted((m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")), key=lambda m: m.layer_idx)


def _check_call(module, query, key, attention_mask, dropout, kwargs) -> torch.Tensor | None:
    """The one guard of both ways in: refuse what MAC would get wrong; returns ``pads [B]`` (or ``None``).

    ``query [B, Hq, L, D]`` of slots ``start … start+L−1``, ``key [B, Hkv, start+L, D]``;
    ``attention_mask`` the boolean mask of :func:`_mac_mask` ``[B, 1, L, start+L]`` (or ``None``).
    """
    model_type = getattr(module.config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"MAC-Attention supports the model types {MODEL_TYPES}, got {model_type!r}")
    unknown = sorted(name for name, value in kwargs.items() if name not in _IMPLEMENTED and value is not None)
    if unknown:
        raise ValueError(f"MAC-Attention does not implement the attention arguments {unknown}")
    if dropout:
        raise ValueError(f"MAC-Attention decodes without attention dropout, got dropout={dropout} (call model.eval())")
    if kwargs.get("output_attentions"):
        raise ValueError("MAC-Attention computes no attention weights: output_attentions=True is not supported")
    if kwargs.get("is_causal") is False:
        raise ValueError("MAC-Attention is causal decoding: is_causal=False (bidirectional attention) is not supported")
    if kwargs.get("use_cache") is False:
        raise ValueError("MAC-Attention needs the KV cache (use_cache=False recomputes the whole sequence at every step)")
    B, _, L, _ = query.shape
    T = key.shape[2]
    start = T - L
    position_ids = kwargs.get("position_ids")
    positions = torch.arange(start, T, device=query.device)[None] if position_ids is None else position_ids.to(torch.int64)
    pads = (start + L - 1 - positions[:, -1]).expand(B)  # [B]
    window = kwargs.get("sliding_window")
    if window is not None and int(positions.max()) + 1 > window:
        raise ValueError(
            f"this layer's sliding_window ({window}) masks keys at position {int(positions.max())}: MAC-Attention "
            "summarises every key before the band, so a sliding window is supported only while it masks nothing"
        )
    if attention_mask is not None:
        mask = attention_mask.to(torch.bool)[:, 0]  # [B, L, T]
        if not bool(mask[..., -1].any()) and not bool(key[:, :, -1].any()):  # nobody attends the last slot, and it is unwritten
            raise ValueError(
                f"the attention mask hides the last of the {T} key slots from the query: a static (preallocated) cache, "
                "e.g. cache_implementation='static'; MAC-Attention decodes from transformers' DynamicCache only"
            )
        slot = torch.arange(T, device=mask.device)
        query_slot = torch.arange(start, T, device=mask.device)  # [L]
        expected = (slot[None, None, :] <= query_slot[None, :, None]) & (slot[None, None, :] >= pads[:, None, None])  # [B, L, T]
        real_query = query_slot[None, :] >= pads[:, None]  # [B, L]: padding queries attend anything
        if not bool(((mask == expected) | ~real_query[..., None]).all()):
            raise ValueError(
                "MAC-Attention supports causal attention with left padding only (tokenizer.padding_side = 'left'): this "
                "attention_mask masks a key after a request's first token (right padding, a hole, or a custom mask)"
            )
    if bool((pads < 0).any()):
        raise ValueError(f"position_ids {positions[:, -1].tolist()} run past their {T} cache slots: not a left-padded batch")
    return pads if bool((pads > 0).any()) else None


def _pre_rope_query(module, query: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``q̃ [B, Hq, L, D]``: the post-RoPE ``query`` rotated back by the model's own rotary embedding.

    The model applied ``q_rot = q̃ ⊙ cos + rotate_half(q̃) ⊙ sin`` with ``cos, sin`` (scaled by
    its RoPE's attention factor ``a``, so ``cos² + sin² = a²``); the inverse is
    ``q̃ = (q_rot ⊙ cos − rotate_half(q_rot) ⊙ sin) / (cos² + sin²)``.
    """
    rotary = module.__dict__.get("mac_rotary")
    if rotary is None:  # the model's own class, built from the same config (any RoPE type it supports)
        owner = importlib.import_module(type(module).__module__)
        classes = [c for name, c in inspect.getmembers(owner, inspect.isclass) if name.endswith("RotaryEmbedding") and c.__module__ == owner.__name__]
        if len(classes) != 1:
            raise ValueError(f"{type(module).__name__}: MAC-Attention cannot find the model's rotary embedding to recover pre-RoPE queries")
        rotary = classes[0](module.config).to(query.device)
        module.__dict__["mac_rotary"] = rotary  # a plain attribute: not a submodule of the model
    cos, sin = rotary(query, positions.expand(query.shape[0], -1))  # [B, L, rotary dim], the model's dtype
    if cos.shape[-1] != query.shape[-1]:
        raise ValueError(f"this model rotates {cos.shape[-1]} of the {query.shape[-1]} query dimensions: MAC-Attention needs full-head RoPE")
    cos, sin, x = cos.float()[:, None], sin.float()[:, None], query.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return ((x * cos - rotated * sin) / (cos * cos + sin * sin)).to(query.dtype)


def _layer_of(module) -> LayerMAC:
    """The module's :class:`LayerMAC`; a model loaded with ``attn_implementation="mac"`` gets the demo preset here."""
    layer = module.__dict__.get("mac_layer")
    if layer is None:
        layer = LayerMAC(preset("demo"), auto_step)
        module.__dict__["mac_layer"] = layer
    return layer


def _mac_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: ``query [B, Hq, L, D]``, ``key/value [B, Hkv, T, D]``.

    Returns ``(out [B, L, Hq, D], None)`` as transformers expects.
    """
    pads = _check_call(module, query, key, attention_mask, dropout, kwargs)
    B, Hq, L, D = query.shape
    start = key.shape[2] - L
    layer = _layer_of(module)
    if start == 0:  # a prompt: the model's scale and soft cap become the configuration's
        scale = softmax_scale(D, None if scaling is None else float(scaling))
        softcap = kwargs.get("softcap")
        config = layer.base_config
        if config.scale is not None and abs(config.scale - scale) > 1e-12 * scale:
            raise ValueError(f"config.scale is {config.scale}, but the model's attention scaling is {scale}")
        layer.base_config = dataclasses.replace(config, scale=scale, softcap=None if softcap is None else float(softcap))
    position_ids = kwargs.get("position_ids")
    positions = torch.arange(start, start + L, device=query.device)[None] if position_ids is None else position_ids
    q_pre = _pre_rope_query(module, query, positions)
    out = layer(q_pre, query, key, value, start, pads)  # [B, Hq, L, D]
    return out.transpose(1, 2).contiguous(), None


def _mac_mask(*args, **kwargs):
    """The mask for ``"mac"``: the exact boolean mask (never skipped for ``is_causal``), so :func:`_check_call` can read it."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def enable_mac_attention(model, configs, step_fn=auto_step) -> MACAttention:
    """Switch a ``transformers`` model (of :data:`MODEL_TYPES`) to MAC-Attention decoding, in place.

    Enabling again replaces the previous rings and statistics.

    Args:
        model: e.g. ``LlamaForCausalLM`` (its attention modules have ``q_proj`` and ``layer_idx``
            and dispatch through ``AttentionInterface``).
        configs: a :class:`~mac_core.config.MACConfig` for every layer, or one per layer
            (a ``calibration`` is applied to each layer's prompt).
        step_fn: the decode step (default :func:`~mac_llm.attention.auto_step`: Triton on
            CUDA, the reference elsewhere).

    Returns:
        The :class:`~mac_llm.attention.MACAttention` view of the layers: its
        ``layer_stats()`` / ``request_stats()`` hold the decode steps of the latest
        ``generate`` call. :func:`disable_mac_attention` undoes it.

    Example:
        >>> import torch, transformers
        >>> from mac_core import MACConfig
        >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)
        >>> _ = torch.manual_seed(0)
        >>> model = transformers.LlamaForCausalLM(cfg).eval()
        >>> mac = enable_mac_attention(model, MACConfig(window=16, band=4, tau=0.5))
        >>> out = model.generate(torch.randint(3, 64, (1, 20)), max_new_tokens=4, min_new_tokens=4, do_sample=False)
        >>> mac.layer_stats().hit.shape            # [steps, layers, B, Hq]: 3 decode steps after the prompt
        torch.Size([3, 2, 1, 4])
    """
    attentions = _attention_modules(model)
    if not attentions:
        raise TypeError(f"{type(model).__name__} has no attention modules with q_proj and layer_idx")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"MAC-Attention supports the model types {MODEL_TYPES}, got {model_type!r}")
    backend = MACAttention(configs, len(attentions), step_fn=step_fn)
    previous = model.__dict__.get("mac_previous_attention") or model.config._attn_implementation
    for module, layer in zip(attentions, backend.layers):
        module.__dict__["mac_layer"] = layer
    model.__dict__["mac_previous_attention"] = previous if previous != ATTENTION_NAME else "sdpa"
    model.set_attn_implementation(ATTENTION_NAME)
    return backend


def mac_backend(model) -> MACAttention:
    """The :class:`~mac_llm.attention.MACAttention` view of a model's MAC layers (either way in)."""
    layers = [m.__dict__.get("mac_layer") for m in _attention_modules(model)]
    if not layers or any(layer is None for layer in layers):
        raise ValueError("this model has not run MAC-Attention: enable_mac_attention(model, config), or load it with "
                         "attn_implementation='mac' and run a forward pass first")
    return MACAttention.of_layers(layers)


def disable_mac_attention(model) -> None:
    """Undo :func:`enable_mac_attention` (or ``attn_implementation="mac"``): drop the rings and
    restore the previous attention (``"sdpa"`` for a model loaded with ``"mac"``)."""
    attentions = _attention_modules(model)
    if model.config._attn_implementation != ATTENTION_NAME:
        raise ValueError("MAC-Attention is not enabled on this model")
    for module in attentions:
        for name in ("mac_layer", "mac_rotary"):
            module.__dict__.pop(name, None)
    model.set_attn_implementation(model.__dict__.pop("mac_previous_attention", "sdpa"))


def _register() -> None:
    """``attn_implementation="mac"``: the names transformers resolves, from this import on."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers is optional: nothing to register with
        return
    AttentionInterface.register(ATTENTION_NAME, _mac_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, _mac_mask)


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


__all__ = ["ATTENTION_NAME", "MODEL_TYPES", "enable_mac_attention", "disable_mac_attention", "mac_backend", "smollm2_hf"]
