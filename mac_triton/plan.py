r"""The work plan of a step's attention: which program reads which keys, computed in-kernel.

Every program of the attend kernel evaluates the same plan from the positions and the
band starts (no plan launch, no host synchronisation, so a step can be captured in a
CUDA graph). Per GQA group ``(b, h_kv)`` it takes the union of its heads' spans: sinks
``[0, S)``, band ``[lo, N)`` with ``lo`` the smallest band start of its heads, tail
``[N, t+1)`` (spec: [the ranges][spec-ranges], [batches and GQA][spec-batches]).

The segments of the whole batch are laid end to end, each weighing its keys plus a fixed
``unit_cost`` (a unit's latency: loads of the plan, the query and the first tile, the
partial state's store, in key-equivalents), and the concatenation is split evenly over
the programs (stream-K style): program ``p`` takes ``[p·chunk, (p+1)·chunk)`` of it, and
each piece of a segment's keys it takes is a *unit* with its own partial state. Work is
therefore split by span length: a long miss span is shared by many programs, a hit's
short band is one piece of one program, whatever the longest head is; and a program that
gets many short hit segments gets fewer keys (without the fixed cost, the programs
holding the hits of a 95 % step at batch 16 took 1.8× longer than those holding the
misses: ``benchmarks/RESULTS.md``).

Where the heads' band starts come from (``BAND_SOURCE``):

- :data:`BAND_FROM_SPANS`: a :class:`~mac_core.step.Spans` tuple (``mac_triton.amend_complete``);
- :data:`BAND_FROM_MATCH`: the match keys and the distance test (the fused decode step);
- :data:`NO_BAND`: no row, every key in the tail (full attention).

A step whose rule verifies its candidates takes no plan: its fresh kernel reads three
units per group (sinks, band, tail: units ``3·group`` to ``3·group + 2``) and its prefix
kernel up to ``max_pieces`` units of the prefix ``[S, lo)`` that the heads which do not
reuse still need, once the group is decided (:mod:`mac_triton.attend`); their partial
states sit after the fresh units, at ``prefix_base + group · max_pieces``. It stores its
per-group fields in the same layout.

The plan is stored per group as :data:`PLAN_FIELDS` int64s, read by name (``plan_field``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .match import NO_CANDIDATE, decode_key

BAND_FROM_SPANS: tl.constexpr = tl.constexpr("spans")
BAND_FROM_MATCH: tl.constexpr = tl.constexpr("match")
NO_BAND: tl.constexpr = tl.constexpr("full")
BAND_SOURCES = (BAND_FROM_SPANS.value, BAND_FROM_MATCH.value, NO_BAND.value)

# the fields of a group's stored plan
PLAN_FIRST: tl.constexpr = tl.constexpr(0)  # its first planned unit
PLAN_SINK_UNITS: tl.constexpr = tl.constexpr(1)  # units of the sinks, then of the band, then all of its units
PLAN_BAND_UNITS: tl.constexpr = tl.constexpr(2)
PLAN_UNITS: tl.constexpr = tl.constexpr(3)
PLAN_SINK_END: tl.constexpr = tl.constexpr(4)  # S
PLAN_BAND_START: tl.constexpr = tl.constexpr(5)  # lo, the start of the union of its heads' bands
PLAN_TAIL_END: tl.constexpr = tl.constexpr(6)  # t + 1
PLAN_PREFIX_FIRST: tl.constexpr = tl.constexpr(7)  # its first prefix unit (a verifying step)
PLAN_PREFIX_UNITS: tl.constexpr = tl.constexpr(8)  # its prefix units, written by the prefix kernel
PLAN_FIELDS = 9
_PLAN_FIELDS: tl.constexpr = tl.constexpr(PLAN_FIELDS)
_NO_CANDIDATE: tl.constexpr = tl.constexpr(NO_CANDIDATE)


@triton.jit
def plan_field(plan_ptr, grp, FIELD: tl.constexpr):
    """Field ``FIELD`` (one of the ``PLAN_*`` constants) of group ``grp``'s stored plan."""
    return tl.load(plan_ptr + grp * _PLAN_FIELDS + FIELD)


@triton.jit
def band_start(hit, matched, band, sink_end):
    """A head's band start: ``max(E(j*), S)`` on a hit (``E(j) = max(j + 1 − r, 0)``), ``S`` otherwise."""
    return tl.where(hit, tl.maximum(tl.maximum(matched + 1 - band, 0), sink_end), sink_end)


@triton.jit
def request_bounds(b, mask, pos_ptr, sink_end_ptr, band_end_ptr, tail_end_ptr, stride_sb, band, sinks, BAND_SOURCE: tl.constexpr):
    """``(S, N, t + 1)`` of requests ``b``: sinks end, band end ``E(t)``, tail end (int64)."""
    if BAND_SOURCE == BAND_FROM_SPANS:
        sink_end = tl.load(sink_end_ptr + b * stride_sb, mask=mask, other=0).to(tl.int64)
        band_end = tl.load(band_end_ptr + b * stride_sb, mask=mask, other=0).to(tl.int64)
        tail_end = tl.load(tail_end_ptr + b * stride_sb, mask=mask, other=0).to(tl.int64)
    else:
        tail_end = tl.load(pos_ptr + b, mask=mask, other=0).to(tl.int64) + 1
        band_end = tl.maximum(tail_end - band, 0)  # N = E(t) = max(t + 1 − r, 0)
        sink_end = tl.minimum(band_end, sinks)  # S = min(F, N)
    return sink_end, band_end, tail_end


@triton.jit
def group_heads(grp, Hkv, G, G_PAD: tl.constexpr):
    """GQA group ``grp``'s request, KV head, ``Hq``, and its query heads as lanes: ``(b, kvh, Hq, lanes, lane_mask, heads)``."""
    lanes = tl.arange(0, G_PAD)
    return grp // Hkv, grp % Hkv, Hkv * G, lanes, lanes < G, (grp % Hkv) * G + lanes


@triton.jit
def all_lanes(flags, lane_mask):
    """Whether ``flags`` holds on every lane of ``lane_mask`` (a group's heads), as a scalar."""
    return tl.min(tl.where(lane_mask, flags.to(tl.int32), 1), axis=0) == 1


@triton.jit
def head_match(b, h, mask, tail_end, key_ptr, radius_ptr, Hq, min_context):
    """Head ``(b, h)``'s match from its key: ``(candidate, j*, distance)`` (no candidate where masked)."""
    key = tl.load(key_ptr + b * Hq + h, mask=mask, other=_NO_CANDIDATE)
    radius_sq = tl.load(radius_ptr + h, mask=mask, other=0.0)
    return decode_key(key, tail_end - 1, min_context, radius_sq)


@triton.jit
def head_band_start(
    b, h, mask, sink_end, tail_end, key_ptr, radius_ptr, band_start_ptr, stride_sb, stride_sh,
    Hq, band, min_context, BAND_SOURCE: tl.constexpr,
):
    """Each head's band start (int64; its band is ``[start, N)``): ``max(E(j*), S)`` on a
    candidate hit, ``S`` on a miss."""
    if BAND_SOURCE == BAND_FROM_SPANS:
        start = tl.load(band_start_ptr + b * stride_sb + h * stride_sh, mask=mask, other=0).to(tl.int64)
    elif BAND_SOURCE == BAND_FROM_MATCH:
        hit, matched, dist = head_match(b, h, mask, tail_end, key_ptr, radius_ptr, Hq, min_context)
        start = band_start(hit, matched, band, sink_end)
    else:
        start = sink_end + tl.zeros(h.shape, tl.int64)
    return start


@triton.jit
def plan_units(
    pos_ptr, key_ptr, radius_ptr, band_start_ptr, sink_end_ptr, band_end_ptr, tail_end_ptr, stride_sb, stride_sh,
    NG, Hkv, G, band, sinks, min_context, n_split,
    BAND_SOURCE: tl.constexpr, NG_BLOCK: tl.constexpr, G_BLOCK: tl.constexpr, MIN_CHUNK: tl.constexpr,
    UNIT_COST: tl.constexpr,
):
    """The step's work plan (see the module docstring), computed identically by every program.

    Returns ``[NG_BLOCK]`` vectors (first unit, sink units, band units, units, the ends of
    the sinks, the band's start and end, the tail's end, offset in the concatenation),
    ``chunk`` and the total cost.
    """
    groups = tl.arange(0, NG_BLOCK)
    valid = groups < NG
    b = groups // Hkv
    sink_end, band_end, tail_end = request_bounds(
        b, valid, pos_ptr, sink_end_ptr, band_end_ptr, tail_end_ptr, stride_sb, band, sinks, BAND_SOURCE
    )
    lanes = tl.arange(0, G_BLOCK)[None, :]
    mask = valid[:, None] & (lanes < G)
    h = (groups % Hkv)[:, None] * G + lanes
    start = head_band_start(
        b[:, None], h, mask, sink_end[:, None], tail_end[:, None], key_ptr, radius_ptr, band_start_ptr,
        stride_sb, stride_sh, Hkv * G, band, min_context, BAND_SOURCE,
    )  # [NG, G]
    band_lo = tl.min(tl.where(mask, start, 2**62), axis=1)  # the union of the group's bands
    sink_len = tl.where(valid, sink_end, 0)
    band_len = tl.where(valid, band_end - band_lo, 0)
    tail_len = tl.where(valid, tail_end - band_end, 0)
    group_cost = segment_cost(sink_len, UNIT_COST) + segment_cost(band_len, UNIT_COST) + segment_cost(tail_len, UNIT_COST)
    offset = tl.cumsum(group_cost, axis=0) - group_cost  # where each group starts in the concatenation
    total = tl.sum(group_cost, axis=0)
    chunk = tl.maximum(tl.cdiv(total, n_split), MIN_CHUNK)  # cost per program
    band_at = offset + segment_cost(sink_len, UNIT_COST)
    tail_at = band_at + segment_cost(band_len, UNIT_COST)
    n_sink = pieces(keys_at(offset, sink_len, UNIT_COST), sink_len, chunk)
    n_band = pieces(keys_at(band_at, band_len, UNIT_COST), band_len, chunk)
    n_units = n_sink + n_band + pieces(keys_at(tail_at, tail_len, UNIT_COST), tail_len, chunk)
    first = tl.cumsum(n_units, axis=0) - n_units
    offset = tl.where(valid, offset, 2**60)  # no program maps to a padding group
    return first, n_sink, n_band, n_units, sink_end, band_lo, band_end, tail_end, offset, chunk, total


@triton.jit
def segment_cost(length, UNIT_COST: tl.constexpr):
    """Cost of a segment of ``length`` keys in the concatenation (an empty one costs nothing)."""
    return tl.where(length > 0, length + UNIT_COST, 0)


@triton.jit
def keys_at(at, length, UNIT_COST: tl.constexpr):
    """Where the keys of a segment placed at ``at`` start: after its fixed cost."""
    return at + tl.where(length > 0, UNIT_COST, 0)


@triton.jit
def pieces(start, length, chunk):
    """Units of a segment at ``[start, start + length)`` of the concatenation: the number of
    program ranges ``[p·chunk, (p+1)·chunk)`` it meets."""
    return tl.where(length > 0, (start + length - 1) // chunk - start // chunk + 1, 0)


@triton.jit
def pick(values, groups, grp):
    """``values[grp]`` of a register vector."""
    return tl.sum(tl.where(groups == grp, values, 0), axis=0)
