"""Where a verifying step's key reads go, on the real model: the attend kernel or the prefix kernel.

A step of a rule that verifies its candidates (the demo's mass rule per KV group) reads, per
KV group, either everything (a group with a head that has no candidate: a miss) or its sinks,
band and tail in the attend kernel, and then, for a group whose candidates were rejected,
the prefix ``[S, lo)`` in the prefix kernel (``mac_triton.attend``). This counts both shares
of a full step's reads, and the groups of each kind, on SmolLM2-135M decoding the prose of
``benchmarks.bench_model`` (the same prompts at the same context), with the reference backend
in float32 on a CPU: ``reads / (B·Hkv·(t+1))`` summed over steps and layers. Divided into the
kernels' measured times it gives each kernel's bytes per second (``benchmarks/RESULTS.md``).
It counts two splits of the same reads: that of the stream-K attend kernel (``attend``,
``prefix``), where a miss group's whole prefix was the attend kernel's, and that of the fresh
kernel that replaced it (``fresh``, ``fresh_prefix``), which reads only sinks, band and tail
and leaves every prefix of a head that does not reuse, a miss group's included, to the prefix
kernel (``mac_triton.attend``).

    python -m studies.verify_reads [--batch 4] [--context 8192] [--steps 32]   # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.bench_model import BEST_RULE, prose_prompts
from mac_core import preset
from mac_llm.engine import DecodeEngine
from mac_llm.gguf import load_model

OUT = Path(__file__).resolve().parent / "results" / "verify_reads.json"


def group_reads(stats, config, kv_heads: int) -> dict[str, torch.Tensor]:
    """One layer's step: per KV group ``[B, Hkv]`` the keys a full step reads, the attend
    kernel's and the prefix kernel's (stream-K plan; then the fresh kernel's and the prefix
    kernel's beside it), and the group's kind (miss / rejected / accepted)."""
    B = stats.context.shape[0]
    view = lambda x: x.view(B, kv_heads, -1)  # noqa: E731  [B, Hkv, G]
    context = stats.context  # [B] t + 1
    band_end = (context - config.band).clamp_min(0)  # N = E(t)
    sink_end = band_end.clamp_max(config.sinks)[:, None, None]  # S
    candidate, hit = view(stats.candidate), view(stats.hit)
    start = torch.maximum((view(stats.matched_pos) + 1 - config.band).clamp_min(0), sink_end)  # a candidate's P = max(E(j*), S)
    lo = torch.where(candidate, start, sink_end).amin(-1)  # [B, Hkv] the group's band start
    miss, accepted = ~candidate.all(-1), hit.all(-1)
    rejected = ~miss & ~accepted
    full = context[:, None].expand_as(lo).double()
    attend = sink_end[..., 0].double() + (full - lo.double())
    prefix = torch.where(rejected, (lo - sink_end[..., 0]).double(), torch.zeros_like(full))
    # the fresh kernel: a miss group reads no band (its start is N) and its prefix [S, N) in the prefix kernel
    fresh_lo = torch.where(miss, band_end[:, None], lo).double()
    fresh = sink_end[..., 0].double() + (full - fresh_lo)
    fresh_prefix = torch.where(accepted, torch.zeros_like(full), fresh_lo - sink_end[..., 0].double())
    return dict(full=full, attend=attend, prefix=prefix, fresh=fresh, fresh_prefix=fresh_prefix, miss=miss, rejected=rejected,
                accepted=accepted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="requests (spread over bench_model's 64 prompts)")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=32, help="teacher-forced decode steps")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(None, device=torch.device("cpu"))
    prompts, follow = prose_prompts(tokenizer, 64, args.context, args.steps + 8)
    pick = [round(i * 63 / max(args.batch - 1, 1)) for i in range(args.batch)]
    config = preset("demo", **BEST_RULE)
    engine = DecodeEngine(model, args.batch, args.context + args.steps + 8, "mac", config, dtype=torch.float32, device="cpu", mac_backend="ref")
    t0 = time.time()
    engine.prefill([prompts[i] for i in pick])
    totals: dict[str, float] = {}
    for s in range(args.steps):
        engine.step(torch.tensor([follow[i][s] for i in pick]))
        for stats in engine.stats:
            for name, value in group_reads(stats, engine.config, model.config.n_kv_heads).items():
                totals[name] = totals.get(name, 0.0) + float(value.sum())
    groups = totals["miss"] + totals["rejected"] + totals["accepted"]
    result = dict(model="SmolLM2-135M-Instruct", rule=str(config.rule), tau=config.tau, backend="ref float32 cpu", batch=args.batch,
                  context=args.context, steps=args.steps, seconds=round(time.time() - t0),
                  **{f"{k}_share": round(totals[k] / totals["full"], 4) for k in ("attend", "prefix", "fresh", "fresh_prefix")},
                  **{f"{k}_groups": round(totals[k] / groups, 4) for k in ("miss", "rejected", "accepted")})  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
