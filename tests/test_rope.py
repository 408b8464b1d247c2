"""Stage 0: rotary embedding, rotate-half layout (docs/spec.md#spec-conventions)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mac_ref import apply_rope, invert_rope
from tolerances import assert_close

f64 = torch.float64

head_dims = st.sampled_from([2, 8, 16, 64])
bases = st.sampled_from([10000.0, 500000.0, 100.0])


def random_vectors(seed, *shape, dtype=f64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=f64).to(dtype)


def rope_complex(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE as complex multiplication: pair ``(x_i, x_{i+D/2})`` is ``z_i``, rotated by ``e^{i p θ_i}``."""
    half = x.shape[-1] // 2
    theta = base ** (-2.0 * torch.arange(half, dtype=f64) / x.shape[-1])  # [D/2]
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    rotated = z * torch.polar(torch.ones_like(theta), positions.double()[..., None] * theta)
    return torch.cat([rotated.real, rotated.imag], dim=-1)


@given(head_dim=head_dims, base=bases, seed=st.integers(0, 2**31))
def test_matches_the_complex_formulation(head_dim, base, seed):
    x = random_vectors(seed, 3, 5, head_dim)
    positions = torch.randint(0, 200_000, (3, 5), generator=torch.Generator().manual_seed(seed))
    assert_close(apply_rope(x, positions, base), rope_complex(x, positions, base), "rope")


@pytest.mark.parametrize("dtype", [f64, torch.float32])
@given(head_dim=head_dims, base=bases, seed=st.integers(0, 2**31))
def test_invert_recovers_pre_rope_and_norms_are_kept(dtype, head_dim, base, seed):
    x = random_vectors(seed, 4, 6, head_dim, dtype=dtype)
    positions = torch.randint(0, 130_000, (4, 6), generator=torch.Generator().manual_seed(seed))
    rotated = apply_rope(x, positions, base)
    assert rotated.dtype == dtype
    assert_close(invert_rope(rotated, positions, base), x, "rope")
    assert_close(rotated.norm(dim=-1), x.norm(dim=-1), "rope")


def test_position_zero_is_the_identity_and_positions_broadcast():
    x = random_vectors(0, 2, 3, 7, 8)
    assert torch.equal(apply_rope(x, 0), x)
    per_token = apply_rope(x, torch.arange(7))  # [T] broadcasts over [B, H, T]
    one_by_one = torch.stack([apply_rope(x[:, :, t], t) for t in range(7)], dim=2)
    assert_close(per_token, one_by_one, "rope")


@given(head_dim=head_dims, base=bases, shift=st.integers(-5000, 5000), seed=st.integers(0, 2**31))
def test_scores_depend_only_on_the_position_difference(head_dim, base, shift, seed):
    """``RoPE(q, m)·RoPE(k, n) = RoPE(q, m+s)·RoPE(k, n+s)``."""
    q, k = random_vectors(seed, 2, 16, head_dim)
    gen = torch.Generator().manual_seed(seed)
    m, n = torch.randint(5000, 20000, (2, 16), generator=gen)
    score = (apply_rope(q, m, base) * apply_rope(k, n, base)).sum(-1)
    shifted = (apply_rope(q, m + shift, base) * apply_rope(k, n + shift, base)).sum(-1)
    assert_close(shifted, score, "rope")
    # and the score is not position-free: a different gap changes it
    if head_dim >= 8:
        moved = (apply_rope(q, m + 1, base) * apply_rope(k, n, base)).sum(-1)
        assert (moved - score).abs().max() > 1e-6


def test_rope_uses_the_base():
    x = random_vectors(1, 4, 16)
    assert not torch.allclose(apply_rope(x, 7, 10000.0), apply_rope(x, 7, 500000.0))
    # the fastest pair (i = 0) turns by exactly p radians whatever the base
    e0 = torch.zeros(16, dtype=f64)
    e0[0] = 1.0
    turned = apply_rope(e0, 3, 777.0)
    assert_close(turned[[0, 8]], torch.tensor([math.cos(3), math.sin(3)], dtype=f64), "rope")
