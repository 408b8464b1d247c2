"""The verify kernel (lossless MAC's full-attention check of ``L`` tokens) against the ways it can be done instead.

Per shape, context ``C`` and batch ``B``, a block of ``L`` queries per request at positions
``C − L … C − 1``, bf16, each provider timed as CUDA-graph replays (median):

- ``verify``: :func:`mac_triton.verify.verify_step`, each KV group's keys read once for
  its ``L·g`` query rows (out and the exact rows ``R_t``);
- ``L_decodes``: ``L`` full-attention decode steps (:func:`mac_triton.full_step`), what
  verifying costs when each query is its own request (keys read ``L`` times);
- ``one_decode``: one full decode step at ``C − 1``: the bytes of the cache read once, the
  price the verify pass should approach;
- ``sdpa_block``: torch's SDPA with the block's ``L`` queries and a causal mask over the
  cache (grouped-query), no rows.

Columns: µs, the ratio to ``one_decode``, and achieved TB/s counting the cache read once
(``2·B·Hkv·C·D`` bf16 elements) beside the device's copy bandwidth.

    python -m benchmarks.bench_verify [--contexts 8192,32768] [--out benchmarks/results]

Writes ``verify.csv`` and ``verify.md`` into ``--out`` (after every point).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

import mac_triton
from mac_core import MACConfig
from mac_triton.verify import verify_step

from .harness import copy_bandwidth, environment, kv_bytes, timed_us

SHAPES = {"model": (9, 3, 64), "paper": (32, 8, 128)}  # (Hq, Hkv, D): SmolLM2-135M, Llama-3.1-8B
BATCHES = {"model": (1, 16, 64), "paper": (1, 4, 16)}
BLOCKS = (1, 3, 5)


def runners(q, k, v, positions, config: MACConfig) -> dict:
    """``{provider: fn}`` for one block ``q [B, Hq, L, D]`` over the cache ``k, v [B, Hkv, C, D]``."""
    B, Hq, L, D = q.shape
    scale = config.softmax_scale(D)
    C = k.shape[2]
    q_rows = [q[:, :, i].contiguous() for i in range(L)]
    mask = torch.arange(C, device=q.device)[None, :] <= (C - L + torch.arange(L, device=q.device))[:, None]  # [L, C]
    return {
        "verify": lambda: verify_step(q, k, v, positions, config, scale, max_keys=C),
        "L_decodes": lambda: [mac_triton.full_step(q_rows[i], k, v, positions + i, scale) for i in range(L)],
        "one_decode": lambda: mac_triton.full_step(q_rows[-1], k, v, positions + L - 1, scale),
        "sdpa_block": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 32768])
    parser.add_argument("--shapes", type=lambda s: s.split(","), default=list(SHAPES))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_verify times kernels on a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    env, bandwidth = environment(), copy_bandwidth("cuda")
    print(", ".join(f"{k} {v}" for k, v in env.items()) + f", copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    config = MACConfig(window=256, band=256, sinks=4)
    gen = torch.Generator("cuda").manual_seed(0)
    rows = []
    for shape in args.shapes:
        Hq, Hkv, D = SHAPES[shape]
        for ctx in args.contexts:
            for B in BATCHES[shape]:
                k = torch.randn(B, Hkv, ctx, D, generator=gen, device="cuda", dtype=torch.bfloat16)
                v = torch.randn_like(k)
                nbytes = kv_bytes(B, Hkv, ctx, D, torch.bfloat16)
                for L in BLOCKS:
                    q = torch.randn(B, Hq, L, D, generator=gen, device="cuda", dtype=torch.bfloat16)
                    positions = torch.full((B,), ctx - L, dtype=torch.int64, device="cuda")
                    times = {name: timed_us(fn)[0] for name, fn in runners(q, k, v, positions, config).items()}
                    for name, us in times.items():
                        rows.append(dict(gpu=env["gpu"], shape=shape, context=ctx, batch=B, block=L, provider=name, us=round(us, 2),
                                         vs_one_decode=round(us / times["one_decode"], 3), tb_s=round(nbytes / us / 1e6, 3),
                                         copy_tb_s=round(bandwidth / 1e12, 3)))  # fmt: skip
                    print(f"  {shape} ctx={ctx} B={B} L={L}: " + ", ".join(f"{n} {t:.1f} µs" for n, t in times.items()), flush=True)
                del k, v
                write(rows, args.out, env, bandwidth)
    print((args.out / "verify.md").read_text())


def write(rows: list[dict], out: Path, env: dict, bandwidth: float) -> None:
    with open(out / "verify.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"{env['gpu']}, " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "gpu") + f"; copy bandwidth {bandwidth / 1e12:.2f} TB/s; bf16", "",
             "µs (× one decode step; TB/s counting the cache read once)", "",
             "| shape | context | batch | L | verify | L decodes | one decode | SDPA, causal block |", "|---|---|---|---|---|---|---|---|"]
    points = sorted({(r["shape"], r["context"], r["batch"], r["block"]) for r in rows})
    for point in points:
        here = {r["provider"]: r for r in rows if (r["shape"], r["context"], r["batch"], r["block"]) == point}
        cells = [f"{here[p]['us']} ({here[p]['vs_one_decode']}×, {here[p]['tb_s']})" for p in ("verify", "L_decodes", "one_decode", "sdpa_block")]
        lines.append(f"| {' | '.join(str(x) for x in point)} | " + " | ".join(cells) + " |")
    (out / "verify.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
