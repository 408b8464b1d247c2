"""``model.generate`` of transformers with MAC-Attention against its own SDPA, on a GPU.

SmolLM2-135M-Instruct as a ``LlamaForCausalLM`` (``mac_llm.hf.smollm2_hf``, from the GGUF
file) in bf16; ``B`` copies of a prompt of ``C`` tokens of prose (the pydoc topics); greedy
``generate`` of ``--new-tokens`` tokens, eager (transformers' own loop, no CUDA graph), with:

- ``sdpa``: the model's own attention (``attn_implementation="sdpa"``);
- ``mac``: ``enable_mac_attention(model, preset("demo"))``, whose decode step on CUDA is
  ``mac_triton.decode_step`` (``mac_llm.attention.auto_step``);
- ``mac_load``: the model switched with ``set_attn_implementation("mac")`` (the demo preset,
  the other way in), to show both ways cost the same.

Per point: the median over ``--repeats`` runs of the generate time (host clock after a
device synchronisation; one warm-up run first), tokens per second (``B · N`` over it), the
ratio to ``sdpa``, whether MAC's tokens equal SDPA's, and MAC's hit rate.

    python -m benchmarks.bench_hf --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf [--contexts 2048] [--batches 1,8] [--out DIR]

Writes ``hf_generate.csv`` and ``hf_generate.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

from mac_core import preset
from mac_llm.decoding import default_prose
from mac_llm.hf import disable_mac_attention, enable_mac_attention, mac_backend, smollm2_hf

from .harness import environment

FIELDS = ["context", "batch", "new_tokens", "provider", "seconds", "tokens_per_s", "ratio_to_sdpa", "same_tokens_as_sdpa", "hit_rate"]


def timed_generate(model, ids, new_tokens: int, repeats: int):
    def run():
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
        return out, time.perf_counter() - start

    run()  # warm-up: kernel compilation, allocator
    times, out = [], None
    for _ in range(repeats):
        out, seconds = run()
        times.append(seconds)
    return out, statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="the SmolLM2 GGUF file (default: the installed package's)")
    parser.add_argument("--contexts", default="2048", help="prompt lengths, comma-separated")
    parser.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    model, _ = smollm2_hf(args.model)
    model = model.to(device=device, dtype=torch.bfloat16)
    tokenizer_ids = _prose_ids(args.model)
    env = environment()
    print(f"{env['gpu']}, torch {env['torch']}, transformers {__import__('transformers').__version__}")
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            ids = torch.tensor([tokenizer_ids[:context]] * batch, device=device)
            sdpa_tokens, sdpa_s = timed_generate(model, ids, args.new_tokens, args.repeats)
            point = dict(context=context, batch=batch, new_tokens=args.new_tokens)
            rows.append(point | dict(provider="sdpa", seconds=sdpa_s, tokens_per_s=batch * args.new_tokens / sdpa_s, ratio_to_sdpa=1.0,
                                     same_tokens_as_sdpa=True, hit_rate=""))
            for provider in ("mac", "mac_load"):
                if provider == "mac":
                    enable_mac_attention(model, preset("demo"))
                else:
                    model.set_attn_implementation("mac")
                tokens, seconds = timed_generate(model, ids, args.new_tokens, args.repeats)
                hit_rate = mac_backend(model).layer_stats().hit_rate
                disable_mac_attention(model)
                rows.append(point | dict(provider=provider, seconds=seconds, tokens_per_s=batch * args.new_tokens / seconds,
                                         ratio_to_sdpa=sdpa_s / seconds, same_tokens_as_sdpa=bool(torch.equal(tokens, sdpa_tokens)),
                                         hit_rate=hit_rate))
            for r in rows[-3:]:
                print(f"C {context:5d} B {batch:3d} {r['provider']:9s} {r['tokens_per_s']:9.1f} tok/s  {r['ratio_to_sdpa']:5.2f}x sdpa  "
                      f"same tokens {r['same_tokens_as_sdpa']}  hits {r['hit_rate']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "hf_generate.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"*{env['gpu']}, torch {env['torch']}, transformers {__import__('transformers').__version__}, bf16, greedy, "
             f"{args.new_tokens} new tokens, median of {args.repeats} runs*", "",
             "| context | batch | provider | tokens/s | × SDPA | same tokens as SDPA | hit rate |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        hits = f"{r['hit_rate']:.1%}" if r["hit_rate"] != "" else "–"
        lines.append(f"| {r['context']} | {r['batch']} | {r['provider']} | {r['tokens_per_s']:.1f} | {r['ratio_to_sdpa']:.2f}× | "
                     f"{'yes' if r['same_tokens_as_sdpa'] else 'no'} | {hits} |")
    (args.out / "hf_generate.md").write_text("\n".join(lines) + "\n")
    return 0


def _prose_ids(path) -> list[int]:
    from mac_llm.gguf import GGUFFile, build_tokenizer

    return build_tokenizer(GGUFFile(path).tokenizer_fields).encode(default_prose()).ids


if __name__ == "__main__":
    raise SystemExit(main())
