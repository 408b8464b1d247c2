"""Paged KV caches (mac_core.kv, docs/serving.md#paged-kv): the same answers as a contiguous cache.

- ``read_keys`` of a paged cache is the contiguous cache's slice, bit for bit, for any
  page size, layout, page order and partly filled last page;
- the reference's prefill and decode steps over a paged cache equal those over the
  contiguous one exactly; mac_triton's are within the dtype band of the reference (and
  equal to its own contiguous run), the two-phase step (mass rule, group-aware rules) included;
- unused pages and the slots past each request's keys are NaN: a read outside the table shows;
- malformed tables, mismatched layouts and dtypes are refused with a named error.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mac_ref
import mac_triton
from mac_core.kv import PagedKV, PageTable, left_padded, read_keys, to_paged
from mac_ref import MACConfig, MassRule, PaperRule
from triton_cases import DEVICE, assert_states_close, assert_summary_close, prefilled_step, stream_inputs

PAGE_SIZES = [1, 16, 64]
LAYOUTS = ["NHD", "HND"]


def paged_copy(k, v, lengths, page_size, layout, seed):
    """Pages in a shuffled order, two spare pages, NaN wherever no key was copied."""
    gen = torch.Generator().manual_seed(seed)
    return to_paged(k, v, lengths, page_size, layout, generator=gen, spare_pages=2, fill=math.nan)


@given(
    batch=st.integers(1, 3),
    page_size=st.sampled_from([1, 3, 16, 64]),
    layout=st.sampled_from(LAYOUTS),
    data=st.data(),
)
def test_read_keys_is_the_contiguous_slice(batch, page_size, layout, data):
    T = data.draw(st.integers(1, 90), label="T")
    lengths = data.draw(st.lists(st.integers(1, T), min_size=batch, max_size=batch), label="lengths")
    first = data.draw(st.integers(0, min(lengths)), label="first")
    last = data.draw(st.integers(first, min(lengths)), label="last")
    gen = torch.Generator().manual_seed(T * 7 + page_size)
    k = torch.randn(batch, 2, T, 8, generator=gen)
    kp, _ = paged_copy(k, k, lengths, page_size, layout, seed=T)
    assert kp.page_size == page_size and kp.lengths().tolist() == lengths
    assert torch.equal(read_keys(kp, first, last), k[:, :, first:last])


@given(batch=st.integers(1, 3), data=st.data())
def test_left_padded_view_reads_each_request_from_its_first_slot(batch, data):
    T = data.draw(st.integers(1, 40), label="T")
    pads = data.draw(st.lists(st.integers(0, T - 1), min_size=batch, max_size=batch), label="pads")
    cache = torch.randn(batch, 3, T, 4, generator=torch.Generator().manual_seed(T))
    view = left_padded(cache, pads)
    assert view.lengths().tolist() == [T - p for p in pads]
    for b, p in enumerate(pads):
        assert torch.equal(read_keys(view, 0, T - p)[b], cache[b, :, p:])


@pytest.mark.interpreter
def test_triton_reads_a_left_padded_view():
    """The one-slot pages of a left-padded cache are a strided view: the kernels read it."""
    pads = torch.tensor([0, 9, 30])
    q_pre, q_post, k, v, state, pos = prefilled_step(3, 4, 2, 32, torch.float32, seed=7, positions=[50, 41, 20], config=MACConfig(window=8, band=4, tau=0.6))
    padded_k = torch.full((3, 2, 51, 32), math.nan, device=DEVICE)
    padded_v = torch.full((3, 2, 51, 32), math.nan, device=DEVICE)
    for b, p in enumerate(pads.tolist()):
        padded_k[b, :, p:] = k[b, :, : 51 - p]
        padded_v[b, :, p:] = v[b, :, : 51 - p]
    config = MACConfig(window=8, band=4, tau=0.6)
    ref_state = state.clone()
    want = mac_ref.decode_step(q_pre, k, v, ref_state, pos, config, q_post)
    got = mac_triton.decode_step(q_pre, left_padded(padded_k, pads), left_padded(padded_v, pads), state, pos, config, q_post)
    assert_summary_close(mac_ref.Summary(got[0], got[1]), mac_ref.Summary(want[0], want[1]), torch.float32)


RULES = [PaperRule(), MassRule(tau_m=0.6), PaperRule(per_group=True)]


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.describe())
def test_reference_stream_paged_equals_contiguous(page_size, layout, rule):
    """Prefill of ragged prompts and 12 decode steps: outputs, LSEs, statistics and rings equal."""
    config = MACConfig(window=16, band=8, tau=0.6, sinks=2, rule=rule)
    prompts, steps = [29, 40], 12
    q, k, v = stream_inputs(2, 4, 2, max(prompts) + steps, 32, torch.float32, seed=page_size)
    lengths = [n + steps for n in prompts]  # request b's keys: prompt and generated tokens
    kp, vp = paged_copy(k, v, lengths, page_size, layout, seed=page_size)
    prompt_lengths = torch.tensor(prompts, device=DEVICE)
    out, lse, state = mac_ref.prefill(q, k, v, prompt_lengths, config)
    out_p, lse_p, state_p = mac_ref.prefill(q, kp, vp, prompt_lengths, config)
    valid = torch.arange(q.shape[2], device=DEVICE)[None, None, :] < prompt_lengths[:, None, None]  # [B, 1, L]
    assert torch.equal(out[valid.expand_as(lse)], out_p[valid.expand_as(lse)]) and torch.equal(lse, lse_p)
    rows = torch.arange(2, device=DEVICE)
    for step in range(steps):
        pos = prompt_lengths + step
        want = mac_ref.decode_step(q[rows, :, pos], k, v, state, pos, config)
        got = mac_ref.decode_step(q[rows, :, pos], kp, vp, state_p, pos, config)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"step {step}"
        assert torch.equal(got[2].hit, want[2].hit) and torch.equal(got[2].keys_read, want[2].keys_read)
    assert torch.equal(state_p.ring_o, state.ring_o) and torch.equal(state_p.ring_lse, state.ring_lse)
    assert bool(want[2].hit.any()), "the stream should reuse: the test would not cover a hit"


@pytest.mark.interpreter
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_step_paged(page_size, layout, dtype):
    """One step at ragged positions over a cache that ends there: within the band of the
    reference, equal to mac_triton's own contiguous step; NaN everywhere outside the table."""
    config = MACConfig(window=16, band=8, tau=0.6, sinks=2)
    positions = [70, 33, 5]
    q_pre, q_post, k, v, state, pos = prefilled_step(3, 4, 2, 64, dtype, seed=page_size, positions=positions, config=config, reuse=0.9)
    kp, vp = paged_copy(k, v, [p + 1 for p in positions], page_size, layout, seed=page_size)
    state_rows = state.clone()
    row_state = state.clone()
    want = mac_ref.decode_step(q_pre, k, v, state, pos, config, q_post)
    got = mac_triton.decode_step(q_pre, kp, vp, state_rows, pos, config, q_post)
    contiguous = mac_triton.decode_step(q_pre, k, v, row_state, pos, config, q_post)
    assert_summary_close(mac_ref.Summary(got[0], got[1]), mac_ref.Summary(want[0], want[1]), dtype)
    assert torch.equal(got[2].hit, want[2].hit) and torch.equal(got[2].keys_read, want[2].keys_read)
    assert torch.equal(got[0], contiguous[0]) and torch.equal(got[1], contiguous[1])
    assert_states_close(state_rows, state, dtype, config)


TWO_PHASE_RULES = [MassRule(tau_m=0.9), MassRule(tau_m=0.9, per_group=True), PaperRule(per_group=True)]


@pytest.mark.interpreter
@pytest.mark.parametrize("page_size, layout, dtype", [(1, "HND", torch.bfloat16), (16, "NHD", torch.float32)])
@pytest.mark.parametrize("rule", TWO_PHASE_RULES, ids=lambda r: r.describe())
def test_triton_two_phase_steps_paged(rule, page_size, layout, dtype, poison):
    """The two-phase step (phase 2 reads the rejected candidates' prefixes) over pages: two
    steps at ragged positions, each over caches that end at ``t`` (NaN past it, in the pages
    and outside the table). Same decisions as the reference, outputs and rings within its
    band; outputs, statistics and rings bitwise those of mac_triton over the contiguous cache.
    The steps hit, reject candidates and miss, so every path reads from the pages."""
    config = MACConfig(window=16, band=8, tau=0.1, sinks=2, rule=rule)
    prompts, steps = [40, 23, 9], 2
    q, k, v = stream_inputs(3, 4, 2, max(prompts) + steps, 32, dtype, seed=page_size, reuse=0.5)
    prompt_lengths = torch.tensor(prompts, device=DEVICE)
    state = mac_ref.prefill(q, k, v, prompt_lengths, config)[2]
    paged_state, contiguous_state = state.clone(), state.clone()
    rows = torch.arange(3, device=DEVICE)
    decisions = []
    for step in range(steps):
        pos = prompt_lengths + step
        q_pre = q[rows, :, pos]
        k_t, v_t = poison.beyond(k, pos + 1), poison.beyond(v, pos + 1)
        kp, vp = paged_copy(k, v, (pos + 1).tolist(), page_size, layout, seed=step)
        want = mac_ref.decode_step(q_pre, k_t, v_t, state, pos, config)
        got = mac_triton.decode_step(q_pre, kp, vp, paged_state, pos, config)
        contiguous = mac_triton.decode_step(q_pre, k_t, v_t, contiguous_state, pos, config)
        assert_summary_close(mac_ref.Summary(got[0], got[1]), mac_ref.Summary(want[0], want[1]), dtype, msg=f"step {step}")
        for name in ("hit", "candidate", "matched_pos", "keys_read"):
            assert torch.equal(getattr(got[2], name), getattr(want[2], name)), f"step {step}: stats.{name} differ from mac_ref"
        assert torch.equal(got[0], contiguous[0]) and torch.equal(got[1], contiguous[1]), f"step {step}: paged != contiguous"
        for name, value in vars(got[2]).items():
            assert torch.equal(value, getattr(contiguous[2], name)), f"step {step}: stats.{name} paged != contiguous"
        decisions.append(want[2])
    assert_states_close(paged_state, state, dtype, config)
    for name in ("ring_q", "ring_o", "ring_lse", "ring_depth"):
        assert torch.equal(getattr(paged_state, name), getattr(contiguous_state, name)), f"{name} paged != contiguous"
    hit = torch.stack([s.hit for s in decisions])
    candidate = torch.stack([s.candidate for s in decisions])
    assert hit.any() and (candidate & ~hit).any() and (~candidate).any(), "the steps should hit, reject and miss"


@pytest.mark.interpreter
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_full_decode_paged(page_size, layout):
    gen = torch.Generator().manual_seed(page_size)
    positions = torch.tensor([90, 17, 0], device=DEVICE)
    k = torch.randn(3, 2, 91, 32, generator=gen).to(DEVICE)
    v = torch.randn(3, 2, 91, 32, generator=gen).to(DEVICE)
    q = torch.randn(3, 6, 32, generator=gen).to(DEVICE)
    kp, vp = paged_copy(k, v, (positions + 1).tolist(), page_size, layout, seed=page_size)
    want = mac_ref.attend(q, k, v, 0, (positions + 1)[:, None])
    got = mac_triton.full_decode(q, kp, vp, positions)
    assert_summary_close(mac_ref.Summary(*got), want, torch.float32)


def _table(indptr, indices, last):
    return dict(indptr=torch.tensor(indptr, dtype=torch.int32), indices=torch.tensor(indices, dtype=torch.int32),
                last_page_len=torch.tensor(last, dtype=torch.int32))  # fmt: skip


BAD_TABLES = [
    ("indptr not at 0", _table([1, 2, 3], [0, 1, 2], [4, 4]), ValueError, "indptr must start at 0"),
    ("indptr decreasing", _table([0, 2, 1], [0, 1], [4, 4]), ValueError, "never decrease"),
    ("indptr beyond indices", _table([0, 2, 4], [0, 1, 2], [4, 4]), ValueError, "beyond the 3 entries of indices"),
    ("request without a page", _table([0, 2, 2], [0, 1], [4, 4]), ValueError, "at least one page"),
    ("last page empty", _table([0, 1, 2], [0, 1], [4, 0]), ValueError, r"last_page_len must be ≥ 1"),
    ("last_page_len shape", _table([0, 1, 2], [0, 1], [4]), ValueError, r"last_page_len must have shape \[B=2\]"),
    ("indptr float", dict(_table([0, 1, 2], [0, 1], [4, 4]), indptr=torch.tensor([0.0, 1.0, 2.0])), TypeError, "indptr must have dtype"),
    ("indices 2-D", dict(_table([0, 1, 2], [0, 1], [4, 4]), indices=torch.zeros(2, 1, dtype=torch.int32)), ValueError, "indices must be one-dimensional"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_TABLES, ids=lambda c: c[0])
def test_malformed_page_tables_are_refused(case):
    _, fields, error, message = case
    with pytest.raises(error, match=message):
        PageTable(**fields)


def _pages(page_size=4, pages=3, dtype=torch.float32, layout="NHD"):
    shape = (pages, page_size, 2, 8) if layout == "NHD" else (pages, 2, page_size, 8)
    return torch.zeros(shape, dtype=dtype)


GOOD = _table([0, 1, 2], [0, 2], [4, 3])

BAD_CACHES = [
    ("page index out of range", lambda: PagedKV(_pages(pages=2), PageTable(**GOOD)), ValueError, r"indices must lie in \[0, 2\)"),
    ("last_page_len beyond page size", lambda: PagedKV(_pages(page_size=2), PageTable(**GOOD)), ValueError, "must not exceed page_size 2"),
    ("layout unknown", lambda: PagedKV(_pages(), PageTable(**GOOD), "NDH"), ValueError, "layout must be one of"),
    ("pages 3-D", lambda: PagedKV(_pages()[0], PageTable(**GOOD)), ValueError, r"pages must have 4 dimensions \[P, page_size, Hkv, D\]"),
    ("pages integer", lambda: PagedKV(_pages().long(), PageTable(**GOOD)), TypeError, "pages must be a floating-point"),
    ("table not a PageTable", lambda: PagedKV(_pages(), GOOD), TypeError, "table must be a PageTable"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CACHES, ids=lambda c: c[0])
def test_malformed_paged_caches_are_refused(case):
    _, make, error, message = case
    with pytest.raises(error, match=message):
        make()


def _step_args(**changes):
    """A valid paged decode step (2 requests of 4 and 3 keys), with fields replaced."""
    config = MACConfig(window=4, band=2, tau=0.5)
    table = PageTable(**GOOD)
    args = dict(
        q_pre=torch.randn(2, 4, 8), k_cache=PagedKV(_pages(), table), v_cache=PagedKV(_pages(), table),
        state=mac_ref.new_state(2, 4, 8, config), positions=torch.tensor([0, 0]), config=config,
    )  # fmt: skip
    args.update({name: change(args) if callable(change) else change for name, change in changes.items()})
    return args


BAD_STEPS = [
    ("paged keys, tensor values", dict(v_cache=torch.zeros(2, 2, 4, 8)), TypeError, "k_cache and v_cache must both be tensors or both PagedKV"),
    ("layouts differ", dict(v_cache=lambda a: PagedKV(_pages(layout="HND"), a["k_cache"].table, "HND")), ValueError, "must share a page layout"),
    ("tables differ", dict(v_cache=PagedKV(_pages(), PageTable(**_table([0, 1, 2], [1, 2], [4, 3])))), ValueError, "must share one page table"),
    ("head_dim differs", dict(q_pre=torch.randn(2, 4, 6)), ValueError, r"k_cache must have shape \[B=2, Hkv, T, D=6\] \(paged"),
    ("position past a request's keys", dict(positions=torch.tensor([0, 3])), ValueError, r"below each request's paged KV length \[4, 3\]"),
]  # fmt: skip


@pytest.mark.parametrize("backend", [mac_ref, pytest.param(mac_triton, marks=pytest.mark.interpreter)], ids=["mac_ref", "mac_triton"])
@pytest.mark.parametrize("case", BAD_STEPS, ids=lambda c: c[0])
def test_bad_paged_steps_are_refused(backend, case):
    _, changes, error, message = case
    args = _step_args(**changes)
    with pytest.raises(error, match=message):
        backend.decode_step(**args)


@pytest.mark.interpreter
def test_triton_refuses_mixed_page_dtypes():
    table = PageTable(**GOOD)
    args = _step_args(v_cache=PagedKV(_pages(dtype=torch.bfloat16), table))
    with pytest.raises(TypeError, match="k_cache.pages and v_cache.pages must share a dtype for mac_triton"):
        mac_triton.decode_step(**args)
