r"""Decoding runs of a real model, with full attention or MAC-Attention in every layer.

The runtime of the demo, the fidelity study and the tests:

- :func:`prefill`: one shared full-attention prompt pass (a MAC prefill *is* full
  attention) that keeps each layer's last prompt queries to seed rings from;
- :func:`mac_continuation`: a fresh MAC backend continuing a prefilled cache, its rings
  seeded (and radii calibrated, if the configuration says so) per layer;
- :func:`greedy_decode` (free generation) and :func:`forced_decode` (teacher forcing);
- :func:`default_prose` and :func:`module_docstrings`: English text that ships with Python.

Comparing the runs: :mod:`mac_llm.fidelity`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mac_core import MACConfig

from .attention import FullAttention, MACAttention, causal_block_attention
from .llama import KVCache, LlamaModel

def default_prose() -> str:
    """English prose shipped with Python: the pydoc topics (language reference), in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def module_docstrings(min_chars: int = 200) -> str:
    """A second English source shipped with Python: the docstrings of the standard library's
    modules, what ``pydoc`` shows of them: the module's docstring, then those of its public
    classes, functions and methods, in source order; modules in name order.

    Read from the modules' source files without importing them (no side effects), public
    top-level modules and packages only; docstrings shorter than ``min_chars`` are left out.
    """
    import ast
    import importlib.util
    import sys

    texts = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in ("this", "antigravity", "idlelib", "test"):
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        origin = getattr(spec, "origin", None) if spec else None
        if not origin or not origin.endswith(".py"):
            continue  # built into the interpreter or an extension module: no source to read
        try:
            tree = ast.parse(open(origin, encoding="utf-8").read())
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        docs = [ast.get_docstring(tree)]
        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                docs.append(ast.get_docstring(node))
        docs = [d.strip() for d in docs if d and len(d) >= min_chars]
        if docs:
            texts.append(f"{name}\n\n" + "\n\n".join(docs))
    return "\n\n".join(texts)


class PromptCapture(FullAttention):
    """Full attention that keeps the last ``keep`` prompt queries of every layer (to seed rings later)."""

    def __init__(self, keep: int):
        self.keep = keep
        self.queries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, layer, q_pre, q_post, k_cache, v_cache, start):
        self.queries[layer] = (q_pre[:, :, -self.keep :].clone(), q_post[:, :, -self.keep :].clone())
        return super().__call__(layer, q_pre, q_post, k_cache, v_cache, start)


@dataclass
class Prefilled:
    """The state after a full-attention prompt, shared by every run that continues it.

    Attributes:
        cache: the KV cache with the prompt written.
        last_logits: ``[B, V]`` logits at the last prompt position.
        queries: per layer ``(q_pre, q_post)``, each ``[B, Hq, keep, D]`` (the prompt's end).
    """

    cache: KVCache
    last_logits: torch.Tensor
    queries: dict[int, tuple[torch.Tensor, torch.Tensor]]

    @property
    def prompt_len(self) -> int:
        return self.cache.length


def prefill(model: LlamaModel, prompt: torch.Tensor, capacity: int, keep: int = 1024, requests_per_pass: int | None = None) -> Prefilled:
    """Run the prompt ``[B, n]`` with full attention into a cache of ``capacity`` positions.

    ``requests_per_pass`` runs the requests a few at a time (the same result, less memory:
    a causal pass over ``n`` tokens holds ``[B, Hq, n, n]`` scores); ``None``: all at once.
    """
    B = prompt.shape[0]
    if requests_per_pass is None or requests_per_pass >= B:
        capture = PromptCapture(keep)
        cache = model.new_cache(B, capacity)
        logits = model(prompt, cache, capture)
        return Prefilled(cache, logits[:, -1], capture.queries)
    parts = [prefill(model, prompt[lo : lo + requests_per_pass], capacity, keep) for lo in range(0, B, requests_per_pass)]
    cache = model.new_cache(B, capacity)
    cache.k = [torch.cat([p.cache.k[layer] for p in parts]) for layer in range(model.config.n_layers)]
    cache.v = [torch.cat([p.cache.v[layer] for p in parts]) for layer in range(model.config.n_layers)]
    cache.length = prompt.shape[1]
    queries = {layer: tuple(torch.cat(qs) for qs in zip(*(p.queries[layer] for p in parts))) for layer in parts[0].queries}
    return Prefilled(cache, torch.cat([p.last_logits for p in parts]), queries)


def mac_continuation(model: LlamaModel, prefilled: Prefilled, config: MACConfig, **kwargs):
    """A fresh ``(MACAttention, KVCache)`` continuing ``prefilled``: rings seeded per layer."""
    backend = MACAttention(config, model.config.n_layers, **kwargs)
    cache = prefilled.cache.clone()
    for layer, (q_pre, q_post) in prefilled.queries.items():
        backend.seed(layer, q_pre, q_post, cache.k[layer], cache.v[layer], prefilled.prompt_len)
    return backend, cache


def _steps(n: int, progress: bool, desc: str):
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc, unit="tok", leave=False)


def forced_decode(model, cache, backend, tokens: torch.Tensor, progress: bool = False, desc: str = "decode") -> torch.Tensor:
    """Feed ``tokens [B, N]`` one at a time (teacher forcing); returns logits ``[B, N, V]``."""
    return torch.cat([model(tokens[:, i : i + 1], cache, backend) for i in _steps(tokens.shape[1], progress, desc)], dim=1)


def greedy_decode(model, cache, backend, first_logits: torch.Tensor, n: int, progress: bool = False, desc: str = "decode"):
    """Greedy generation of ``n`` tokens after a prompt whose last logits are ``first_logits [B, V]``.

    Returns:
        ``(tokens [B, n], logits [B, n, V])``; ``logits[:, i]`` is the distribution after
        ``tokens[:, i]`` (it chooses ``tokens[:, i+1]``).
    """
    token = first_logits.argmax(-1, keepdim=True)  # [B, 1]
    tokens, logits = [], []
    for _ in _steps(n, progress, desc):
        tokens.append(token)
        logits.append(model(token, cache, backend))
        token = logits[-1][:, -1].argmax(-1, keepdim=True)
    return torch.cat(tokens, dim=1), torch.cat(logits, dim=1)


def full_block_logits(model: LlamaModel, prefilled: Prefilled, tokens: torch.Tensor) -> torch.Tensor:
    """Full-attention logits ``[B, N, V]`` of ``tokens [B, N]`` after the prompt, in one pass."""
    return model(tokens, prefilled.cache.clone(), FullAttention())


__all__ = [
    "default_prose", "module_docstrings", "PromptCapture", "Prefilled", "prefill", "mac_continuation", "forced_decode",
    "greedy_decode", "full_block_logits", "causal_block_attention",
]  # fmt: skip
