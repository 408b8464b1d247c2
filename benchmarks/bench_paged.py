"""Paged KV on a CUDA GPU: the MAC step and the full decode over pages, beside the contiguous cache
and FlashInfer's paged decode at the same page size.

For page sizes 1, 16 and 64, in one run (CUDA-graph replays, median; ``harness.timed_us``):

- ``mac`` / ``mac_paged``: :func:`mac_triton.mac_step` over the contiguous cache and over
  the same keys in shuffled ``NHD`` pages (:func:`mac_core.kv.to_paged`), on the same
  planted rings (``harness.planted_state``) at 0 %, 95 % and 100 % hits; the target is
  ``mac_paged`` within 5 % of ``mac``;
- ``triton_full`` / ``triton_full_paged``: :func:`mac_triton.full_step` over both;
- ``flashinfer``: ``BatchDecodeWithPagedKVCacheWrapper(backend="fa2")`` over ``HND``
  pages of the same size, tensor cores on and off (the faster).

Shapes as the kernel benchmark's (Hq 32, Hkv 8, D 128, bf16, ring 1024, band 256).
Before timing, each paged provider's output is checked against its contiguous twin.

Usage: ``python -m benchmarks.bench_paged [--out benchmarks/results]``; writes
``paged.csv``, ``paged.md`` and ``paged.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

import mac_triton
from mac_core.numerics import softmax_scale
from mac_core import MACConfig, to_paged

from .harness import BAND, HEAD_DIM, environment, flashinfer_runners, planted_state, ring_restoring_step, step_inputs, timed_us

PAGE_SIZES = (1, 16, 64)
HIT_RATES = (0.0, 0.95, 1.0)
SHAPES = ((16, 32768), (1, 131072))  # (batch, context)
HKV, WINDOW = 8, 1024


def run_shape(batch: int, ctx: int, rep_ms: int, rows: list) -> None:
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(ctx + batch)
    positions, k, v, q_pre, q_post = step_inputs(HKV, batch, ctx, gen)
    scale = softmax_scale(HEAD_DIM)
    config = MACConfig(window=WINDOW, band=BAND, tau=0.45)
    base = dict(gpu=torch.cuda.get_device_name(), hkv=HKV, batch=batch, ctx=ctx)

    def record(provider, page, rate, us, mode, **extra):
        rows.append(dict(base, provider=provider, page_size=page, hit_rate=rate, median_us=round(us, 2), timing=mode, **extra))

    contiguous = {}
    us, mode = timed_us(lambda: mac_triton.full_step(q_post, k, v, positions, scale), rep_ms)
    record("triton_full", "", "", us, mode)
    states = {rate: planted_state(q_pre, WINDOW, ctx - 1, rate, gen)[0] for rate in HIT_RATES}
    for rate, state in states.items():
        us, mode = timed_us(ring_restoring_step(q_pre, q_post, k, v, state.clone(), positions, config), rep_ms)
        contiguous[rate] = us
        record("mac", "", rate, us, mode)
    for page in PAGE_SIZES:
        kp, vp = to_paged(k, v, positions + 1, page, "NHD", generator=torch.Generator().manual_seed(page))
        full_want = mac_triton.full_step(q_post, k, v, positions, scale)[0]
        full_got = mac_triton.full_step(q_post, kp, vp, positions, scale)[0]
        assert torch.equal(full_got, full_want), f"paged full decode differs at page size {page}"
        us, mode = timed_us(lambda: mac_triton.full_step(q_post, kp, vp, positions, scale), rep_ms)
        record("triton_full_paged", page, "", us, mode)
        for rate, state in states.items():
            step = ring_restoring_step(q_pre, q_post, kp, vp, state.clone(), positions, config)
            want = ring_restoring_step(q_pre, q_post, k, v, state.clone(), positions, config)()
            got = step()
            assert torch.equal(got[0], want[0]), f"paged MAC step differs at page size {page}, hits {rate}"
            us, mode = timed_us(step, rep_ms)
            record("mac_paged", page, rate, us, mode, paged_over_contiguous=round(us / contiguous[rate], 3))
        del kp, vp
        fi = flashinfer_runners(q_post, k, v, positions, page=page)
        if fi:
            us, mode = min(timed_us(fn, rep_ms) for fn in fi.values())
            record("flashinfer", page, "", us, mode)
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--rep-ms", type=int, default=100)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    versions = environment()
    print(", ".join(f"{k} {v}" for k, v in versions.items()))
    rows = []
    from tqdm import tqdm

    for batch, ctx in tqdm(SHAPES, desc="shapes", file=sys.stdout):
        run_shape(batch, ctx, args.rep_ms, rows)
    fields = ["gpu", "hkv", "batch", "ctx", "provider", "page_size", "hit_rate", "median_us", "timing", "paged_over_contiguous"]
    with open(out / "paged.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

    lines = [", ".join(f"{k} {v}" for k, v in versions.items()), "",
             "| B | ctx | page | MAC paged / contiguous at 0 / 95 / 100 % hits | Triton full paged µs | FlashInfer paged µs |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for batch, ctx in SHAPES:
        mine = [r for r in rows if r["batch"] == batch and r["ctx"] == ctx]
        for page in PAGE_SIZES:
            ratios = [r["paged_over_contiguous"] for r in mine if r["provider"] == "mac_paged" and r["page_size"] == page]
            full = next(r["median_us"] for r in mine if r["provider"] == "triton_full_paged" and r["page_size"] == page)
            fi = next((r["median_us"] for r in mine if r["provider"] == "flashinfer" and r["page_size"] == page), "–")
            lines.append(f"| {batch} | {ctx} | {page} | " + " / ".join(f"{x:.3f}" for x in ratios) + f" | {full} | {fi} |")
    table = "\n".join(lines)
    print(table)
    (out / "paged.md").write_text(table + "\n")
    _plot(rows, out / "paged.png")


def _plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SHAPES), figsize=(10, 3.6), sharey=True)
    for ax, (batch, ctx) in zip(axes, SHAPES):
        for rate in HIT_RATES:
            ratios = [next(r["paged_over_contiguous"] for r in rows if r["provider"] == "mac_paged" and r["batch"] == batch
                           and r["ctx"] == ctx and r["page_size"] == p and r["hit_rate"] == rate) for p in PAGE_SIZES]  # fmt: skip
            ax.plot(range(len(PAGE_SIZES)), ratios, marker="o", label=f"{rate:.0%} hits")
        ax.axhline(1.05, color="grey", ls="--", lw=1, label="target: within 5 %")
        ax.set_xticks(range(len(PAGE_SIZES)), [str(p) for p in PAGE_SIZES])
        ax.set_xlabel("page size (tokens)")
        ax.set_title(f"B = {batch}, context {ctx // 1024}K")
    axes[0].set_ylabel("MAC step time, paged / contiguous")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
