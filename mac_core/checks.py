"""Input validation: every public entry point of both backends checks its arguments here, once.

Errors name the argument and what was expected, so a wrong call fails loudly instead of
producing a silent NaN or a wrong answer. :func:`check_step_inputs` is the whole contract
of a decode step; each backend states what it accepts beyond it with a :class:`BackendLimits`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import MACConfig
from .kv import PagedKV, cache_lengths


def check_tensor(name: str, x, ndim: int | None = None, shape_hint: str = "") -> torch.Tensor:
    """Check that ``x`` is a floating-point tensor of rank ``ndim``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        hint = f" {shape_hint}" if shape_hint else ""
        raise ValueError(f"{name} must have {ndim} dimensions{hint}, got shape {tuple(x.shape)}")
    return x


def check_int_tensor(name: str, x, shape: tuple[int, ...]) -> torch.Tensor:
    """Check that ``x`` is an int32 or int64 tensor of the given shape."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers, got {type(x).__name__}")
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must have dtype int32 or int64, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return x


def check_same_device(**tensors) -> None:
    """Check that all tensors (``None`` entries are skipped) live on one device."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


@dataclass(frozen=True)
class BackendLimits:
    """What a backend accepts beyond the step's contract.

    Attributes:
        name: the backend, for error messages.
        dtypes: the input dtypes it computes from; ``None``: any floating dtype.
        row_dtype: the dtype its rings' rows (``ring_o``, ``ring_lse``) must have; ``None``:
            the compute dtype of the queries (:func:`mac_core.numerics.compute_dtype`).
        contiguous_head_dim: inputs must have stride 1 in their last (head) dimension.
    """

    name: str
    dtypes: tuple[torch.dtype, ...] | None = None
    row_dtype: torch.dtype | None = None
    contiguous_head_dim: bool = False

    def check_dtype(self, name: str, x: torch.Tensor) -> None:
        if self.dtypes is not None and x.dtype not in self.dtypes:
            names = [str(d).removeprefix("torch.") for d in self.dtypes]
            allowed = ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]
            raise TypeError(f"{name} must be {allowed} for {self.name} (mac_ref handles {x.dtype}), got {x.dtype}")
        if self.contiguous_head_dim and x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dimension for {self.name}")


REFERENCE = BackendLimits("mac_ref")


def check_cache(
    k_cache, v_cache, batch: int, q_heads: int, head_dim: int, limits: BackendLimits = REFERENCE,
    names: tuple[str, str, str] = ("q_pre", "k_cache", "v_cache"),
) -> None:
    """``k_cache`` and ``v_cache``: ``[B, Hkv, T, D]`` floats of one shape (and dtype where the
    backend needs it), ``Hkv`` dividing ``Hq``; or two :class:`~mac_core.kv.PagedKV` of one
    table, layout and pages shape standing for such a cache."""
    q_name, k_name, v_name = names
    paged = isinstance(k_cache, PagedKV)
    if paged != isinstance(v_cache, PagedKV):
        raise TypeError(
            f"{k_name} and {v_name} must both be tensors or both PagedKV, got {type(k_cache).__name__} and {type(v_cache).__name__}"
        )
    if paged:
        if k_cache.layout != v_cache.layout:
            raise ValueError(f"{k_name} and {v_name} must share a page layout, got {k_cache.layout} and {v_cache.layout}")
        if k_cache.pages.shape != v_cache.pages.shape:
            raise ValueError(f"{k_name}.pages and {v_name}.pages must have one shape, got {tuple(k_cache.pages.shape)} and {tuple(v_cache.pages.shape)}")
        if not k_cache.table.same_as(v_cache.table):
            raise ValueError(f"{k_name} and {v_name} must share one page table")
        k_tensor, v_tensor = k_cache.pages, v_cache.pages
    else:
        k_tensor = check_tensor(k_name, k_cache, 4, "[B, Hkv, T, D]")
        v_tensor = check_tensor(v_name, v_cache, 4, "[B, Hkv, T, D]")
        if k_cache.shape != v_cache.shape:
            raise ValueError(f"{k_name} and {v_name} must have one shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    B, Hkv, _, D = k_cache.shape
    if B != batch or D != head_dim:
        kind = " (paged: B from its table, Hkv and D from its pages)" if paged else ""
        raise ValueError(f"{k_name} must have shape [B={batch}, Hkv, T, D={head_dim}]{kind}, got {tuple(k_cache.shape)}")
    if Hkv == 0 or q_heads % Hkv != 0:
        raise ValueError(f"the number of query heads of {q_name} ({q_heads}) must be a multiple of the KV heads of {k_name} ({Hkv})")
    if paged:
        k_name, v_name = f"{k_name}.pages", f"{v_name}.pages"
    limits.check_dtype(k_name, k_tensor)
    limits.check_dtype(v_name, v_tensor)
    if limits.dtypes is not None and k_tensor.dtype != v_tensor.dtype:
        raise TypeError(f"{k_name} and {v_name} must share a dtype for {limits.name}, got {k_tensor.dtype} and {v_tensor.dtype}")


def cache_device_tensors(k_cache, v_cache, names: tuple[str, str] = ("k_cache", "v_cache")) -> dict:
    """The tensors of a cache pair, named, for :func:`check_same_device`."""
    k_name, v_name = names
    if isinstance(k_cache, PagedKV):
        return {f"{k_name}.pages": k_cache.pages, f"{v_name}.pages": v_cache.pages, "page table": k_cache.table.indptr}
    return {k_name: k_cache, v_name: v_cache}


def check_positions_in_cache(positions, k_cache) -> None:
    """Key ``positions[b]`` must be one request ``b``'s cache holds."""
    lengths = cache_lengths(k_cache)
    if bool((positions >= lengths).any()) or bool((positions < 0).any()):
        if isinstance(k_cache, PagedKV):
            raise ValueError(f"positions {positions.tolist()} must lie below each request's paged KV length {lengths.tolist()}")
        raise ValueError(f"positions {positions.tolist()} must lie in [0, {k_cache.shape[2]}), the KV cache capacity")


def check_query(name: str, q, like: torch.Tensor | None, ndim: int, hint: str, limits: BackendLimits) -> None:
    """A query tensor of rank ``ndim`` (and, given ``like``, of its shape)."""
    check_tensor(name, q, ndim, hint)
    if like is not None and q.shape != like.shape:
        raise ValueError(f"{name} must have q_pre's shape {tuple(like.shape)}, got {tuple(q.shape)}")
    limits.check_dtype(name, q)


def check_step_inputs(q_pre, k_cache, v_cache, state, positions, config, q_post=None, limits: BackendLimits = REFERENCE) -> None:
    """Validate the arguments of a decode step: the one check of both backends' ``decode_step``.

    Raises:
        TypeError: a non-tensor, a non-float tensor, integer positions of another dtype, a
            dtype the backend does not take.
        ValueError: wrong rank or shape, mixed devices, a state of another shape or window,
            a ``radius_scale`` of another length than ``Hq``, a position beyond the cache
            capacity, or a step that does not follow the previous one
            (``positions != state.next_pos``).
    """
    check_query("q_pre", q_pre, None, 3, "[B, Hq, D]", limits)
    B, Hq, D = q_pre.shape
    if q_post is not None:
        check_query("q_post", q_post, q_pre, 3, "[B, Hq, D]", limits)
    check_cache(k_cache, v_cache, B, Hq, D, limits)
    check_int_tensor("positions", positions, (B,))
    check_same_device(
        q_pre=q_pre, **cache_device_tensors(k_cache, v_cache), positions=positions, ring_q=state.ring_q,
        ring_depth=state.ring_depth, q_post=q_post,
    )
    W = config.window
    if tuple(state.ring_q.shape) != (B, Hq, W, D):
        raise ValueError(f"state.ring_q must have shape [B={B}, Hq={Hq}, W={W}, D={D}], got {tuple(state.ring_q.shape)}")
    if tuple(state.ring_depth.shape) != (B, Hq, W) or state.ring_depth.dtype != torch.int32:
        raise ValueError(
            f"state.ring_depth must be int32 of shape [B={B}, Hq={Hq}, W={W}], got {state.ring_depth.dtype} {tuple(state.ring_depth.shape)}"
        )
    _check_rows(state, q_pre, limits)
    config.check_heads(Hq)
    check_positions_in_cache(positions, k_cache)
    if not torch.equal(positions.to(torch.int64), state.next_pos):
        raise ValueError(
            f"positions {positions.tolist()} do not follow the previous step: the state expects {state.next_pos.tolist()}"
        )


def _check_rows(state, q_pre, limits: BackendLimits) -> None:
    if limits.dtypes is None:  # the reference keeps whatever dtypes the state was made with
        return
    if state.ring_q.dtype != q_pre.dtype:
        raise TypeError(f"state.ring_q must have q_pre's dtype {q_pre.dtype} for {limits.name}, got {state.ring_q.dtype}")
    if state.ring_o.dtype != limits.row_dtype or state.ring_lse.dtype != limits.row_dtype:
        raise TypeError(
            f"state.ring_o and state.ring_lse must be {limits.row_dtype} for {limits.name}, "
            f"got {state.ring_o.dtype} and {state.ring_lse.dtype}"
        )
    for name in ("ring_q", "ring_o", "ring_depth"):
        if getattr(state, name).stride(-1) != 1:
            raise ValueError(f"state.{name} must be contiguous in its last dimension for {limits.name}")


def check_prefill_inputs(q_pre, k_cache, v_cache, prompt_lengths, q_post=None) -> torch.Tensor:
    """Validate a prefill; returns ``prompt_lengths`` as a ``[B]`` int64 tensor (an int is broadcast)."""
    check_tensor("q_pre", q_pre, 4, "[B, Hq, L, D]")
    B, Hq, L, D = q_pre.shape
    check_cache(k_cache, v_cache, B, Hq, D)
    if q_post is not None:
        check_query("q_post", q_post, q_pre, 4, "[B, Hq, L, D]", REFERENCE)
    if isinstance(prompt_lengths, int) and not isinstance(prompt_lengths, bool):
        prompt_lengths = torch.full((B,), prompt_lengths, dtype=torch.int64, device=q_pre.device)
    check_int_tensor("prompt_lengths", prompt_lengths, (B,))
    check_same_device(q_pre=q_pre, **cache_device_tensors(k_cache, v_cache), prompt_lengths=prompt_lengths, q_post=q_post)
    if not isinstance(k_cache, PagedKV) and L > k_cache.shape[2]:
        raise ValueError(f"q_pre has {L} positions, more than the KV cache capacity {k_cache.shape[2]}")
    if bool((prompt_lengths < 0).any()) or bool((prompt_lengths > L).any()):
        raise ValueError(f"prompt_lengths {prompt_lengths.tolist()} must lie in [0, {L}] (L = q_pre.shape[2])")
    if isinstance(k_cache, PagedKV) and bool((prompt_lengths > k_cache.lengths()).any()):
        raise ValueError(f"prompt_lengths {prompt_lengths.tolist()} must not exceed each request's paged KV length {k_cache.lengths().tolist()}")
    return prompt_lengths.to(torch.int64)


def check_attention_inputs(q_post, k_cache, v_cache, positions, limits: BackendLimits = REFERENCE) -> None:
    """Validate a full-attention decode: ``q_post [B, Hq, D]``, a ``[B, Hkv, T, D]`` cache and
    positions ``[B]`` in ``[0, T)``."""
    check_query("q_post", q_post, None, 3, "[B, Hq, D]", limits)
    B, Hq, D = q_post.shape
    check_cache(k_cache, v_cache, B, Hq, D, limits, names=("q_post", "k_cache", "v_cache"))
    check_int_tensor("positions", positions, (B,))
    check_same_device(q_post=q_post, **cache_device_tensors(k_cache, v_cache), positions=positions)
    check_positions_in_cache(positions, k_cache)


def check_verify_inputs(q_post, k_cache, v_cache, positions, config, limits: BackendLimits = REFERENCE) -> None:
    """Validate a verify pass: ``q_post [B, Hq, L, D]``, a dense ``[B, Hkv, T, D]`` cache,
    ``positions [B]`` with ``positions + L ≤ T``, a ``MACConfig``."""
    check_query("q_post", q_post, None, 4, "[B, Hq, L, D]", limits)
    B, Hq, L, D = q_post.shape
    if L < 1:
        raise ValueError(f"q_post must hold at least one query per head (L >= 1), got shape {tuple(q_post.shape)}")
    if not isinstance(k_cache, torch.Tensor):
        raise TypeError(f"k_cache must be a dense [B, Hkv, T, D] tensor for the verify pass (paged KV is not supported), got {type(k_cache).__name__}")
    check_cache(k_cache, v_cache, B, Hq, D, limits, names=("q_post", "k_cache", "v_cache"))
    check_int_tensor("positions", positions, (B,))
    check_same_device(q_post=q_post, k_cache=k_cache, v_cache=v_cache, positions=positions)
    check_positions_in_cache(positions + (L - 1), k_cache)  # the block's last query, too
    if not isinstance(config, MACConfig):
        raise TypeError(f"config must be a MACConfig, got {type(config).__name__}")


def check_group(q_heads: int, kv_heads: int | None) -> int:
    """The group size ``Hq / Hkv`` of a group match; a ``ValueError`` naming ``kv_heads`` otherwise."""
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads <= 0 or q_heads % kv_heads:
        raise ValueError(f"kv_heads must be a positive divisor of Hq = {q_heads} for MACConfig.group_match, got {kv_heads!r}")
    return q_heads // kv_heads
