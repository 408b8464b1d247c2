"""The GPU benchmarks' shared harness (``benchmarks/harness.py``), at a tiny size on the CPU.

What the benchmark numbers rest on: the planted rings give exactly the planted hit rate,
and the ring-restoring step leaves every replay the same step (same hits, same output,
same rings afterwards), so a CUDA-graph median times one step over and over.
"""

import pytest
import torch

from mac_core import MACConfig
from triton_cases import DEVICE

harness = pytest.importorskip("benchmarks.harness")
pytestmark = pytest.mark.interpreter


@pytest.mark.parametrize("hit_rate", [0.0, 0.5, 1.0])
def test_planted_hits_and_a_ring_restoring_step_repeat_exactly(hit_rate):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    batch, hkv, q_heads, head_dim, ctx, window = 2, 2, 4, 32, 96, 16
    positions, k, v, q_pre, q_post = harness.step_inputs(hkv, batch, ctx, gen, q_heads=q_heads, head_dim=head_dim, dtype=torch.float32)
    state, n_hit = harness.planted_state(q_pre, window, ctx - 1, hit_rate, gen, lag=4)
    assert n_hit == round(hit_rate * batch * q_heads)
    config = MACConfig(window=window, band=8, tau=0.45)
    step = harness.ring_restoring_step(q_pre, q_post, k, v, state, positions, config)
    runs = []
    for _ in range(2):
        out, lse, stats = step()
        runs.append((out, lse, stats.hit, stats.matched_pos, state.ring_q.clone(), state.ring_o.clone()))
    assert stats.hit.float().mean().item() == pytest.approx(n_hit / (batch * q_heads))
    assert (stats.matched_pos[stats.hit] == ctx - 1 - 4).all()  # the planted row, lag 4
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_a_launch_variant_changes_the_named_fields_of_the_step_and_of_the_match_scan():
    """``bench_model --launch``: ``name=value`` sets a ``Launch`` field, ``match_name=value`` a
    ``MatchLaunch`` field, the rest stay the defaults; an unknown name is refused by name."""
    import argparse
    import dataclasses

    from mac_triton import launch_for, match_launch_for

    bench_model = pytest.importorskip("benchmarks.bench_model")
    variants = bench_model.parse_launches("match_block_w=64,warps=4;stages=2")
    step, match = bench_model.launch_variant(f"mac_mass@{variants[0]}", 192, 64)
    assert step == dataclasses.replace(launch_for(192, 64), warps=4) and match == dataclasses.replace(match_launch_for(64), block_w=64)
    assert bench_model.launch_variant(f"mac_mass@{variants[1]}", 192, 64)[1] == match_launch_for(64)
    assert bench_model.launch_variant("sdpa", 192, 64) == (None, None)
    with pytest.raises(argparse.ArgumentTypeError, match="match_foo"):
        bench_model.parse_launches("match_foo=3")
