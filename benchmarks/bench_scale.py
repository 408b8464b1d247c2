"""MAC at the paper's scale: the engine on a Llama-3.1-8B-shaped decoder, speed at planted hit rates.

A decoder of Llama-3.1-8B's shapes (32 layers, dim 4096, Hq 32, Hkv 8, D 128, FFN 14336,
vocabulary 128,256) with random weights made on the GPU (bf16, 16 GB; nothing to download),
in :class:`~mac_llm.engine.DecodeEngine` with everything but the attention compiled and the
whole step one CUDA graph, for every provider alike. At each context ``C`` and batch ``B``
the cache holds ``C`` random keys and values per request (no prefill: what is measured is a
decode step at that length) and the rings are *planted*, as ``benchmarks/bench_decode.py``
plants them: for a share ``h`` of the (request, query head) pairs, ring row ``t − lag``
holds the zero vector and every other row a vector of norm ``≈ 50·sqrt(D)``. The model's
pre-RoPE queries have unit-variance entries, so a query is ``≈ D`` (squared) from the zero
row and ``≈ 2D`` from another query; the distance test at ``τ`` = :data:`TAU` (squared radius
``1.4·D``) accepts the zero row and little else, so those pairs hit (at lag ``lag`` plus the
steps since planting) and the others miss. The steps are fed random tokens (a random
model's greedy text repeats itself, and a repeated token repeats its first-layer query);
the measured hit rate of the timed steps is reported beside the planted one. The model's
queries are its own (random weights), so the output is a speed at a given hit rate, **not**
a quality: nothing here measures what MAC would do to a trained 8B model's text.

Providers: ``sdpa``, ``triton`` (the project's full decode), ``flashinfer`` (when it imports),
``mac@h`` for each planted hit rate ``h``, and ``verified``: one round of lossless MAC that
drafts nothing (:class:`~mac_llm.lossless.LosslessDecoder`, a fixed block of ``--verify-block``
positions, the verify pass one CUDA graph), what each round of lossless MAC pays besides its
drafts (``benchmarks/bench_lossless.py --project`` combines it with the acceptance measured
on the real model). Per point: the median step latency over
``--steps`` steps (CUDA events), tokens per second, the speed-up over the best full attention,
the measured hit rate of the timed steps and the KV bytes a full step reads at the achieved
rate (TB/s).

    python -m benchmarks.bench_scale [--contexts 32768,65536,131072] [--batches 1,4,16] [--out DIR]
    python -m benchmarks.bench_scale --smoke     # a tiny model on the CPU: the script's logic, no timings

Writes ``scale.csv``, ``scale.md`` and ``scale.png`` (speed-up against the hit rate, a line
per context and batch) into ``--out``, rewritten after every point, so a run cut short keeps
the points it measured.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
from pathlib import Path

import torch

from mac_core import LayerState, MACConfig, Summary
from mac_llm.engine import DecodeEngine
from mac_llm.llama import LlamaModel, ModelConfig
from mac_llm.step_attention import new_workspaces

LLAMA_8B = ModelConfig(n_layers=32, dim=4096, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256, context_length=131072,
                       rope_base=500000.0, norm_eps=1e-5)  # fmt: skip
SMOKE = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=97, context_length=4096, rope_base=10000.0, norm_eps=1e-5)
HIT_RATES = (0.0, 0.5, 0.9, 0.95, 0.99, 1.0)
FULL = ("sdpa", "triton", "flashinfer")
FAR = 50.0  # the norm of a planted "far" row, in units of a unit-variance vector's
TAU = 1 - math.sqrt(0.7)  # squared radius 2D(1 − τ)² = 1.4·D: between a query's distance to zero (≈ D) and to another query (≈ 2D)


def mac_config(window: int, band: int) -> MACConfig:
    """The paper's distance test at :data:`TAU`: a planted zero row is inside, a far row and (mostly) another query outside."""
    return MACConfig(window=window, band=band, tau=TAU)


def plant(engine: DecodeEngine, context: int, hit_rate: float, gen: torch.Generator, lag: int) -> int:
    """Random keys and values up to ``context`` and rings planted for ``hit_rate`` (see the module
    docstring); the next step decodes position ``context``. Returns the number of hit pairs."""
    cfg, B, W = engine.model.config, engine.batch, engine.config.window
    Hq, D, device = cfg.n_heads, cfg.head_dim, engine.device
    for k, v in zip(engine.k, engine.v):
        k[:, :, :context].normal_(generator=gen)
        v[:, :, :context].normal_(generator=gen)
    n_hit = round(hit_rate * B * Hq)
    hit = (torch.arange(B * Hq, device=device) < n_hit).view(B, Hq, 1)
    first = context - W  # the ring holds positions context − W … context − 1
    engine.states = []
    for _ in range(cfg.n_layers):
        ring_q = FAR * torch.randn(B, Hq, W, D, generator=gen, device=device)
        ring_q[:, :, W - lag] = torch.where(hit, 0.0, ring_q[:, :, W - lag])
        rows = Summary(torch.randn(B, Hq, W, D, generator=gen, device=device), torch.randn(B, Hq, W, generator=gen, device=device) + 5.0)
        state = LayerState.empty(B, Hq, D, W, dtype=engine.dtype, device=device)
        engine.states.append(state.seed(ring_q.to(engine.dtype), rows, torch.full((B,), context, device=device), first_position=first))
    engine.workspaces = new_workspaces(engine.layer_configs, B, cfg, device)
    engine.positions.fill_(context)
    engine.host_positions = [context] * B
    engine.tokens.random_(0, cfg.vocab_size, generator=gen)
    engine.rings_stale = False
    return n_hit


def elapsed_ms(run, device: torch.device) -> float:
    """Milliseconds of one ``run()``: CUDA events on a GPU, a host clock on a CPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        run()
        return 1e3 * (time.perf_counter() - t0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def measure(engine: DecodeEngine, steps: int, gen: torch.Generator) -> tuple[float, float]:
    """Median step latency (ms) over ``steps`` steps fed random tokens, after the capture, and the
    hit rate of the timed MAC steps (``nan`` for full attention)."""
    cfg, device = engine.model.config, engine.device
    tokens = torch.randint(0, cfg.vocab_size, (steps + 1, engine.batch), generator=gen, device=device)
    engine.step(tokens[0])  # the capture (warm-ups undone) and a first replay
    times, hits = [], []
    for s in range(1, steps + 1):
        times.append(elapsed_ms(lambda: engine.step(tokens[s]), device))
        stats = engine.step_stats()
        if stats is not None:
            hits.append(stats.hit.float().mean())
    return statistics.median(times), (torch.stack(hits).mean().item() if hits else math.nan)


def measure_verify(engine: DecodeEngine, block: int, steps: int) -> float:
    """Median latency (ms) of a lossless round that drafts nothing (the verify pass over ``block``
    positions, accepting full attention's token) over ``steps`` rounds, after the capture."""
    from mac_llm.lossless import DraftLength, LosslessDecoder

    decoder = LosslessDecoder(engine, DraftLength(k_max=0), block=block)
    decoder.round(0)  # the capture and a first replay
    return statistics.median(elapsed_ms(lambda: decoder.round(0), engine.device) for _ in range(steps))


def run(args, header: str) -> list[dict]:
    device = torch.device(args.device)
    smoke = args.smoke
    cfg = SMOKE if smoke else LLAMA_8B
    dtype = torch.float32 if smoke else torch.bfloat16
    t0 = time.time()
    model = LlamaModel.random(cfg, seed=0, device=device, dtype=dtype)
    print(f"{cfg}: weights made in {time.time() - t0:.0f} s", flush=True)
    gen = torch.Generator(device=device).manual_seed(1)
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            capacity = context + args.steps + args.verify_block + 8
            kv_gb = 2 * cfg.n_layers * batch * cfg.n_kv_heads * capacity * cfg.head_dim * (2 if dtype == torch.bfloat16 else 4) / 1e9
            if device.type == "cuda" and kv_gb + 20 > torch.cuda.get_device_properties(device).total_memory / 1e9:
                print(f"  C={context} B={batch}: {kv_gb:.0f} GB of KV cache does not fit, skipped", flush=True)
                continue
            config = mac_config(args.window, args.band)
            engine = DecodeEngine(model, batch, capacity, "sdpa", config, dtype=dtype, device=device, compile=not smoke)
            plant(engine, context, 0.0, gen, args.lag)
            checkpoint = engine.checkpoint()
            point = dict(context=context, batch=batch, kv_gb=round(kv_gb, 2))
            results = {}
            for provider in (*FULL, *(["verified"] if args.verify_block else []), *(f"mac@{h:g}" for h in args.hit_rates)):
                if provider == "flashinfer":
                    try:
                        import flashinfer  # noqa: F401
                    except Exception:  # noqa: BLE001 - an optional baseline
                        continue
                if provider.startswith("mac@"):
                    plant(engine, context, float(provider[4:]), gen, args.lag)
                    engine.switch("mac", config)
                else:
                    engine.rewind(checkpoint)
                    engine.switch("mac" if provider == "verified" else provider, config)
                if provider == "verified":
                    ms, hit_rate = measure_verify(engine, args.verify_block, args.steps), math.nan
                else:
                    ms, hit_rate = measure(engine, args.steps, gen)
                results[provider] = ms
                full_bytes = kv_gb * 1e9 * context / capacity  # the keys and values a full step reads
                rows.append(point | dict(provider=provider, step_ms=round(ms, 4), tokens_per_s=round(batch / ms * 1e3, 1),
                                         hit_rate=round(hit_rate, 4) if not math.isnan(hit_rate) else "",
                                         full_kv_tb_per_s=round(full_bytes / (ms * 1e-3) / 1e12, 3)))
                engine.graphs.clear()
            best = min(results[p] for p in FULL if p in results)
            for row in rows[-len(results):]:
                row["speedup_vs_best_full"] = round(best / row["step_ms"], 3)
            print(f"  C={context} B={batch}: " + ", ".join(f"{p} {ms:.2f} ms" for p, ms in results.items()), flush=True)
            write(rows, args.out, header)
            del engine, checkpoint
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def write(rows: list[dict], out: Path, header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "scale.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    macs = sorted({r["provider"] for r in rows if r["provider"].startswith("mac@")}, key=lambda p: float(p[4:]))
    verified = any(r["provider"] == "verified" for r in rows)
    lines = [header, "", "| context | batch | best full attention, tok/s | " + ("full through the verify pass | " if verified else "")
             + " | ".join(f"MAC at {100 * float(p[4:]):g} % hits" for p in macs) + " |", "| --- | --- | --- | " + "--- | " * (len(macs) + verified)]
    for context, batch in sorted({(r["context"], r["batch"]) for r in rows}):
        here = {r["provider"]: r for r in rows if (r["context"], r["batch"]) == (context, batch)}
        best = max((here[p] for p in FULL if p in here), key=lambda r: r["tokens_per_s"])
        cells = [f"{here[p]['speedup_vs_best_full']}× ({here[p]['hit_rate']:.0%})" if p in here and here[p]["hit_rate"] != "" else "–" for p in macs]
        if verified:
            cells.insert(0, f"{here['verified']['speedup_vs_best_full']}×" if "verified" in here else "–")
        lines.append(f"| {context // 1024}K | {batch} | {best['provider']}, {best['tokens_per_s']:,.0f} | " + " | ".join(cells) + " |")
    (out / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    scale_plot(rows, out / "scale.png")


def scale_plot(rows: list[dict], path: Path) -> Path:
    """Speed-up over the best full attention against the measured hit rate, a line per (context, batch)."""
    from .plots import _pyplot, _ratio_axis, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    points = sorted({(r["context"], r["batch"]) for r in rows})
    for i, (context, batch) in enumerate(points):
        macs = sorted((r for r in rows if (r["context"], r["batch"]) == (context, batch) and r["provider"].startswith("mac@")),
                      key=lambda r: float(r["provider"][4:]))  # fmt: skip
        ax.plot([100 * float(r["hit_rate"]) for r in macs], [float(r["speedup_vs_best_full"]) for r in macs], marker="o", lw=2,
                color=plt.cm.viridis(i / max(len(points) - 1, 1)), label=f"{context // 1024}K, batch {batch}")  # fmt: skip
    top = max((float(r["speedup_vs_best_full"]) for r in rows), default=1.0)
    _ratio_axis(ax, ticks=[t for t in (0.5, 1, 2, 5, 10, 20) if t <= 2 * top])
    ax.set_xlabel("measured hit rate of the timed steps (%)")
    ax.set_ylabel("tokens/s over the best full attention")
    ax.set_title("Llama-3.1-8B-shaped engine (random weights): speed at a planted hit rate")
    ax.legend(loc="upper left", frameon=False)
    return _save(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--contexts", type=ints, default=[32768, 65536, 131072], help="context lengths")
    parser.add_argument("--batches", type=ints, default=[1, 4, 16], help="batch sizes (points that do not fit are skipped)")
    parser.add_argument("--hit-rates", type=lambda s: [float(x) for x in s.split(",")], default=list(HIT_RATES), help="planted hit rates")
    parser.add_argument("--window", type=int, default=1024, help="ring size W")
    parser.add_argument("--band", type=int, default=256, help="band r")
    parser.add_argument("--lag", type=int, default=64, help="the planted row's lag")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per provider")
    parser.add_argument("--verify-block", type=int, default=5, help="positions of the verified round (lossless MAC's k_max + 1; 0: not timed)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (eager, interpreter): the script's logic only")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.contexts, args.batches, args.window, args.band, args.lag, args.steps = "cpu", [300], [2], 64, 16, 8, 2
    from .harness import environment

    env = environment()
    header = (f"Llama-3.1-8B-shaped decoder, random weights, bf16, {env['gpu']}, torch {env['torch']}, triton {env['triton']}; "
              "every provider's step one CUDA graph, everything but the attention compiled; MAC: W "
              f"{args.window}, band {args.band}, planted rows at lag {args.lag}; cells: speed-up over the best full attention "
              "(measured hit rate). Speed at a given hit rate, not a quality measurement.")
    run(args, header)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
