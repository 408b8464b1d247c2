r"""Attention summaries and the two log-domain operators ⊕ (merge) and ⊖ (remove).

The *attention summary* of a query ``q`` over the keys ``[a, b)`` is the pair

.. math::

    A(q, [a, b)) = (o, \ell), \qquad
    \ell = \log \sum_{j=a}^{b-1} e^{s_j}, \qquad
    o = \sum_{j=a}^{b-1} \frac{e^{s_j}}{e^{\ell}}\, v_j, \qquad
    s_j = \text{scale}\cdot q \cdot k_j
    \quad\text{or, soft-capped at } c, \quad s_j = c \tanh(\text{scale}\cdot q \cdot k_j / c) .

``ℓ`` is a natural-log LSE. A summary depends on the keys only through their scores, so
⊕ and ⊖ hold for capped summaries unchanged. The empty summary (no keys) is ``(0, −inf)``;
it is the identity of ⊕ and every function here accepts and returns it without producing
NaN (spec: [summaries][spec-summaries], [⊕ merge][spec-merge], [⊖ remove][spec-remove]).

Precision: arithmetic runs in float32, or in float64 when an input is float64. ``o`` and
``ℓ`` come back in that compute dtype.
"""

from __future__ import annotations

import math

import torch

from mac_core.checks import cache_device_tensors, check_cache, check_same_device, check_tensor
from mac_core.kv import cache_lengths, read_keys
from mac_core.numerics import compute_dtype, removal_epsilon
from mac_core.interop import merge_state_with
from mac_core.step import Summary, empty_summary
from mac_core.numerics import softmax_scale

__all__ = ["Summary", "empty_summary", "attend", "merge", "merge_state", "merge_all", "remove", "removal_epsilon"]


def _bounds(x, shape: tuple[int, ...], device) -> torch.Tensor:
    """An int or integer tensor broadcastable to ``shape`` -> int64 tensor ``[*shape, 1]``."""
    x = torch.as_tensor(x, device=device)
    if x.is_floating_point():
        raise TypeError(f"range bounds must be integers, got {x.dtype}")
    try:
        return torch.broadcast_to(x.to(torch.int64), shape).unsqueeze(-1)
    except RuntimeError:
        raise ValueError(f"range bounds of shape {tuple(x.shape)} do not broadcast to q's leading shape {tuple(shape)}") from None


def attend(q, k, v, start, end, scale: float | None = None, softcap: float | None = None) -> Summary:
    r"""Attention summary of each query head over the key range ``[start, end)``.

    .. math:: A(q, [a, b)) = \Big(\textstyle\sum_{j=a}^{b-1} \mathrm{softmax}_j(s)\, v_j,\;
              \log\sum_{j=a}^{b-1} e^{s_j}\Big), \qquad
              s_j = \text{scale}\, q\cdot k_j \;\text{ or }\; c \tanh(\text{scale}\, q\cdot k_j / c)

    Query head ``h`` reads KV head ``h // (Hq // Hkv)`` (grouped-query attention). Keys
    and values outside every range of a request are never used, so an unwritten (even
    NaN) cache tail is harmless.

    Args:
        q: ``[B, Hq, D]`` post-RoPE queries, or ``[B, Hq, L, D]`` for ``L`` queries per head.
        k: ``[B, Hkv, T, D]`` post-RoPE keys; ``Hkv`` divides ``Hq``; or a
            :class:`~mac_core.kv.PagedKV` standing for them.
        v: ``[B, Hkv, T, D]`` values (a ``PagedKV`` of ``k``'s table when ``k`` is one).
        start: int or integer tensor broadcastable to ``q.shape[:-1]``: first key (inclusive).
        end: int or integer tensor broadcastable to ``q.shape[:-1]``: last key (exclusive).
            Ranges are clipped to ``[0, T)`` (to the keys a paged request holds); an empty
            range gives ``(0, −inf)``.
        scale: softmax scale, ``1/sqrt(D)`` by default.
        softcap: ``None`` (no cap) or the soft-cap ``c > 0`` of the scores (Gemma 2's
            ``attn_logit_softcapping``).

    Returns:
        ``Summary(o [*q.shape], lse [*q.shape[:-1]])`` in the compute dtype.
    """
    check_tensor("q", q)
    if q.dim() not in (3, 4):
        raise ValueError(f"q must have shape [B, Hq, D] or [B, Hq, L, D], got {tuple(q.shape)}")
    check_cache(k, v, q.shape[0], q.shape[1], q.shape[-1], names=("q", "k", "v"))
    check_same_device(q=q, **cache_device_tensors(k, v, names=("k", "v")))
    single = q.dim() == 3
    q4 = q.unsqueeze(2) if single else q  # [B, Hq, L, D]
    B, Hq, L, D = q4.shape
    Hkv, T = k.shape[1], k.shape[2]
    dtype = compute_dtype(q.dtype, k.dtype, v.dtype)
    scale = softmax_scale(D, scale)
    group = Hq // Hkv

    lo = _bounds(start, q.shape[:-1], q.device)  # [B, Hq(, L), 1]
    hi = _bounds(end, q.shape[:-1], q.device)
    if single:
        lo, hi = lo.unsqueeze(2), hi.unsqueeze(2)  # [B, Hq, 1, 1]
    hi = torch.minimum(hi, cache_lengths(k).view(B, 1, 1, 1))  # a paged request holds only its own keys
    # only the keys some range reads, [min start, max end): a band or tail need not scan the cache
    first, last = max(int(lo.min()), 0) if lo.numel() else 0, min(int(hi.max()), T) if hi.numel() else 0
    first = min(first, last)
    n_keys = last - first
    k, v = read_keys(k, first, last), read_keys(v, first, last)  # [B, Hkv, T', D]
    pos = torch.arange(first, last, device=q.device)  # [T'] key positions
    in_range = (pos >= lo) & (pos < hi)  # [B, Hq, L, T']

    qg = q4.to(dtype).reshape(B, Hkv, group, L, D)
    scores = torch.einsum("bkgld,bktd->bkglt", qg, k.to(dtype)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)  # before the mask: a capped −inf would be −c, not −inf
    scores = scores.reshape(B, Hq, L, n_keys).masked_fill(~in_range, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, L]; -inf where the range is empty
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(scores - lse_safe.unsqueeze(-1))  # [B, Hq, L, T']; exactly 0 outside the range

    # 0 * NaN is NaN: zero the values no range of the request touches
    used = in_range.flatten(1, 2).any(dim=1)  # [B, T']
    v_used = v.to(dtype).masked_fill(~used[:, None, :, None], 0.0)
    o = torch.einsum("bkglt,bktd->bkgld", p.reshape(B, Hkv, group, L, n_keys), v_used).reshape(B, Hq, L, D)
    if single:
        return Summary(o.squeeze(2), lse.squeeze(2))
    return Summary(o, lse)


def _check_pair(name_a: str, a: Summary, name_b: str, b: Summary) -> torch.dtype:
    """Check two summaries of one shape and device; return their compute dtype."""
    (o_a, l_a), (o_b, l_b) = a, b
    named = {f"{name_a}.o": o_a, f"{name_a}.lse": l_a, f"{name_b}.o": o_b, f"{name_b}.lse": l_b}
    for name, x in named.items():
        check_tensor(name, x)
    check_same_device(**named)
    if o_a.shape != o_b.shape or l_a.shape != l_b.shape or o_a.shape[:-1] != l_a.shape:
        raise ValueError(
            f"{name_a} and {name_b} must share o [..., D] and lse [...] shapes, got "
            f"{name_a}=({tuple(o_a.shape)}, {tuple(l_a.shape)}) and {name_b}=({tuple(o_b.shape)}, {tuple(l_b.shape)})"
        )
    return compute_dtype(o_a.dtype, o_b.dtype, l_a.dtype, l_b.dtype)


def merge(a: Summary, b: Summary) -> Summary:
    r"""⊕: the summary over the union of two disjoint key sets seen by the same query.

    .. math::
        \ell = \operatorname{logaddexp}(\ell_a, \ell_b), \qquad
        o = e^{\ell_a - \ell} o_a + e^{\ell_b - \ell} o_b

    Commutative, associative, with identity ``(0, −inf)``; ``(0,−inf) ⊕ (0,−inf)`` is
    ``(0,−inf)``. The weights are taken relative to a *finite* shift so that two empty
    inputs never meet as ``(−inf) − (−inf)``.

    Args:
        a, b: summaries with ``o [..., D]`` and ``lse [...]`` of one shape.

    Returns:
        The merged ``Summary`` in the compute dtype.

    Examples:
        Attention over the keys ``[0, 10)`` is the ⊕ of its parts ``[0, 4)`` and ``[4, 10)``,
        and the empty summary changes nothing:

        >>> import torch
        >>> from mac_ref import attend, empty_summary, merge
        >>> g = torch.Generator().manual_seed(0)
        >>> q = torch.randn(1, 2, 8, generator=g)             # [B, Hq, D]
        >>> k, v = torch.randn(2, 1, 1, 10, 8, generator=g)   # each [B, Hkv, T, D]
        >>> left, right = attend(q, k, v, 0, 4), attend(q, k, v, 4, 10)
        >>> whole = attend(q, k, v, 0, 10)
        >>> both = merge(left, right)
        >>> torch.allclose(both.o, whole.o), torch.allclose(both.lse, whole.lse)
        (True, True)
        >>> torch.equal(merge(left, empty_summary((1, 2), 8)).lse, left.lse)
        True
    """
    dtype = _check_pair("a", a, "b", b)
    o_a, l_a = a
    o_b, l_b = b
    l_a, l_b = l_a.to(dtype), l_b.to(dtype)
    shift = torch.maximum(l_a, l_b)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))  # finite even when both are empty
    w_a, w_b = torch.exp(l_a - shift), torch.exp(l_b - shift)  # in [0, 1]
    total = w_a + w_b
    lse = shift + torch.log(total)  # log(0) = -inf: empty stays empty
    inv = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
    o = (w_a * inv).unsqueeze(-1) * o_a.to(dtype) + (w_b * inv).unsqueeze(-1) * o_b.to(dtype)
    return Summary(o, lse)


def merge_state(v_a, s_a, v_b, s_b):
    """FlashInfer's ``merge_state``, same argument order and base-2 LSEs, through ⊕ ``merge``.

    Args:
        v_a, v_b: ``[seq_len, num_heads, head_dim]`` outputs over two disjoint KV segments.
        s_a, s_b: ``[seq_len, num_heads]`` float32 base-2 LSEs (FlashInfer's ``return_lse``).

    Returns:
        ``(V [seq_len, num_heads, head_dim] in v_a's dtype, S [seq_len, num_heads] float32 base 2)``.
        To merge a MAC summary, convert its natural-log LSE first:
        :func:`mac_core.interop.to_flashinfer`.

    Examples:
        The states of the keys ``[0, 4)`` and ``[4, 10)`` merge into the state of ``[0, 10)``
        (here one query, ``seq_len = 1``, and two heads):

        >>> import math, torch
        >>> from mac_core.interop import to_flashinfer
        >>> from mac_ref import attend, merge_state
        >>> g = torch.Generator().manual_seed(0)
        >>> q = torch.randn(1, 2, 8, generator=g)
        >>> k, v = torch.randn(2, 1, 1, 10, 8, generator=g)
        >>> v_a, s_a = to_flashinfer(attend(q, k, v, 0, 4))    # [1, 2, 8] and [1, 2], base 2
        >>> v_b, s_b = to_flashinfer(attend(q, k, v, 4, 10))
        >>> v_ab, s_ab = merge_state(v_a, s_a, v_b, s_b)
        >>> whole = attend(q, k, v, 0, 10)
        >>> torch.allclose(v_ab, whole.o), torch.allclose(s_ab, whole.lse / math.log(2))
        (True, True)
    """
    return merge_state_with(merge, v_a, s_a, v_b, s_b)


def merge_all(o: torch.Tensor, lse: torch.Tensor) -> Summary:
    r"""⊕ over a stack of summaries (for example the split-KV partial states of one query).

    .. math:: \ell = \log\sum_i e^{\ell_i}, \qquad o = \sum_i e^{\ell_i - \ell}\, o_i

    Args:
        o: ``[..., S, D]`` partial outputs.
        lse: ``[..., S]`` their LSEs; any of them may be ``-inf`` (empty).

    Returns:
        ``Summary(o [..., D], lse [...])``; ``(0, −inf)`` if every part is empty (or ``S = 0``).
    """
    check_tensor("o", o)
    check_tensor("lse", lse)
    check_same_device(o=o, lse=lse)
    if o.dim() < 2 or o.shape[:-1] != lse.shape:
        raise ValueError(f"o must be [..., S, D] and lse [..., S], got {tuple(o.shape)} and {tuple(lse.shape)}")
    dtype = compute_dtype(o.dtype, lse.dtype)
    lse = lse.to(dtype)
    total_lse = torch.logsumexp(lse, dim=-1)  # [...]; -inf when all parts are empty
    shift = torch.where(torch.isfinite(total_lse), total_lse, torch.zeros_like(total_lse))
    weights = torch.exp(lse - shift.unsqueeze(-1))  # [..., S]; all 0 when empty
    merged = (weights.unsqueeze(-1) * o.to(dtype)).sum(dim=-2)  # [..., D]
    return Summary(merged, total_lse)


def remove(total: Summary, part: Summary) -> tuple[Summary, torch.Tensor]:
    r"""⊖: remove the keys of ``part`` from ``total`` (``part`` ⊆ ``total``, same query).

    With :math:`\delta = \ell_{part} - \ell_{total} \le 0`:

    .. math::
        \ell = \ell_{total} + \log(-\operatorname{expm1}(\delta)), \qquad
        o = \frac{o_{total} - e^{\delta} o_{part}}{-\operatorname{expm1}(\delta)}

    The result is ill-conditioned as :math:`e^\delta \to 1` (the part holds nearly all the
    mass): its error grows like :math:`\varepsilon / (1 - e^\delta)`. Rules (spec:
    [⊖ remove][spec-remove]):

    * ``part`` empty: the result is ``total`` unchanged.
    * remainder share ``−expm1(δ) < removal_epsilon(dtype)``: the result is empty, flagged.
    * ``δ > 0`` (only possible through rounding, or ``total`` empty): empty, flagged.

    Args:
        total: ``Summary(o [..., D], lse [...])``.
        part: a summary of the same shape.

    Returns:
        ``(remainder, ill_conditioned)`` where ``ill_conditioned [...]`` is a bool mask of
        the entries that fell under one of the two flagged rules.

    Examples:
        Removing the keys ``[4, 10)`` from ``[0, 10)`` leaves ``[0, 4)``; removing all of
        them leaves the empty summary, flagged (nothing is left to divide by):

        >>> import torch
        >>> from mac_ref import attend, remove
        >>> g = torch.Generator().manual_seed(0)
        >>> q = torch.randn(1, 2, 8, generator=g)             # [B, Hq, D]
        >>> k, v = torch.randn(2, 1, 1, 10, 8, generator=g)   # each [B, Hkv, T, D]
        >>> whole, right = attend(q, k, v, 0, 10), attend(q, k, v, 4, 10)
        >>> rest, ill = remove(whole, right)
        >>> left = attend(q, k, v, 0, 4)
        >>> torch.allclose(rest.o, left.o, atol=1e-6), torch.allclose(rest.lse, left.lse), ill.any().item()
        (True, True, False)
        >>> nothing, ill = remove(whole, whole)
        >>> nothing.lse, ill
        (tensor([[-inf, -inf]]), tensor([[True, True]]))
    """
    dtype = _check_pair("total", total, "part", part)
    o_t, l_t = total
    o_p, l_p = part
    l_t, l_p = l_t.to(dtype), l_p.to(dtype)
    part_empty = torch.isneginf(l_p)
    # δ with finite stand-ins, so that empty inputs never form (−inf) − (−inf)
    delta = torch.where(part_empty, torch.full_like(l_p, -math.inf), l_p - torch.where(torch.isneginf(l_t), 0.0, l_t))
    delta = torch.where(torch.isneginf(l_t) & ~part_empty, torch.full_like(l_p, math.inf), delta)
    share = -torch.expm1(delta)  # remainder mass / total mass: 1 when part is empty
    ill_conditioned = ~part_empty & ((delta > 0) | (share < removal_epsilon(dtype)))

    keep = ~ill_conditioned
    safe_share = torch.where(keep, share, torch.ones_like(share))
    lse = torch.where(keep, l_t + torch.log(safe_share), torch.full_like(l_t, -math.inf))
    o = (o_t.to(dtype) - torch.exp(delta).unsqueeze(-1) * o_p.to(dtype)) / safe_share.unsqueeze(-1)
    o = torch.where(keep.unsqueeze(-1), o, torch.zeros_like(o))
    return Summary(o, lse), ill_conditioned
