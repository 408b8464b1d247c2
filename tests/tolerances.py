r"""The one tolerance table of the test-suite: ``(operation, dtype) -> Tolerance``.

Every comparison in the tests goes through :func:`assert_close` (or reads a row with
:func:`tolerance`), so each band is written down exactly once. A row bounds the element
error ``|x − ref| ≤ atol + rtol·|ref|`` and, where set, the relative RMS error
``‖x − ref‖ / ‖ref‖ ≤ rel_rms``. ``dtype`` is the dtype of the *inputs* of the operation
(a bf16 decode step computes in float32 but inherits bf16 rounding of its inputs).

Operations:

``exact``
    A computation that is exact in real arithmetic, against the float64 oracle: ``attend``,
    ⊕, ``merge_all``, prefill, miss steps, and every exactness fact of the spec (docs/spec.md#spec-exactness). Bands follow
    its numerics section (docs/spec.md#spec-numerics: float32 ≲ 1e-5, bf16/fp16 1e-3 … 1e-2).
``remove``
    ⊖ of a part holding a share ``t`` of the total mass. Its error grows like
    ``ε / (1 − t)`` (see the removal probe in the project notes), so the row's ``atol`` is a
    *coefficient* ``c``: use :func:`removal_atol` for the bound at a given ``t``.
``rope``
    Rotary embedding and its inverse (angles are formed in float64), positions up to ~2e5.
``row_rules``
    ``split`` against ``subtract`` row updates over a long stream: the two agree in real
    arithmetic; ``subtract`` adds one ⊖ per step, whose rounding chains through reused rows.
``literal``
    ``mac_ref`` against the literal loop implementation of the decode step
    (docs/spec.md#spec-decode-step) in the tests.
``mac_drift``
    *Method* error, not rounding: MAC output against full attention on the synthetic
    correlated stream of ``test_drift.py``, per block of steps (``rel_rms``) and per element
    (``atol``). A bound on the reuse approximation, to catch drift that grows along a stream.

``model_logits``
    Next-token logits of the real model (``test_real_model.py``) along two exact paths.

``triton`` / ``triton_lse``
    ``mac_triton`` against ``mac_ref`` on identical inputs (outputs and rows / LSEs), keyed
    by the input dtype.

Adding a backend (the Triton path) means adding its rows here, not in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    """Error bounds of one (operation, dtype) row: element-wise and relative RMS."""

    rtol: float = 0.0
    atol: float = 0.0
    rel_rms: float | None = None


f64, f32, bf16, f16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

TOLERANCES: dict[tuple[str, torch.dtype], Tolerance] = {
    ("exact", f64): Tolerance(rtol=1e-10, atol=1e-12, rel_rms=1e-12),
    ("exact", f32): Tolerance(rtol=1e-5, atol=1e-5, rel_rms=1e-5),
    ("exact", f16): Tolerance(rtol=1e-2, atol=1e-2, rel_rms=3e-3),
    ("exact", bf16): Tolerance(rtol=5e-2, atol=5e-2, rel_rms=1e-2),
    # atol here is c in |error| ≤ c·ε·max|o|·(1 + |ℓ_total|) / (1 − t); see removal_atol
    ("remove", f64): Tolerance(atol=8.0),
    ("remove", f32): Tolerance(atol=8.0),
    # the angle p·θ is rounded by ε·p: 4e-11 at p = 2e5
    ("rope", f64): Tolerance(rtol=1e-10, atol=1e-10),
    ("rope", f32): Tolerance(rtol=1e-6, atol=1e-6),
    ("row_rules", f64): Tolerance(rtol=1e-10, atol=1e-12, rel_rms=1e-12),
    ("row_rules", f32): Tolerance(rtol=1e-4, atol=1e-5, rel_rms=1e-5),
    ("literal", f64): Tolerance(rtol=0.0, atol=1e-10),
    ("mac_drift", f32): Tolerance(atol=0.3, rel_rms=0.2),
    # logits of a 30-layer float32 model (SmolLM2-135M, |logit| ≤ ~40) along two attention
    # paths (SDPA vs the reference's dense attend; batched vs token by token): rounding
    # compounds over the layers, measured max 6e-5, relative RMS 8e-7
    ("model_logits", f32): Tolerance(rtol=1e-5, atol=5e-4, rel_rms=1e-5),
    # mac_triton against mac_ref on the same inputs: both compute in float32; the kernels
    # sum in another order and round p to the input dtype before p·V (as FlashAttention)
    ("triton", f32): Tolerance(rtol=1e-5, atol=1e-5, rel_rms=1e-5),
    ("triton", f16): Tolerance(rtol=1e-2, atol=1e-2, rel_rms=3e-3),
    ("triton", bf16): Tolerance(rtol=5e-2, atol=5e-2, rel_rms=1e-2),
    # ring rows of the subtract rule: one ⊖ per step amplifies the rounding of out by
    # 1 / (1 − tail share) and reused rows carry it on (seen on an H100: 2e-5 after 48 steps)
    ("triton_subtract", f32): Tolerance(rtol=1e-4, atol=1e-4, rel_rms=1e-5),
    ("triton_subtract", f16): Tolerance(rtol=1e-2, atol=1e-2, rel_rms=3e-3),
    ("triton_subtract", bf16): Tolerance(rtol=5e-2, atol=5e-2, rel_rms=1e-2),
    # its LSEs are float32 whatever the input dtype: float32 rounding of the score sums
    ("triton_lse", f32): Tolerance(rtol=1e-5, atol=1e-5),
    ("triton_lse", f16): Tolerance(rtol=1e-5, atol=1e-5),
    ("triton_lse", bf16): Tolerance(rtol=1e-5, atol=1e-5),
}


def tolerance(operation: str, dtype: torch.dtype) -> Tolerance:
    """The row of ``(operation, dtype)``; a missing row is an error, never a default."""
    try:
        return TOLERANCES[(operation, dtype)]
    except KeyError:
        raise KeyError(f"no tolerance for ({operation!r}, {dtype}) in tests/tolerances.py") from None


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖x − ref‖ / ‖ref‖`` in float64 (``inf`` if ``x`` has a NaN)."""
    x, ref = x.double().cpu(), ref.double().cpu()
    if torch.isnan(x).any():
        return float("inf")
    return ((x - ref).norm() / ref.norm()).item()


def max_abs(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |x − ref|`` in float64 (``inf`` if ``x`` has a NaN)."""
    x, ref = x.double().cpu(), ref.double().cpu()
    if torch.isnan(x).any():
        return float("inf")
    return (x - ref).abs().max().item() if x.numel() else 0.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, operation: str, dtype: torch.dtype | None = None, msg: str = ""):
    """Assert ``actual ≈ expected`` under the row ``(operation, dtype)`` (default: ``actual.dtype``).

    NaN never passes; infinities must match exactly (an empty summary's ``-inf`` LSE).
    The relative RMS bound, where the row has one, is checked over the finite entries.
    """
    tol = tolerance(operation, actual.dtype if dtype is None else dtype)
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{msg} NaN in the result"
    torch.testing.assert_close(actual, expected, rtol=tol.rtol, atol=tol.atol, equal_nan=False, msg=lambda m: f"{msg} {m}")
    if tol.rel_rms is not None:
        finite = torch.isfinite(expected)
        if expected[finite].norm() > 0:
            err = rel_rms(actual[finite], expected[finite])
            assert err <= tol.rel_rms, f"{msg} relative RMS error {err:.3e} > {tol.rel_rms:.1e}"


def removal_atol(removed_mass: torch.Tensor, total_lse: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    r"""Absolute error bound ``[...]`` of ⊖ when the removed part holds a share ``t`` of the mass.

    .. math:: \text{atol}(t) = c\,\varepsilon\,\text{scale}\,(1 + |\ell_{total}|) / (1 - t)

    ``δ = ℓ_part − ℓ_total`` carries a rounding error ``ε·|ℓ|`` and ``1 − e^δ`` amplifies
    it by ``1 / (1 − t)``. ``c`` is the ``("remove", dtype)`` row, ``ε`` the dtype's machine
    epsilon and ``scale`` the magnitude of the outputs (``max |o|`` of the inputs).
    """
    c = tolerance("remove", dtype).atol
    eps = torch.finfo(dtype).eps
    return c * eps * scale * (1.0 + total_lse.double().abs()) / (1.0 - removed_mass.double())
