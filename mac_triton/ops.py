r"""The decode step and the full decode as PyTorch custom ops, for ``torch.compile`` and CUDA graphs.

``torch.compile`` cannot trace into a Triton launcher written in Python: it would break the
graph there. Registered with ``torch.library``, each kernel sequence is one opaque node
with a *fake* implementation (output shapes and dtypes, no computation), so a compiled
model that calls it is one graph, and the op's body is the graph-capturable kernels of
:mod:`mac_triton.decode` (no host synchronisation). Two ops:

- ``torch.ops.mac_triton.mac_step``: :func:`mac_triton.decode.mac_step`; it writes the
  rings and resets the workspace's match keys in place (declared as mutated arguments);
- ``torch.ops.mac_triton.full_step``: :func:`mac_triton.decode.full_step`.

Ops take tensors and scalars only, so a cache travels as its tensors (a paged one as its
pages and table) and a configuration as the fields that pick kernels (its radii are the
workspace's tensors). :func:`mac_step` and :func:`full_step` here wrap them with the
signatures of their eager twins. Like the eager kernels they do not validate: check a
step once (:func:`mac_core.checks.check_step_inputs`, or one eager
:func:`~mac_triton.decode.decode_step`) and make a paged cache outside the compiled
region (building a :class:`~mac_core.kv.PagedKV` reads its table).

**Plan and run.** What FlashInfer's ``plan()`` does on the host, scheduling work from the
requests' lengths, happens inside the attend kernel here, from ``positions`` and the page
table on the device. So the split of a captured step is: *plan* is
``DecodeWorkspace.new`` and the buffers (positions, page table)
the graph reads, made once; *run* is the op, replayed after the caller writes new
positions and table entries into those buffers in place.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mac_core.config import MACConfig
from mac_core.kv import PagedKV, PageTable
from mac_core.rules import RULES
from mac_core.state import LayerState
from mac_core.step import StepStats
from mac_core.numerics import softmax_scale

from . import decode

CONTIGUOUS = "contiguous"
NO_CAP = 0.0  # ``softcap=None`` as an op argument (a float): MACConfig admits only caps c > 0


def _cache(cache: Tensor, indptr: Tensor | None, indices: Tensor | None, last_page_len: Tensor | None, layout: str):
    if layout == CONTIGUOUS:
        return cache
    return PagedKV.unchecked(cache, PageTable.unchecked(indptr, indices, last_page_len), layout)


def _cache_args(k_cache, v_cache) -> tuple:
    """``(k, v, indptr, indices, last_page_len, layout)``: a cache pair as op arguments."""
    if isinstance(k_cache, PagedKV):
        table = k_cache.table
        return k_cache.pages, v_cache.pages, table.indptr, table.indices, table.last_page_len, k_cache.layout
    return k_cache, v_cache, None, None, None, CONTIGUOUS


STATS = ("hit", "matched_pos", "distance", "keys_read", "context", "ill_conditioned", "chain_depth", "candidate", "mass_share")


@torch.library.custom_op("mac_triton::mac_step", mutates_args=("ring_q", "ring_o", "ring_lse", "ring_depth", "keys"))
def _mac_step_op(
    q_pre: Tensor, q_post: Tensor, k_cache: Tensor, v_cache: Tensor,
    kv_indptr: Tensor | None, kv_indices: Tensor | None, kv_last_page_len: Tensor | None, kv_layout: str,
    ring_q: Tensor, ring_o: Tensor, ring_lse: Tensor, ring_depth: Tensor, positions: Tensor,
    keys: Tensor, radius_sq: Tensor, rule_radius_sq: Tensor,
    band: int, sinks: int, min_context: int, max_chain: int, row_update: str, rule: str, per_group: bool,
    group_match: bool, scale: float, softcap: float, scan: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    # (``scan`` is mac_step's ``match``: Inductor's pattern matcher reserves that keyword)
    # the fields mac_step reads; τ (and τ_m) arrive as the workspace's radii
    config = MACConfig(
        window=ring_q.shape[2], band=band, sinks=sinks, min_context=min_context, max_chain=None if max_chain < 0 else max_chain,
        row_update=row_update, rule=RULES[rule](per_group=per_group), group_match=group_match,
        softcap=None if softcap == NO_CAP else softcap,
    )
    state = LayerState(ring_q, ring_o, ring_lse, ring_depth, positions)
    workspace = decode.DecodeWorkspace(keys, radius_sq, rule_radius_sq, config)
    k = _cache(k_cache, kv_indptr, kv_indices, kv_last_page_len, kv_layout)
    v = _cache(v_cache, kv_indptr, kv_indices, kv_last_page_len, kv_layout)
    out, lse, stats = decode.mac_step(q_pre, q_post, k, v, state, positions, config, scale, workspace, match=scan)
    return (out, lse, *(getattr(stats, name) for name in STATS))


@_mac_step_op.register_fake
def _(q_pre, q_post, k_cache, v_cache, kv_indptr, kv_indices, kv_last_page_len, kv_layout, ring_q, *args):
    B, Hq, D = q_pre.shape
    per_head = dict(dtype=torch.float32, device=q_pre.device)
    return (
        q_pre.new_empty(B, Hq, D), q_pre.new_empty(B, Hq, **per_head),
        *(q_pre.new_empty(B, Hq, dtype=dtype) for dtype in (torch.bool, torch.int64, torch.float32, torch.int64)),
        q_pre.new_empty(B, dtype=torch.int64),
        *(q_pre.new_empty(B, Hq, dtype=dtype) for dtype in (torch.bool, torch.int64, torch.bool, torch.float32)),
    )  # fmt: skip


@torch.library.custom_op("mac_triton::full_step", mutates_args=())
def _full_step_op(
    q_post: Tensor, k_cache: Tensor, v_cache: Tensor,
    kv_indptr: Tensor | None, kv_indices: Tensor | None, kv_last_page_len: Tensor | None, kv_layout: str,
    positions: Tensor, scale: float, softcap: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    k = _cache(k_cache, kv_indptr, kv_indices, kv_last_page_len, kv_layout)
    v = _cache(v_cache, kv_indptr, kv_indices, kv_last_page_len, kv_layout)
    return decode.full_step(q_post, k, v, positions, scale, softcap=None if softcap == NO_CAP else softcap)


@_full_step_op.register_fake
def _(q_post, *args):
    B, Hq, D = q_post.shape
    return q_post.new_empty(B, Hq, D), q_post.new_empty(B, Hq, dtype=torch.float32)


def mac_step(q_pre, q_post, k_cache, v_cache, state: LayerState, positions, config: MACConfig, scale: float,
             workspace: decode.DecodeWorkspace, match: bool = True):  # fmt: skip
    """:func:`mac_triton.decode.mac_step` through the custom op (default launch settings).

    Same arguments and results: ``(out [B, Hq, D], lse [B, Hq] float32, StepStats)``; the
    rings of ``state`` and ``workspace.keys`` are written in place.
    """
    max_chain = -1 if config.max_chain is None else config.max_chain
    out, lse, *stats = torch.ops.mac_triton.mac_step(
        q_pre, q_post, *_cache_args(k_cache, v_cache), state.ring_q, state.ring_o, state.ring_lse, state.ring_depth,
        positions, workspace.keys, workspace.radius_sq, workspace.rule_radius_sq, config.band, config.sinks,
        config.min_context, max_chain, config.row_update, config.rule.name, config.rule.per_group, config.group_match, scale,
        NO_CAP if config.softcap is None else config.softcap, match,
    )
    return out, lse, StepStats(**dict(zip(STATS, stats)))


def full_step(q_post, k_cache, v_cache, positions, scale: float | None = None, softcap: float | None = None):
    """:func:`mac_triton.decode.full_step` through the custom op: ``(out [B, Hq, D], lse [B, Hq])``."""
    scale = softmax_scale(q_post.shape[-1], scale)
    return torch.ops.mac_triton.full_step(q_post, *_cache_args(k_cache, v_cache), positions, scale, NO_CAP if softcap is None else softcap)
