"""What the GPU benchmarks share: inputs, planted rings, the ring-restoring step, timing,
the full-attention baselines and the run's environment.

Run the scripts from the repository root as modules (``python -m benchmarks.bench_decode``):
they import the installed packages (``pip install -e .``) or the checkout's, never edit
``sys.path``.
"""

from __future__ import annotations

import platform

import torch
import triton
import triton.testing

import mac_triton
from mac_core import LayerState, MACConfig, Summary

Q_HEADS, HEAD_DIM, DTYPE, BAND, LAG = 32, 128, torch.bfloat16, 256, 64  # the kernel benchmark's shapes


def environment() -> dict:
    """The GPU and the versions a result was measured with."""
    versions = dict(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", torch=torch.__version__, triton=triton.__version__, python=platform.python_version())
    try:
        import flashinfer

        versions["flashinfer"] = flashinfer.__version__
    except Exception:  # noqa: BLE001 - optional baseline
        versions["flashinfer"] = "not importable"
    return versions


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), rep=200, return_mode="median")
    del src, dst
    return 2 * (1 << 30) / (ms * 1e-3)


def timed_us(fn, rep_ms: int = 100) -> tuple[float, str]:
    """Median µs of ``fn`` as CUDA-graph replays; plain ``do_bench`` if it cannot be captured."""
    torch.cuda.synchronize()  # do_bench_cudagraph runs on a side stream: let the inputs' writes land first
    try:
        return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"), "graph"
    except Exception as err:  # noqa: BLE001 - report and fall back, the run must go on
        print(f"    (graph capture failed: {type(err).__name__}: {str(err)[:120]}; timing eagerly)")
        torch.cuda.synchronize()
        return 1e3 * triton.testing.do_bench(fn, rep=rep_ms, return_mode="median"), "eager"


def step_inputs(hkv: int, batch: int, ctx: int, gen: torch.Generator, q_heads: int = Q_HEADS, head_dim: int = HEAD_DIM, dtype=DTYPE):
    """Random inputs of one decode step at position ``t = ctx − 1``: ``(positions, k, v, q_pre, q_post)``."""
    device = gen.device
    positions = torch.full((batch,), ctx - 1, dtype=torch.int64, device=device)
    k = torch.randn(batch, hkv, ctx, head_dim, generator=gen, device=device, dtype=dtype)
    v = torch.randn(batch, hkv, ctx, head_dim, generator=gen, device=device, dtype=dtype)
    q_pre = torch.randn(batch, q_heads, head_dim, generator=gen, device=device).to(dtype)
    q_post = torch.randn(batch, q_heads, head_dim, generator=gen, device=device).to(dtype)
    return positions, k, v, q_pre, q_post


def planted_state(q_pre: torch.Tensor, window: int, t: int, hit_rate: float, gen: torch.Generator, lag: int = LAG) -> tuple[LayerState, int]:
    """Rings after token ``t − 1`` with exact hits planted for all but a contiguous block of
    (request, head) indices, seeded through :meth:`~mac_core.state.LayerState.seed`.

    A hit head's row ``lag`` tokens back holds its current pre-RoPE query plus noise of 0.01
    per entry (distance ≈ 0.013, far inside any radius); every other row is an independent
    normal vector (distance ≈ 2D, far outside). Miss heads fill whole GQA groups, as in the
    authors' benchmark. Returns the state and the number of hit heads.
    """
    B, Hq, D = q_pre.shape
    device = q_pre.device
    ring_q = torch.randn(B, Hq, window, D, generator=gen, device=device).to(q_pre.dtype)  # positions t − W … t − 1
    rows = Summary(
        torch.randn(B, Hq, window, D, generator=gen, device=device), torch.randn(B, Hq, window, generator=gen, device=device) + 5.0
    )
    n_hit = round(hit_rate * B * Hq)
    hit_mask = (torch.arange(B * Hq, device=device) < n_hit).view(B, Hq)
    near = (q_pre.float() + 0.01 * torch.randn(q_pre.shape, generator=gen, device=device)).to(q_pre.dtype)
    ring_q[:, :, window - lag] = torch.where(hit_mask[..., None], near, ring_q[:, :, window - lag])
    state = LayerState.empty(B, Hq, D, window, dtype=q_pre.dtype, device=device)
    state.seed(ring_q, rows, torch.full((B,), t, dtype=torch.int64, device=device), first_position=t - window)
    return state, n_hit


def ring_restoring_step(q_pre, q_post, k, v, state: LayerState, positions, config: MACConfig, launch=None):
    """A callable that runs :func:`mac_triton.mac_step` and then puts back the ring slot the
    step overwrote (otherwise the next replay would match the written query exactly at lag
    ``W``), so that every replay sees the same planted ring; the restore is one small copy,
    timed with the step and counted against MAC."""
    B, Hq, D = q_pre.shape
    workspace = mac_triton.DecodeWorkspace.new(config, B, Hq, D, q_pre.device)
    scale = config.softmax_scale(D)
    slot = int(positions[0]) % config.window
    saved = state.ring_q[:, :, slot].clone()

    def step():
        result = mac_triton.mac_step(q_pre, q_post, k, v, state, positions, config, scale, workspace, launch)
        state.ring_q[:, :, slot] = saved
        return result

    return step


def match_only(q_pre, ring_q, positions, launch=None):
    """A callable that runs the match scan alone: one launch, as in a step (its keys are not
    consumed: each scan folds into the last one's minima, which changes no load it makes)."""
    from mac_triton.match import match_keys, new_keys

    keys = new_keys(q_pre.device, q_pre.shape[0] * q_pre.shape[1])
    return lambda: match_keys(q_pre, ring_q, positions, keys, launch=launch)


def flashinfer_runners(q, k, v, positions, page: int = 16) -> dict:
    """``{name: fn}`` of FlashInfer's paged decode (``fa2``, tensor cores on and off) over the
    contiguous cache ``k, v [B, Hkv, T, D]`` copied into ``HND`` pages; ``{}`` without flashinfer."""
    try:
        import flashinfer
    except Exception as err:  # noqa: BLE001
        print(f"  flashinfer not importable: {type(err).__name__}: {err}")
        return {}
    B, Hkv, T, D = k.shape
    pages_per_req = triton.cdiv(T, page)
    pad = pages_per_req * page - T

    def paged(x):  # [B, Hkv, T, D] -> [B·pages, Hkv, page, D] (HND pages)
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.view(B, Hkv, pages_per_req, page, D).permute(0, 2, 1, 3, 4).reshape(B * pages_per_req, Hkv, page, D).contiguous()

    k_pages, v_pages = paged(k), paged(v)
    lengths = positions + 1
    n_pages = (lengths + page - 1) // page
    indptr = torch.zeros(B + 1, dtype=torch.int32, device=q.device)
    indptr[1:] = torch.cumsum(n_pages, 0)
    indices = torch.cat([b * pages_per_req + torch.arange(int(n_pages[b]), device=q.device) for b in range(B)]).int()
    last_len = (lengths - (n_pages - 1) * page).int()
    runners = {}
    for tc in (False, True):
        workspace = torch.empty(256 << 20, dtype=torch.uint8, device=q.device)
        try:
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "HND", use_tensor_cores=tc, backend="fa2")
        except TypeError:
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "HND", use_tensor_cores=tc)
        wrapper.plan(
            indptr, indices, last_len, q.shape[1], Hkv, D, page,
            pos_encoding_mode="NONE", q_data_type=q.dtype, kv_data_type=k.dtype,
        )
        runners[f"flashinfer_tc{'on' if tc else 'off'}"] = (lambda w=wrapper: w.run(q, (k_pages, v_pages), return_lse=True))
    return runners


def sdpa_runner(q_post, k, v, scale: float):
    """torch's SDPA decode over the whole cache (grouped-query)."""
    return lambda: torch.nn.functional.scaled_dot_product_attention(q_post[:, :, None], k, v, scale=scale, enable_gqa=True)


def kv_bytes(batch: int, hkv: int, ctx: int, head_dim: int, dtype=DTYPE) -> int:
    """Bytes a full decode must read: keys and values of every request."""
    return 2 * batch * hkv * ctx * head_dim * torch.empty((), dtype=dtype).element_size()


def floor_us(nbytes: int, bandwidth: float) -> float:
    return 1e6 * nbytes / bandwidth


__all__ = [
    "Q_HEADS", "HEAD_DIM", "DTYPE", "BAND", "LAG", "environment", "copy_bandwidth", "timed_us", "step_inputs", "planted_state",
    "ring_restoring_step", "match_only", "flashinfer_runners", "sdpa_runner", "kv_bytes", "floor_us",
]  # fmt: skip
