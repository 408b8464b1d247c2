r"""A Llama decoder in a few readable functions: the one forward every runtime of this package calls.

The block, one layer at a time, with a preallocated KV cache:

.. math::
    h \mathrel{+}= W_o\,\mathrm{Attn}(\mathrm{RoPE}(W_q x), \mathrm{RoPE}(W_k x), W_v x), \quad x = \mathrm{RMSNorm}(h)

    h \mathrel{+}= W_\text{down}\big(\mathrm{silu}(W_\text{gate} x) \odot W_\text{up} x\big), \quad x = \mathrm{RMSNorm}(h)

A layer is two calls around its attention: :meth:`LlamaModel.project` (norm, the Q/K/V
projections, RoPE) gives the pre-RoPE query ``q̃`` (what MAC matches on), the post-RoPE
query, key and value; :meth:`LlamaModel.finish` adds ``W_o`` of the attention output and
the MLP. The model's own forward pass (the demo, the study, the tests), the
batched engine's prefill and its CUDA-graph step (:mod:`mac_llm.engine`) all call these
two, so the three cannot drift apart. Attention itself is a *backend*
(:mod:`mac_llm.attention`): full attention, or MAC-Attention with per-layer rings.

Reading a model from a GGUF file is :mod:`mac_llm.gguf`. Spec: [conventions][spec-conventions].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mac_core.rope import rope_angles, rotate

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


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Llama model."""

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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x²) + eps) · weight`` over the last dimension."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


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

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def clone(self) -> "KVCache":
        copy = object.__new__(KVCache)
        copy.k = [k.clone() for k in self.k]
        copy.v = [v.clone() for v in self.v]
        copy.length = self.length
        return copy


def layer_weights(weights: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Layer ``i``'s weights from GGUF-named tensors, the projections that read the same input
    fused into one matrix each (one matrix product instead of three, and of two):
    ``wqkv [(Hq + 2Hkv)·D, dim]``, ``wo``, ``w_gate_up [2·ffn, dim]``, ``w_down`` and the two norms."""
    w = {ours: weights[f"blk.{i}.{gguf}.weight"] for ours, gguf, _ in LAYER_WEIGHTS}
    return {
        "attn_norm": w["attn_norm"], "wqkv": torch.cat([w["wq"], w["wk"], w["wv"]]), "wo": w["wo"],
        "ffn_norm": w["ffn_norm"], "w_gate_up": torch.cat([w["w_gate"], w["w_up"]]), "w_down": w["w_down"],
    }  # fmt: skip


def project(cfg: ModelConfig, w: dict[str, torch.Tensor], h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """A layer's attention inputs from hidden states ``h [..., dim]`` (:func:`layer_weights` ``w``).

    Args:
        cos, sin: the RoPE table of the positions of ``h`` (``[..., 1, D]``; :meth:`LlamaModel.rope_table`).

    Returns:
        ``q_pre, q_post [..., Hq, D]`` (pre- and post-RoPE queries) and ``k, v [..., Hkv, D]``
        (post-RoPE keys, values), in ``h``'s dtype.
    """
    D = cfg.head_dim
    x = rms_norm(h, w["attn_norm"], cfg.norm_eps)
    q_pre, k, v = (x @ w["wqkv"].T).split([cfg.n_heads * D, cfg.n_kv_heads * D, cfg.n_kv_heads * D], dim=-1)
    q_pre = q_pre.unflatten(-1, (cfg.n_heads, D))
    k = rotate(k.unflatten(-1, (cfg.n_kv_heads, D)), cos, sin)
    return q_pre, rotate(q_pre, cos, sin), k, v.unflatten(-1, (cfg.n_kv_heads, D))


def finish(cfg: ModelConfig, w: dict[str, torch.Tensor], h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """A layer's output: ``h [..., dim]`` plus ``W_o`` of the attention ``attn [..., Hq, D]``, then the MLP."""
    h = h + attn.flatten(-2) @ w["wo"].T
    gate, up = (rms_norm(h, w["ffn_norm"], cfg.norm_eps) @ w["w_gate_up"].T).chunk(2, dim=-1)
    return h + (F.silu(gate) * up) @ w["w_down"].T


def output_logits(cfg: ModelConfig, out_norm: torch.Tensor, head: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` next-token logits of the last hidden states ``h [..., dim]``: the final norm, then the output head ``[V, dim]``."""
    return rms_norm(h, out_norm, cfg.norm_eps) @ head.T


class LlamaModel(torch.nn.Module):
    """A Llama decoder whose attention is a pluggable backend.

    Args:
        config: the shapes.
        weights: GGUF-named tensors (``token_embd.weight``, ``blk.{i}.attn_q.weight``, …;
            :data:`LAYER_WEIGHTS`), Q/K rows in the rotate-half layout; an ``output.weight``
            is the output head, else the head is tied to the embedding.

    ``forward(tokens [B, L], cache, backend)`` runs positions ``cache.length …
    cache.length + L − 1``, writes their keys and values, advances ``cache.length`` and
    returns logits ``[B, L, vocab]``. ``backend(layer, q_pre, q_post, k_cache, v_cache,
    start)`` returns the attention output ``[B, Hq, L, D]`` (see :mod:`mac_llm.attention`).

    Example:
        >>> import torch
        >>> cfg = ModelConfig(n_layers=1, dim=16, n_heads=2, n_kv_heads=1, ffn_dim=32, vocab_size=10,
        ...                   context_length=32, rope_base=10000.0, norm_eps=1e-5)
        >>> model = LlamaModel.random(cfg, seed=0)
        >>> from mac_llm.attention import FullAttention
        >>> model(torch.tensor([[1, 2, 3]]), model.new_cache(1, 8), FullAttention()).shape
        torch.Size([1, 3, 10])
    """

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.config = config
        self.embed = torch.nn.Parameter(weights["token_embd.weight"], requires_grad=False)  # [V, dim]
        self.out_norm = torch.nn.Parameter(weights["output_norm.weight"], requires_grad=False)
        head = weights.get("output.weight")
        self.head = None if head is None else torch.nn.Parameter(head, requires_grad=False)  # [V, dim]; None: tied
        self.layers = torch.nn.ModuleList(
            torch.nn.ParameterDict({name: torch.nn.Parameter(t, requires_grad=False) for name, t in layer_weights(weights, i).items()})
            for i in range(config.n_layers)
        )

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0, device=None, dtype=torch.float32) -> "LlamaModel":
        """Random weights of the right scale (norms near 1, matrices that keep activations at
        unit scale), made on ``device`` in ``dtype``: a model for tests and benchmarks that need
        a shape, not a trained model (an 8B-shaped one is 16 GB in bf16, made on the GPU)."""
        gen = torch.Generator(device=device).manual_seed(seed)
        D, dim, ffn = config.head_dim, config.dim, config.ffn_dim
        shapes = {"attn_norm": (dim,), "attn_q": (config.n_heads * D, dim), "attn_k": (config.n_kv_heads * D, dim),
                  "attn_v": (config.n_kv_heads * D, dim), "attn_output": (dim, config.n_heads * D), "ffn_norm": (dim,),
                  "ffn_gate": (ffn, dim), "ffn_up": (ffn, dim), "ffn_down": (dim, ffn)}  # fmt: skip

        def draw(shape):
            w = torch.randn(shape, generator=gen, device=device, dtype=dtype)
            return w.mul_(0.1).add_(1.0) if len(shape) == 1 else w.mul_(shape[1] ** -0.5)

        weights = {"token_embd.weight": torch.randn(config.vocab_size, dim, generator=gen, device=device, dtype=dtype),
                   "output_norm.weight": draw((dim,))}  # fmt: skip
        for i in range(config.n_layers):
            for _, gguf, _ in LAYER_WEIGHTS:
                weights[f"blk.{i}.{gguf}.weight"] = draw(shapes[gguf])
        return cls(config, weights)

    def gguf_weights(self) -> dict[str, torch.Tensor]:
        """The weights by GGUF name (the constructor's ``weights``)."""
        weights = {"token_embd.weight": self.embed, "output_norm.weight": self.out_norm}
        if self.head is not None:
            weights["output.weight"] = self.head
        cfg = self.config
        for i, layer in enumerate(self.layers):
            D = cfg.head_dim
            wq, wk, wv = layer["wqkv"].split([cfg.n_heads * D, cfg.n_kv_heads * D, cfg.n_kv_heads * D])
            w_gate, w_up = layer["w_gate_up"].chunk(2)
            ours = dict(attn_norm=layer["attn_norm"], wq=wq, wk=wk, wv=wv, wo=layer["wo"], ffn_norm=layer["ffn_norm"], w_gate=w_gate,
                        w_up=w_up, w_down=layer["w_down"])  # fmt: skip
            weights.update({f"blk.{i}.{gguf}.weight": ours[name] for name, gguf, _ in LAYER_WEIGHTS})
        return {name: w.detach() for name, w in weights.items()}

    def converted(self, dtype: torch.dtype, device) -> "LlamaModel":
        """A copy with its weights in ``dtype`` on ``device`` (this model is left as it is), or
        the model itself when it is there already (no second copy of a large model)."""
        target, here = torch.device(device), self.embed.device
        if self.embed.dtype == dtype and here.type == target.type and target.index in (None, here.index):
            return self
        return LlamaModel(self.config, {name: w.to(dtype=dtype, device=device) for name, w in self.gguf_weights().items()})

    def rope_table(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` ``[*positions.shape, 1, D]`` float32, broadcast over the heads of :meth:`project`."""
        cos, sin = rope_angles(positions, self.config.head_dim, self.config.rope_base)
        return cos.float().unsqueeze(-2), sin.float().unsqueeze(-2)

    def project(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Layer ``i``'s :func:`project`: ``q_pre, q_post [..., Hq, D]``, ``k, v [..., Hkv, D]`` of ``h [..., dim]``."""
        return project(self.config, dict(self.layers[i]), h, cos, sin)

    def finish(self, i: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Layer ``i``'s :func:`finish`: ``h [..., dim]`` after ``W_o`` of ``attn [..., Hq, D]`` and the MLP."""
        return finish(self.config, dict(self.layers[i]), h, attn)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``[..., V]`` next-token logits of the last hidden states ``h [..., dim]``."""
        return output_logits(self.config, self.out_norm, self.output_head, h)

    @property
    def output_head(self) -> torch.Tensor:
        """``[V, dim]``: the output head, or the embedding when the two are tied."""
        return self.embed if self.head is None else self.head

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, cache: KVCache, backend) -> torch.Tensor:
        """Logits ``[B, L, V]`` of ``tokens [B, L]`` at positions ``cache.length …``; writes their keys and values."""
        B, L = tokens.shape
        start = cache.length
        if start + L > cache.capacity:
            raise ValueError(f"{start + L} positions do not fit the KV cache capacity {cache.capacity}")
        cos, sin = self.rope_table(torch.arange(start, start + L, device=tokens.device))  # [L, 1, D]
        h = self.embed[tokens]  # [B, L, dim]
        for i in range(self.config.n_layers):
            q_pre, q_post, k, v = (x.transpose(1, 2) for x in self.project(i, h, cos, sin))  # [B, H, L, D]
            cache.k[i][:, :, start : start + L] = k
            cache.v[i][:, :, start : start + L] = v
            o = backend(i, q_pre, q_post, cache.k[i], cache.v[i], start)  # [B, Hq, L, D]
            h = self.finish(i, h, o.transpose(1, 2))
        cache.length = start + L
        return self.logits(h)  # [B, L, V]

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self.config, batch, capacity, dtype=self.embed.dtype, device=self.embed.device)


__all__ = ["LAYER_WEIGHTS", "MODEL_WEIGHTS", "ModelConfig", "rms_norm", "KVCache", "layer_weights", "project", "finish", "output_logits", "LlamaModel"]
