"""Launch settings of the kernels: every tuned constant in one place, passed to the launchers.

The attend and reduce kernels of a decode step take a :class:`Launch`; the match scan a
:class:`MatchLaunch`. The defaults are the best of ``benchmarks/tune_decode.py``, which
sweeps them by passing other settings to the launchers (``benchmarks/RESULTS.md`` has the
runs behind them).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Launch:
    """Launch parameters of the attend and reduce kernels.

    Attributes:
        block_n: keys per tile (fewer where a tile would pass 32 KB).
        min_chunk: fewest keys (cost units) per program.
        unit_cost: a unit's fixed cost in keys when the work is split (``mac_triton.plan``).
        programs_per_sm: attend programs per streaming multiprocessor.
        warps: warps per attend program.
        stages: software-pipelining stages of the attend loop.
        reduce_units: partial states the reduce kernel merges per iteration.
        prefix_per_sm: prefix-kernel programs per streaming multiprocessor, spread over the
            groups (a verifying rule's rejected prefixes): each group's prefix is split into up
            to ``cdiv(prefix_per_sm · SMs, B·Hkv)`` pieces. Only the rejected groups' programs
            read keys, so it is sized for a fraction of the groups.
        prefix_warps: warps per prefix-kernel program (one long piece of keys each).
    """

    block_n: int
    min_chunk: int
    unit_cost: int
    programs_per_sm: int
    warps: int
    stages: int
    reduce_units: int
    prefix_per_sm: int
    prefix_warps: int


# the best of benchmarks/tune_decode.py on an H200 (Hq 32, Hkv 8, D 128, bf16; full decodes
# and all-hit MAC steps at batch 1 and 16, contexts 8K and 128K); see benchmarks/RESULTS.md
# (a group's miss span is split into hundreds of units at batch 1, a handful at batch 16).
# prefix_per_sm (WIDE): an A/B end to end on an H100 (SmolLM2, 8K, compiled; results/h100_prefix_ab/model.csv):
# the mass rule's step took 5.76 / 5.26 / 5.17 ms at batch 64 and 3.99 / 3.61 / 3.58 ms at batch 32 with
# 2 / 8 / 16 programs per SM. With 2 (up to 2 pieces a group at batch 64) the quarter to half of the groups
# that are rejected left about one program per SM streaming keys; only those groups' programs read.
WIDE = Launch(block_n=128, min_chunk=128, unit_cost=512, programs_per_sm=1, warps=8, stages=3, reduce_units=16, prefix_per_sm=16, prefix_warps=8)
NARROW = Launch(block_n=64, min_chunk=64, unit_cost=256, programs_per_sm=2, warps=4, stages=3, reduce_units=64, prefix_per_sm=4, prefix_warps=4)
NARROW_MAX_GROUPS = 32  # GQA groups (B·Hkv) up to which NARROW is used (measured: 4 and 8 vs 64 and 128)
# heads of at most 64 dims: WIDE with 4-warp prefix programs. The launch A/B on an H100 (SmolLM2, D 64;
# results/h100_launch_ab/model_kernels.csv): the prefix kernel took 1330 / 1171 µs a step at batch 64 and
# 843 / 754 µs at batch 32 with 8 / 4 warps (the attend kernel kept 8: with 4 it was slower). At D 128 a
# 4-warp prefix program compiles without spilling under the GPU machines' Triton 3.6 (140 registers) and spills
# 4.6 KB under Triton 3.9 (benchmarks/compile_kernels.py); not timed at 128 dims, so WIDE keeps 8 there.
SMALL_HEAD_DIM = 64
WIDE_SMALL_HEADS = replace(WIDE, prefix_warps=4)


def launch_for(groups: int, head_dim: int) -> Launch:
    """The default launch parameters for a step of ``groups = B·Hkv`` GQA groups of ``head_dim``-wide heads."""
    if groups <= NARROW_MAX_GROUPS:
        return NARROW
    return WIDE_SMALL_HEADS if head_dim <= SMALL_HEAD_DIM else WIDE


@dataclass(frozen=True)
class MatchLaunch:
    """Launch parameters of the match scan.

    Attributes:
        block_w: ring slots per tile.
        warps: warps per program.
        programs_per_sm: the window is split until the scan has about this many programs per SM.
    """

    block_w: int
    warps: int
    programs_per_sm: int


# benchmarks/tune_decode.py --match-only on an H200 (benchmarks/results/h200_one_launch/tune_match.csv):
# within 2.3 % of the best of 24 settings at every case (Hq 32, D 128, ring 1024 at batch 1 and 16;
# Hq 9, D 64, ring 256 at batch 16 and 64); at the real model's batch 64 6.12 µs for its 18.9 MB of
# rings (3.1 TB/s, 1.39× the copy-bandwidth floor) where the old 64-slot, 2-warp tiles took 8.37 µs
MATCH = MatchLaunch(block_w=128, warps=4, programs_per_sm=4)
# heads of at most 64 dims: 256-slot tiles of 8 warps. In the model, where the rings come from HBM (SmolLM2,
# D 64, W 256, an H100, two runs: results/h100_match_ab/), the scan took 386 / 302 µs a step at batch 64 and
# 237 / 217 µs at batch 32 with MATCH / these; alone, with the rings in L2 (the tuning above), these were
# 10-19 % slower. At D 128 (W 1024) the tuning's HBM-sized case (134 MB of rings) keeps MATCH: 256 / 8 was 15 % slower.
# (The group match takes the same tiles: not timed.)
MATCH_SMALL_HEADS = MatchLaunch(block_w=256, warps=8, programs_per_sm=4)


def match_launch_for(head_dim: int) -> MatchLaunch:
    """The default launch parameters of the match scan for ``head_dim``-wide heads."""
    return MATCH_SMALL_HEADS if head_dim <= SMALL_HEAD_DIM else MATCH


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small stand-in under the interpreter."""
    if device.type != "cuda" or interpreting():
        return 2
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def upcast_dots(dtype: torch.dtype) -> bool:
    """Run ``tl.dot`` on float32 operands: for float32 inputs (exact IEEE products) and
    always under the interpreter, whose bf16 ``tl.dot`` is wrong."""
    return dtype == torch.float32 or interpreting()
