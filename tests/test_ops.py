"""The custom ops (mac_triton.ops, docs/serving.md#compile-and-graphs): eager-equal, opaque to
``torch.compile``, capturable in CUDA graphs.

- the ops give the eager kernels' results bit for bit (contiguous and paged caches) and
  pass ``torch.library.opcheck`` (schema, declared mutations, fake implementation);
- a toy decoder compiled with ``fullgraph=True`` has no graph break and decodes the eager
  model's outputs, rings and statistics over a stream;
- on a CUDA GPU: a captured step replayed at new positions and a grown page table gives
  the eager results.
"""

import math
import shutil

import pytest
import torch

import mac_ref
from mac_core.kv import PagedKV, PageTable, to_paged
from mac_ref import MACConfig
from mac_triton import decode, ops
from triton_cases import DEVICE, stream_inputs

pytestmark = pytest.mark.interpreter

CONFIG = MACConfig(window=8, band=4, tau=0.6, sinks=2)
B, HQ, HKV, D = 2, 4, 2, 16


def prefilled(length=48, prompts=(30, 25), seed=0):
    q, k, v = stream_inputs(B, HQ, HKV, length, D, torch.float32, seed=seed, reuse=0.9)
    prompt_lengths = torch.tensor(prompts, device=DEVICE)
    _, _, state = mac_ref.prefill(q, k, v, prompt_lengths, CONFIG)
    return q, k, v, state, prompt_lengths


def step_inputs(q, pos):
    q_pre = q[torch.arange(B, device=DEVICE), :, pos]  # [B, Hq, D]
    return q_pre, mac_ref.apply_rope(q_pre, pos[:, None], CONFIG.rope_base)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_ops_equal_the_eager_kernels(paged):
    q, k, v, state, pos = prefilled()
    if paged:
        k, v = to_paged(k, v, [48, 48], 16, "HND", generator=torch.Generator().manual_seed(1), fill=math.nan)
    eager, through_op = state.clone(), state.clone()
    ws_eager = decode.DecodeWorkspace.new(CONFIG, B, HQ, D, DEVICE)
    ws_op = decode.DecodeWorkspace.new(CONFIG, B, HQ, D, DEVICE)
    scale = CONFIG.softmax_scale(D)
    hits = 0
    for step in range(6):
        q_pre, q_post = step_inputs(q, pos + step)
        want = decode.mac_step(q_pre, q_post, k, v, eager, pos + step, CONFIG, scale, ws_eager)
        got = ops.mac_step(q_pre, q_post, k, v, through_op, pos + step, CONFIG, scale, ws_op)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        for name in ops.STATS:
            assert torch.equal(getattr(got[2], name), getattr(want[2], name)), name
        hits += int(want[2].hit.sum())
    assert torch.equal(through_op.ring_o, eager.ring_o) and torch.equal(ws_op.keys, ws_eager.keys)
    assert hits > 0, "the stream should reuse"
    full_want = decode.full_step(q_post, k, v, pos + 5)
    full_got = ops.full_step(q_post, k, v, pos + 5)
    assert torch.equal(full_got[0], full_want[0]) and torch.equal(full_got[1], full_want[1])


def test_opcheck():
    q, k, v, state, pos = prefilled()
    q_pre, q_post = step_inputs(q, pos)
    ws = decode.DecodeWorkspace.new(CONFIG, B, HQ, D, DEVICE)
    args = (
        q_pre, q_post, k, v, None, None, None, ops.CONTIGUOUS, state.ring_q, state.ring_o, state.ring_lse, state.ring_depth,
        pos, ws.keys, ws.radius_sq, ws.rule_radius_sq, CONFIG.band, CONFIG.sinks, CONFIG.min_context, -1,
        CONFIG.row_update, CONFIG.rule.name, CONFIG.rule.per_group, CONFIG.group_match, CONFIG.softmax_scale(D), ops.NO_CAP, True,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.mac_triton.mac_step.default, args, test_utils=("test_schema", "test_faketensor"))
    full_args = (q_post, k, v, None, None, None, ops.CONTIGUOUS, pos, 0.25, 50.0)  # a soft-capped full step
    torch.library.opcheck(torch.ops.mac_triton.full_step.default, full_args)


class ToyDecoder(torch.nn.Module):
    """One attention layer over a preallocated cache: project, write k/v at ``pos``, MAC, project."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.q = torch.nn.Parameter(torch.randn(D, HQ * D, generator=gen) / D**0.5)
        self.kv = torch.nn.Parameter(torch.randn(D, 2 * HKV * D, generator=gen) / D**0.5)
        self.out = torch.nn.Parameter(torch.randn(HQ * D, D, generator=gen) / D)

    def forward(self, x, k_cache, v_cache, state, pos, workspace):
        q = (x @ self.q).view(B, HQ, D)  # [B, Hq, D], used as pre- and post-RoPE (a toy: no RoPE)
        k_new, v_new = (x @ self.kv).view(B, 2, HKV, D).unbind(1)  # [B, Hkv, D] each
        rows = torch.arange(B, device=x.device)
        k_cache[rows, :, pos] = k_new
        v_cache[rows, :, pos] = v_new
        o, _, stats = ops.mac_step(q, q, k_cache, v_cache, state, pos, CONFIG, CONFIG.softmax_scale(D), workspace)
        return o.reshape(B, HQ * D) @ self.out, stats.hit


def _compiler() -> str:
    # Inductor's CPU code needs a C++ compiler; aot_eager still functionalizes the op's mutations
    return "inductor" if DEVICE.type == "cuda" or shutil.which("g++") or shutil.which("c++") else "aot_eager"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Inductor's own use of torch.jit
@pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores")  # Inductor's advice on a GPU
@torch.no_grad()
def test_compiled_toy_model_decodes_like_eager():
    model = ToyDecoder().to(DEVICE)
    q, k, v, state, pos = prefilled()
    x = torch.randn(8, B, D, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    runs = {}
    compiled = torch.compile(model, backend=_compiler(), fullgraph=True)
    explanation = torch._dynamo.explain(model)(x[0], k.clone(), v.clone(), state.clone(), pos, decode.DecodeWorkspace.new(CONFIG, B, HQ, D, DEVICE))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    for name, fn in (("eager", model), ("compiled", compiled)):
        ks, vs, st = k.clone(), v.clone(), state.clone()
        ws = decode.DecodeWorkspace.new(CONFIG, B, HQ, D, DEVICE)
        outs, hits = [], []
        for step in range(x.shape[0]):
            out, hit = fn(x[step], ks, vs, st, pos + step, ws)
            outs.append(out)
            hits.append(hit)
        runs[name] = (torch.stack(outs), torch.stack(hits), st, ks)
    (out_e, hit_e, st_e, k_e), (out_c, hit_c, st_c, k_c) = runs["eager"], runs["compiled"]
    assert torch.equal(hit_c, hit_e) and torch.equal(k_c, k_e)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)  # the projections may fuse differently
    torch.testing.assert_close(st_c.ring_o, st_e.ring_o, rtol=1e-5, atol=1e-6)
    assert torch.equal(st_c.ring_depth, st_e.ring_depth)


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_graph_replays_with_new_lengths():
    """Capture one step over a paged cache; replay it at later positions after writing a
    longer table into the same buffers in place: the eager step's results every time."""
    length, page = 200, 16
    q, k, v = stream_inputs(B, HQ, HKV, length, D, torch.bfloat16, seed=4, reuse=0.9)
    pos = torch.tensor([120, 90], device="cuda")
    _, _, state = mac_ref.prefill(q.float(), k.float(), v.float(), pos, CONFIG)
    state.ring_q = state.ring_q.to(torch.bfloat16)
    k_all, v_all = to_paged(k, v, [length, length], page, "NHD", generator=torch.Generator().manual_seed(0))
    pool = k_all.table  # every page of both requests; a step's table is a prefix of each request's pages

    # the buffers the graph reads ("plan"), written in place before each replay
    indptr = torch.zeros(B + 1, dtype=torch.int32, device="cuda")
    indices = torch.zeros_like(pool.indices)
    last_page_len = torch.zeros(B, dtype=torch.int32, device="cuda")
    table = PageTable.unchecked(indptr, indices, last_page_len)
    kp, vp = PagedKV.unchecked(k_all.pages, table), PagedKV.unchecked(v_all.pages, table)

    def write_table(p):  # requests holding keys [0, p[b]]
        n_keys = (p + 1).tolist()
        n_pages = [-(-n // page) for n in n_keys]
        firsts = pool.indptr[:-1].tolist()
        entries = torch.cat([pool.indices[f : f + n] for f, n in zip(firsts, n_pages)])
        indices[: entries.numel()] = entries
        indptr.copy_(torch.tensor([0, n_pages[0], sum(n_pages)], dtype=torch.int32))
        last_page_len.copy_(torch.tensor([n - (m - 1) * page for n, m in zip(n_keys, n_pages)], dtype=torch.int32))

    static_pos = pos.clone()
    q_static = torch.empty(B, HQ, D, dtype=torch.bfloat16, device="cuda")
    graph_state, eager_state = state.clone(), state.clone()
    ws, ws_eager = (decode.DecodeWorkspace.new(CONFIG, B, HQ, D, "cuda") for _ in range(2))
    scale = CONFIG.softmax_scale(D)
    write_table(pos)
    q_static.copy_(q[torch.arange(B), :, pos])
    ops.mac_step(q_static, q_static, kp, vp, graph_state.clone(), static_pos, CONFIG, scale, ws)  # compile the kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse, stats = ops.mac_step(q_static, q_static, kp, vp, graph_state, static_pos, CONFIG, scale, ws)
    for step in range(40):  # the tables grow by a page every 16 steps
        p = pos + step
        write_table(p)
        static_pos.copy_(p)
        q_static.copy_(q[torch.arange(B), :, p])
        graph.replay()
        q_now = q[torch.arange(B), :, p]
        want = decode.mac_step(q_now, q_now, k_all, v_all, eager_state, p, CONFIG, scale, ws_eager)
        assert torch.equal(out, want[0]) and torch.equal(lse, want[1]), f"step {step}"
        assert torch.equal(stats.hit, want[2].hit) and torch.equal(graph_state.ring_o, eager_state.ring_o), f"step {step}"
