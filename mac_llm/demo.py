"""`mac-attention demo`: MAC-Attention in every layer of a real model, against full attention.

The model is SmolLM2-135M-Instruct (the packaged GGUF file) or any Llama-architecture GGUF
file (``--model PATH``). The run: one full-attention prefill of a long prompt (shared: a
MAC prefill *is* full attention), then ``N`` greedy tokens with full attention and ``N``
with MAC-Attention, from the same KV cache. The report compares them, with the numbers of
this run only:

- hit rate overall and per layer, KV reads skipped (per query head and per KV group);
- the bytes a token moves through memory, all layers: full attention's keys and values
  against MAC's (keys and values read, the match scan of the query rings, the rows read
  and written: :meth:`mac_core.step.StepStats.bytes_moved`);
- under teacher forcing (MAC reads the full-attention text): top-1 agreement and the mean
  and worst ``KL(full ‖ MAC)`` of the next-token distributions. Until the first greedy
  disagreement the free MAC run *is* that teacher-forced run, so a third pass is only needed
  when the texts part;
- where the greedy texts part, how close full attention's own top two tokens were there,
  both continuations scored by full attention (perplexity) and their repeated 4-grams;
- tokens per second of both, a per-layer plot, and a short verdict of what the run shows.

On a CUDA device (backend ``auto`` is then ``triton``) it also times the GPU path:
:func:`engine_speed` decodes ``--engine-batch`` copies of the prompt with
:class:`~mac_llm.engine.DecodeEngine` (bf16, the whole step one CUDA graph) with SDPA,
the project's Triton full decode and MAC (with and without the fallback policy), and
prints the tokens per second and MAC's speed-up over the faster full attention. On a CPU
the report says that the reference is a readable path, not a fast one, and where the
measured GPU tables are.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

from mac_core import PRESETS

from . import decoding, fidelity
from .attention import FullAttention
from .gguf import GGUFFile, ModelNotInstalledError, load_model
from .options import InvalidOption, add_mac_options, config_from, positive_int
from .step_attention import mac_decode_step

# The demo's MAC configuration is the "demo" preset of mac_core.config (the best point of
# the fidelity study, docs/real_model.md); see there before changing it.
DEFAULTS = PRESETS["demo"]
DEFAULT_PROMPT_TOKENS = 2048
DEFAULT_NEW_TOKENS = 64


class DemoError(InvalidOption):
    """An invalid demo option or a missing model, reported as ``mac-attention: error: ...``."""


def add_demo_options(parser: argparse.ArgumentParser) -> None:
    add_mac_options(parser, DEFAULTS)
    parser.add_argument("--backend", choices=("auto", "ref", "triton"), default="auto",
                        help="decode step: mac_ref or mac_triton (auto: triton on a CUDA device, ref on the CPU)")
    parser.add_argument("--engine-batch", type=positive_int, default=64,
                        help="on CUDA: requests (copies of the prompt) the batched GPU engine is timed with")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    parser.add_argument("--model", type=Path, help="a Llama-architecture GGUF file (default: the packaged SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt-file", type=Path, help="text file to use as the prompt (default: Python's pydoc topics)")
    parser.add_argument(
        "--prompt-tokens", type=positive_int, default=DEFAULT_PROMPT_TOKENS,
        help="at most this many prompt tokens (cut at the last paragraph that ends a sentence)",
    )  # fmt: skip
    parser.add_argument("-n", "--new-tokens", type=positive_int, default=DEFAULT_NEW_TOKENS, help="tokens N to decode")
    parser.add_argument("--plot", type=Path, default=Path("mac_demo_layers.png"), help="where to save the per-layer plot")
    parser.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--lossless", action="store_true",
                        help="also decode losslessly: MAC drafts, full attention verifies (mac_llm.lossless); its tokens are full attention's")
    parser.add_argument("--k-max", type=positive_int, default=4, help="with --lossless: the most tokens a round drafts (below --window)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DemoError(f"--device: unknown device {name!r} (expected cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DemoError(f"--device {name}: no CUDA device is available (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise DemoError(f"--device: expected cpu or cuda, got {name!r}")
    return device


def check_prompt_file(path: Path | None) -> None:
    """Before the slow model load: the prompt file must be a readable file."""
    if path is None:
        return
    if not path.exists():
        raise DemoError(f"--prompt-file: {path} does not exist")
    if not path.is_file():
        raise DemoError(f"--prompt-file: {path} is not a file")


def step_function(backend: str, device: torch.device):
    if backend == "triton" and device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first Triton import
        # the interpreter runs kernels through numpy, which warns on every −inf of an empty summary
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")
        print("note: --backend triton on the CPU runs the kernels in the Triton interpreter (numpy): correct, but very slow")
    try:
        return mac_decode_step(backend)
    except ImportError as err:
        raise DemoError(f"--backend {backend}: {err}") from None


def prompt_tokens(tokenizer, args, context_length: int) -> list[int]:
    if args.prompt_file is not None:
        check_prompt_file(args.prompt_file)
        text = args.prompt_file.read_text(encoding="utf-8", errors="replace")
    else:
        text = decoding.default_prose()
    encoding = tokenizer.encode(text)
    ids, offsets = encoding.ids[: args.prompt_tokens], encoding.offsets[: args.prompt_tokens]
    # end on a finished paragraph (not mid-sentence or mid-grammar-rule), if one ends in the second half
    paragraph_end = text.rfind(".\n\n", 0, offsets[-1][1]) + 3 if ids else 0
    if ids and paragraph_end > offsets[len(ids) // 2][0]:
        ids = [i for i, (_, end) in zip(ids, offsets) if end <= paragraph_end]
    if len(ids) < 2:
        raise DemoError("the prompt has fewer than 2 tokens")
    if len(ids) + args.new_tokens > context_length:
        raise DemoError(
            f"the prompt ({len(ids)} tokens) plus {args.new_tokens} new tokens exceeds the model's context of "
            f"{context_length} tokens: lower --prompt-tokens or --new-tokens"
        )
    return ids


def layer_plot(hit: list[float], skipped: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = range(len(hit))
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.bar([i - 0.2 for i in layers], [100 * h for h in hit], width=0.4, label="hit rate")
    ax.bar([i + 0.2 for i in layers], [100 * s for s in skipped], width=0.4, label="KV reads skipped (per head)")
    ax.set(xlabel="layer", ylabel="%", ylim=(0, 100))
    ax.set_title(title, pad=28)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)  # above the axes, clear of the bars
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def engine_speed(model, prompt: list[int], config, device, batch: int, steps: int = 16) -> dict[str, float]:
    """Tokens per second of :class:`~mac_llm.engine.DecodeEngine` on ``batch`` copies of ``prompt``.

    One prefill, then per attention from the same checkpoint a first step (the capture) and
    ``steps`` timed greedy steps (their median latency): ``"sdpa"``,
    ``"triton"`` (full attention), ``"mac"`` and ``"mac_policy"`` (MAC with the default
    :class:`~mac_llm.engine.FallbackPolicy`). bf16 on CUDA, everything but the attention
    compiled (``torch.compile``) inside one CUDA graph per step, as a serving engine builds
    it; float32 on a CPU (eager: the tests' path, not a timing). Returns ``{attention: tokens per second}``.
    """
    from .engine import DecodeEngine, FallbackPolicy

    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    engine = DecodeEngine(model, batch, len(prompt) + steps + 2, "sdpa", config, dtype=dtype, device=device, compile=device.type == "cuda")
    engine.prefill([list(prompt)] * batch)
    saved = engine.checkpoint()
    rates = {}
    for name, attention, policy in (("sdpa", "sdpa", None), ("triton", "triton", None), ("mac", "mac", None),
                                    ("mac_policy", "mac", FallbackPolicy())):
        engine.switch(attention, config if attention == "mac" else None, policy)
        engine.rewind(saved)
        engine.step()  # the capture (on CUDA) and a first step, not timed
        rates[name] = batch / statistics.median(engine.timed_steps(steps)) * 1e3
    return rates


def print_engine_speed(rates: dict[str, float], batch: int, context: int) -> None:
    best = max(("sdpa", "triton"), key=rates.get)
    print(f"\nThe GPU path (mac_llm.engine: bf16, compiled, one CUDA graph per step), {batch} requests at {context} tokens of context")
    for name, rate in rates.items():
        print(f"  {name:<11} {rate:10.1f} tok/s   {rate / rates[best]:5.2f}x the faster full attention ({best})")
    print(f"  (one prompt of {context} tokens; other batches and contexts: benchmarks/RESULTS.md, section 'End to end')")


def lossless_run(model, prompt: list[int], config, device, backend: str, new_tokens: int, k_max: int) -> dict:
    """``new_tokens`` greedy tokens of lossless MAC (:class:`~mac_llm.lossless.LosslessDecoder`)
    after ``prompt``, in float32 like the demo's other runs, with the round log."""
    from .engine import DecodeEngine
    from .lossless import DraftLength, LosslessDecoder

    engine = DecodeEngine(model, 1, len(prompt) + new_tokens + k_max + 1, "mac", config, dtype=torch.float32, device=device, mac_backend=backend)
    engine.prefill([list(prompt)])
    decoder = LosslessDecoder(engine, DraftLength(k_max=k_max), block=k_max + 1)  # one verify shape: graphed on a GPU
    start = time.perf_counter()
    tokens = decoder.generate(new_tokens, progress=True)[0]
    return dict(tokens=tokens, seconds=time.perf_counter() - start, log=decoder.log)


def print_lossless(run: dict, full_list: list[int], k_max: int, device, backend: str) -> None:
    log, N = run["log"], len(full_list)
    same = sum(a == b for a, b in zip(run["tokens"], full_list))
    accepted = [a for k, row in zip(log.k, log.accepted) if k for a in row]
    print(f"\nLossless MAC (MAC drafts up to {k_max} tokens, one full-attention pass verifies them; mac_llm.lossless)")
    print(f"  greedy tokens identical to full attention's {same:4d} / {N}")
    by_length = ", ".join(f"{n} in {c}" for n, c in log.histogram().items())
    print(f"  rounds {len(log.k)} for {N} tokens: {log.draft_share:.0%} drafted, {sum(accepted) / max(len(accepted), 1):.2f} drafts accepted "
          f"per round (drafts accepted in rounds: {by_length})")
    print(f"  tokens per second                {N / run['seconds']:8.2f} ({device}, {backend}, float32; speed is measured in bf16 on a GPU: benchmarks/bench_lossless.py)")


def text(tokenizer, ids) -> str:
    return repr(tokenizer.decode(list(ids))[:160])


def run_demo(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from(args)  # validate the options before the slow load
    if args.lossless and args.k_max >= config.window:
        raise DemoError(f"--k-max {args.k_max} must be below --window {config.window} (a round's rows need distinct ring slots)")
    if args.lossless and config.calibration is not None:
        raise DemoError("--lossless decodes in the batched engine, which does not calibrate radii: drop --calibration")
    check_prompt_file(args.prompt_file)
    device = resolve_device(args.device)
    if args.backend == "auto":
        args.backend = "triton" if device.type == "cuda" else "ref"
    step_fn = step_function(args.backend, device)
    wall = time.perf_counter()
    try:
        file = GGUFFile(args.model)
    except ModelNotInstalledError as err:
        raise DemoError(str(err)) from None
    except ValueError as err:
        raise DemoError(f"--model: {err}") from None
    context = file.config.context_length
    if args.prompt_tokens + args.new_tokens > context:  # before the slow part: dequantizing the weights
        raise DemoError(f"--prompt-tokens {args.prompt_tokens} plus {args.new_tokens} new tokens exceed the model's context of "
                        f"{context} tokens: lower --prompt-tokens or --new-tokens")
    print(f"loading {file.path.name} (GGUF, dequantized to float32) ...", flush=True)
    model, tokenizer = load_model(file, device=device)
    config = dataclasses.replace(config, rope_base=model.config.rope_base)
    ids = prompt_tokens(tokenizer, args, context)
    n, N = len(ids), args.new_tokens
    print(f"prompt: {n} tokens; decoding {N} tokens with full attention and with MAC-Attention on {device}")
    print(f"MAC: {config.describe()}, backend {args.backend}")

    start = time.perf_counter()
    prefilled = decoding.prefill(model, torch.tensor([ids], device=device), n + N, keep=config.window)
    print(f"prefill (full attention, shared): {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    full_tokens, full_logits = decoding.greedy_decode(model, prefilled.cache.clone(), FullAttention(), prefilled.last_logits, N, True, "full attention")
    full_seconds = time.perf_counter() - start

    mac, cache = decoding.mac_continuation(model, prefilled, config, step_fn=step_fn)
    start = time.perf_counter()
    mac_tokens, mac_logits = decoding.greedy_decode(model, cache, mac, prefilled.last_logits, N, True, "MAC-Attention ")
    mac_seconds = time.perf_counter() - start

    same = (full_tokens == mac_tokens)[0]
    first_diff = int((~same).nonzero()[0]) if not bool(same.all()) else -1
    forced = mac
    if first_diff >= 0:  # the texts part: teacher-force MAC on the full-attention text for top-1 and KL
        forced, cache = decoding.mac_continuation(model, prefilled, config, step_fn=step_fn)
        mac_logits = decoding.forced_decode(model, cache, forced, full_tokens, True, "MAC teacher-forced")
    # logits[:, i] follows token i and predicts token i+1: the last one has no target
    r = fidelity.fidelity(full_logits[:, :-1], mac_logits[:, :-1], full_tokens[:, 1:], forced)
    free = fidelity.fidelity(full_logits[:, :-1], mac_logits[:, :-1], full_tokens[:, 1:], mac) if forced is not mac else r

    cfg = model.config
    moved = mac.layer_stats().bytes_moved(cfg.n_kv_heads, cfg.head_dim, config.window, model.embed.element_size(), model.embed.element_size())
    mib = {part: b / N / 2**20 for part, b in moved.items()}  # per token, all layers
    mac_mib = mib["kv"] + mib["scan"] + mib["rows"]
    print()
    print(f"MAC-Attention against full attention, {file.path.name}, every layer")
    print(f"  hit rate                         {free['hit_rate']:8.1%}   (per layer: {args.plot})")
    print(f"  KV reads skipped, per query head {free['skipped_head']:8.1%}")
    print(f"  KV reads skipped, per KV group   {free['skipped_group']:8.1%}   (a group reads the union of its heads' spans)")
    print(f"  bytes moved per token            {mib['full_kv']:8.1f} MiB full attention (keys and values), {mac_mib:.1f} MiB MAC: "
          f"{mib['kv']:.1f} keys and values + {mib['scan']:.1f} match scan + {mib['rows']:.1f} rows")
    print(f"  teacher forcing: top-1 agreement {r['top1']:8.1%}")
    print(f"  teacher forcing: KL(full‖MAC)    {r['kl_mean']:8.2e} mean, {r['kl_max']:.2e} worst step")
    agreement = "all" if first_diff < 0 else f"the texts part at token {first_diff}"
    print(f"  greedy tokens identical          {int(same.sum()):4d} / {N}   ({agreement})")
    print(f"  tokens per second                {N / full_seconds:8.2f} full attention, {N / mac_seconds:.2f} MAC ({device}, {args.backend})")
    hit_by_layer = " ".join(f"{100 * h:3.0f}" for h in free["layer_hit"])
    print(f"  hit % by layer  {hit_by_layer}")

    full_list, mac_list = full_tokens[0].tolist(), mac_tokens[0].tolist()
    print()
    if first_diff < 0:
        print(f"The greedy texts are identical ({N} tokens):", text(tokenizer, full_list))
    else:
        # both continuations scored by full attention: MAC's own text needs one full-attention pass over it
        mac_scored = decoding.full_block_logits(model, prefilled, mac_tokens)[0]
        ppl_full = fidelity.scored_perplexity(full_logits[0], prefilled.last_logits[0], full_tokens[0])
        ppl_mac = fidelity.scored_perplexity(mac_scored, prefilled.last_logits[0], mac_tokens[0])
        top2 = full_logits[0, first_diff - 1].topk(2).values if first_diff else prefilled.last_logits[0].topk(2).values
        margin = (top2[0] - top2[1]).item()
        print(f"Where the greedy texts part (token {first_diff} of {N})")
        for label, ids in (("shared", full_list[:first_diff]), ("full attention", full_list[first_diff:]), ("MAC-Attention", mac_list[first_diff:])):
            print(f"  {label:<15} {text(tokenizer, ids)}")
        print(f"  full attention's own top two tokens there were {margin:.2f} logits apart; under teacher forcing MAC moves")
        print(f"  the top-2 gap by {r['gap_err_median']:.2f} logits at the median step ({r['gap_err_p99']:.2f} at the 99th percentile),")
        print(f"  and {r['near_ties']:.0%} of full attention's steps are near-ties (gap < {fidelity.NEAR_TIE}): one flip there changes the rest")
        print(f"  scored by full attention: perplexity {ppl_full:.2f} of its own text, {ppl_mac:.2f} of MAC's; "
              f"repeated 4-grams {fidelity.repeated_ngrams(full_list):.0%} and {fidelity.repeated_ngrams(mac_list):.0%}")

    print()
    print("What this run shows")
    print(f"  - reads: MAC moved {mac_mib / mib['full_kv']:.0%} of the bytes full attention reads per token "
          f"({mac_mib:.1f} of {mib['full_kv']:.1f} MiB, rings included)")
    close = "close to" if r["top1"] >= 0.9 else "away from"
    print(f"  - teacher-forced quality: its next-token distributions stay {close} full attention's "
          f"(top-1 {r['top1']:.1%}, mean KL {r['kl_mean']:.1e})")
    if first_diff >= 0:
        print(f"  - free generation: one flipped token at step {first_diff} sends the greedy texts apart; weigh it against "
              "the teacher-forced numbers and the perplexities above")
    if device.type == "cpu" or args.backend == "ref":
        print("  - speed: the tokens per second above compare two implementations, not the method (mac_ref is the readable")
        print("    reference, a dozen small tensor operations per layer and token); MAC's speed is measured on a GPU:")
        print("    benchmarks/RESULTS.md (the kernels, and the model end to end in batches) and docs/real_model.md")
    if args.lossless:
        run = lossless_run(model, ids, config, device, args.backend, N, args.k_max)
        print_lossless(run, full_list, args.k_max, device, args.backend)
    if device.type == "cuda" and args.backend == "triton":
        print_engine_speed(engine_speed(model, ids, config, device, args.engine_batch), args.engine_batch, n)
    chain = f" K={config.max_chain}" if config.max_chain else ""
    title = f"{file.path.stem}, MAC rule {config.rule.name} τ={config.tau:g} W={config.window} r={config.band} F={config.sinks}{chain}: {free['hit_rate']:.0%} hits"
    layer_plot(free["layer_hit"], free["layer_skipped"], args.plot, title)
    print(f"\nsaved {args.plot}; wall time {time.perf_counter() - wall:.0f} s")
    return 0
