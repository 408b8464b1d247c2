r"""⊕ and ⊖ over batches of attention summaries, in Triton.

Twin of :mod:`mac_ref.summary` (``merge``, ``merge_all``, ``remove``: same signatures,
same empty-summary rules, same ``removal_epsilon``). Where it differs:

- inputs are float16 / bfloat16 / float32 and the arithmetic is float32 (``mac_ref``
  also takes float64; here float64 is a ``TypeError``);
- rows are flattened to ``[N, D]`` and each program handles ``BLOCK_N`` of them
  (``merge``, ``remove``) or one row and its ``S`` parts in blocks of ``BLOCK_S`` with an
  online ⊕ (``merge_all``), so results agree with the reference to float32 rounding, not
  bitwise;
- ``expm1`` in ⊖ is a short polynomial near 0 (Triton has no portable ``expm1``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mac_core.numerics import removal_epsilon
from mac_core.interop import merge_state_with
from mac_core.step import Summary

from .numerics import LIMITS, merge_weights, online_finish, online_merge, remove_weights

BLOCK_N = 16
BLOCK_S = 16


@triton.jit
def _merge_kernel(o_a, l_a, o_b, l_b, o_out, l_out, N, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < N
    mask = row_mask[:, None] & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    lse_a = tl.load(l_a + rows, mask=row_mask, other=float("-inf")).to(tl.float32)
    lse_b = tl.load(l_b + rows, mask=row_mask, other=float("-inf")).to(tl.float32)
    w_a, w_b, lse = merge_weights(lse_a, lse_b)
    out_a = tl.load(o_a + offs, mask=mask, other=0.0).to(tl.float32)
    out_b = tl.load(o_b + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_out + offs, w_a[:, None] * out_a + w_b[:, None] * out_b, mask=mask)
    tl.store(l_out + rows, lse, mask=row_mask)


@triton.jit
def _merge_all_kernel(o_in, l_in, o_out, l_out, S, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    m = tl.full((), float("-inf"), tl.float32)
    den = tl.zeros((), tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        parts = s0 + tl.arange(0, BLOCK_S)
        part_mask = parts < S
        lse = tl.load(l_in + row * S + parts, mask=part_mask, other=float("-inf")).to(tl.float32)
        o = tl.load(
            o_in + (row * S + parts)[:, None] * D + cols[None, :],
            mask=part_mask[:, None] & (cols[None, :] < D),
            other=0.0,
        ).to(tl.float32)
        m, den, acc = online_merge(m, den, acc, lse, o)
    o, lse = online_finish(m, den, acc)
    tl.store(o_out + row * D + cols, o, mask=cols < D)
    tl.store(l_out + row, lse)


@triton.jit
def _remove_kernel(
    o_t, l_t, o_p, l_p, o_out, l_out, ill_out, N, eps, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < N
    mask = row_mask[:, None] & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    lse_t = tl.load(l_t + rows, mask=row_mask, other=float("-inf")).to(tl.float32)
    lse_p = tl.load(l_p + rows, mask=row_mask, other=float("-inf")).to(tl.float32)
    c_t, c_p, lse, ill = remove_weights(lse_t, lse_p, eps)
    out_t = tl.load(o_t + offs, mask=mask, other=0.0).to(tl.float32)
    out_p = tl.load(o_p + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_out + offs, c_t[:, None] * out_t - c_p[:, None] * out_p, mask=mask)
    tl.store(l_out + rows, lse, mask=row_mask)
    tl.store(ill_out + rows, ill.to(tl.int8), mask=row_mask)


def _rows(name: str, s: Summary) -> tuple[torch.Tensor, torch.Tensor]:
    """A summary as contiguous ``o [N, D]`` and ``lse [N]``, checked."""
    o, lse = s
    LIMITS.check_dtype(f"{name}.o", o)
    LIMITS.check_dtype(f"{name}.lse", lse)
    if o.dim() < 1 or o.shape[:-1] != lse.shape:
        raise ValueError(f"{name} must have o [..., D] and lse [...], got {tuple(o.shape)} and {tuple(lse.shape)}")
    return o.reshape(lse.numel(), o.shape[-1]).contiguous(), lse.reshape(-1).contiguous()


def _pair(a: Summary, b: Summary, names: tuple[str, str]):
    o_a, l_a = _rows(names[0], a)
    o_b, l_b = _rows(names[1], b)
    if a.o.shape != b.o.shape or a.o.device != b.o.device:
        raise ValueError(
            f"{names[0]} and {names[1]} must share o [..., D] and lse [...] shapes and a device, got "
            f"{tuple(a.o.shape)} on {a.o.device} and {tuple(b.o.shape)} on {b.o.device}"
        )
    return o_a, l_a, o_b, l_b


def merge(a: Summary, b: Summary) -> Summary:
    r"""⊕ of two summaries of the same queries over disjoint keys (see :func:`mac_ref.summary.merge`).

    Args:
        a, b: ``Summary(o [..., D], lse [...])`` of one shape.

    Returns:
        ``Summary(o [..., D], lse [...])`` in float32.
    """
    o_a, l_a, o_b, l_b = _pair(a, b, ("a", "b"))
    N, D = o_a.shape
    o = torch.empty(N, D, dtype=torch.float32, device=o_a.device)
    lse = torch.empty(N, dtype=torch.float32, device=o_a.device)
    if N:
        grid = (triton.cdiv(N, BLOCK_N),)
        _merge_kernel[grid](o_a, l_a, o_b, l_b, o, lse, N, D=D, BLOCK_N=BLOCK_N, BLOCK_D=triton.next_power_of_2(D))
    return Summary(o.view(a.o.shape), lse.view(a.lse.shape))


def merge_state(v_a, s_a, v_b, s_b):
    """FlashInfer's ``merge_state`` (its order, base-2 LSEs) through this ⊕ (see
    :func:`mac_ref.summary.merge_state`): ``(V in v_a's dtype, S float32 base 2)``.

    Examples:
        The reference's result, to float32 rounding (on a CPU under ``TRITON_INTERPRET=1``,
        set before ``triton`` is imported; on a GPU the tensors must be CUDA tensors):

        >>> import torch, mac_ref, mac_triton
        >>> from mac_core.interop import to_flashinfer
        >>> g = torch.Generator().manual_seed(0)
        >>> q = torch.randn(1, 2, 8, generator=g)
        >>> k, v = torch.randn(2, 1, 1, 10, 8, generator=g)
        >>> a = to_flashinfer(mac_ref.attend(q, k, v, 0, 4))    # keys [0, 4): (v_a, s_a)
        >>> b = to_flashinfer(mac_ref.attend(q, k, v, 4, 10))   # keys [4, 10): (v_b, s_b)
        >>> ours, ref = mac_triton.merge_state(*a, *b), mac_ref.merge_state(*a, *b)
        >>> torch.allclose(ours[0], ref[0], atol=1e-6), torch.allclose(ours[1], ref[1])
        (True, True)
    """
    return merge_state_with(merge, v_a, s_a, v_b, s_b)


def merge_all(o: torch.Tensor, lse: torch.Tensor) -> Summary:
    r"""⊕ over a stack of summaries (see :func:`mac_ref.summary.merge_all`).

    Args:
        o: ``[..., S, D]`` partial outputs.
        lse: ``[..., S]`` their LSEs (``-inf``: empty part).

    Returns:
        ``Summary(o [..., D], lse [...])`` in float32; ``(0, −inf)`` when every part is empty.
    """
    LIMITS.check_dtype("o", o)
    LIMITS.check_dtype("lse", lse)
    if o.dim() < 2 or o.shape[:-1] != lse.shape:
        raise ValueError(f"o must be [..., S, D] and lse [..., S], got {tuple(o.shape)} and {tuple(lse.shape)}")
    *lead, S, D = o.shape
    N = math.prod(lead)
    o_in = o.reshape(N, S, D).contiguous()
    l_in = lse.reshape(N, S).contiguous()
    o_out = torch.empty(N, D, dtype=torch.float32, device=o.device)
    l_out = torch.empty(N, dtype=torch.float32, device=o.device)
    if N:
        _merge_all_kernel[(N,)](o_in, l_in, o_out, l_out, S, D=D, BLOCK_S=BLOCK_S, BLOCK_D=triton.next_power_of_2(D))
    return Summary(o_out.view(*lead, D), l_out.view(lead))


def remove(total: Summary, part: Summary) -> tuple[Summary, torch.Tensor]:
    r"""⊖: remove ``part`` from ``total`` (see :func:`mac_ref.summary.remove` for the rules).

    Returns:
        ``(Summary(o [..., D], lse [...]) in float32, ill_conditioned [...] bool)``.
    """
    o_t, l_t, o_p, l_p = _pair(total, part, ("total", "part"))
    N, D = o_t.shape
    o = torch.empty(N, D, dtype=torch.float32, device=o_t.device)
    lse = torch.empty(N, dtype=torch.float32, device=o_t.device)
    ill = torch.empty(N, dtype=torch.int8, device=o_t.device)
    if N:
        grid = (triton.cdiv(N, BLOCK_N),)
        _remove_kernel[grid](
            o_t, l_t, o_p, l_p, o, lse, ill, N, removal_epsilon(torch.float32),
            D=D, BLOCK_N=BLOCK_N, BLOCK_D=triton.next_power_of_2(D),
        )
    return Summary(o.view(total.o.shape), lse.view(total.lse.shape)), ill.view(torch.bool).view(total.lse.shape)
