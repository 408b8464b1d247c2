"""The `mac-attention` command line.

    mac-attention demo [options]        MAC-Attention in every layer of SmolLM2-135M against full attention
    mac-attention synthetic [options]   decode a synthetic stream through mac_ref and report
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib.metadata import PackageNotFoundError, version

import torch

import mac_ref
from mac_core import PRESETS

from .demo import add_demo_options, run_demo
from .options import InvalidOption, add_mac_options, config_from, positive_int


def package_version() -> str:
    try:
        return version("mac-attention")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown (not installed)"


def run_synthetic(args: argparse.Namespace) -> int:
    config = config_from(args)
    if not 0.0 <= args.reuse <= 1.0:
        raise InvalidOption(f"--reuse must lie in [0, 1], got {args.reuse:g}")
    if args.q_heads % args.kv_heads != 0:
        raise InvalidOption(f"--q-heads ({args.q_heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if args.head_dim % 2 != 0:
        raise InvalidOption(f"--head-dim must be even (RoPE rotates pairs), got {args.head_dim}")
    total = args.prefill + args.steps
    q_pre, k, v = mac_ref.synthetic_stream(
        args.batch, args.q_heads, args.kv_heads, total, args.head_dim, reuse=args.reuse, seed=args.seed
    )
    print(
        f"synthetic stream: batch {args.batch}, {args.q_heads} query / {args.kv_heads} KV heads, D={args.head_dim}, "
        f"prefill {args.prefill} + {args.steps} decode steps, reuse {args.reuse:.0%}"
    )
    print(f"MAC: {config.describe()}")
    start = time.perf_counter()
    result = mac_ref.run_stream(q_pre, k, v, args.prefill, config, progress=True)
    elapsed = time.perf_counter() - start

    q_post = mac_ref.apply_rope(q_pre, torch.arange(total), config.rope_base)
    exact, _ = mac_ref.causal_attention(q_post, k, v)
    decoded = slice(args.prefill, total)
    err = (result.out[:, :, decoded].double() - exact[:, :, decoded]).abs()
    rel = err.norm() / exact[:, :, decoded].norm()
    stats = result.stats
    print()
    print(f"  hit rate                    {stats.hit_rate:8.1%}")
    print(f"  KV reads skipped, per head  {stats.skipped_fraction():8.1%}")
    print(f"  KV reads skipped, per group {stats.skipped_fraction(args.kv_heads):8.1%}")
    print(f"  max |out - full attention|  {err.max().item():8.2e}")
    print(f"  relative RMS error          {rel.item():8.2e}")
    print(f"  reference decode time       {elapsed:8.2f} s ({args.steps / elapsed:.0f} steps/s, CPU)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="mac-attention", description=__doc__.splitlines()[0], formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,synthetic}")
    demo = sub.add_parser(
        "demo", help="MAC-Attention in every layer of a real model (SmolLM2-135M) against full attention",
        description="MAC-Attention in every layer of SmolLM2-135M-Instruct against full attention, on one prompt.",
        formatter_class=formatter,
    )  # fmt: skip
    add_demo_options(demo)
    demo.set_defaults(run=run_demo)
    syn = sub.add_parser(
        "synthetic", help="decode a synthetic stream through the reference and report",
        description="Decode a synthetic stream (controllable query reuse) through mac_ref and compare with full attention.",
        formatter_class=formatter,
    )  # fmt: skip
    add_mac_options(syn, PRESETS["synthetic"])
    syn.add_argument("--batch", type=positive_int, default=2, help="requests B")
    syn.add_argument("--q-heads", type=positive_int, default=8, help="query heads Hq (a multiple of --kv-heads)")
    syn.add_argument("--kv-heads", type=positive_int, default=2, help="KV heads Hkv")
    syn.add_argument("--head-dim", type=positive_int, default=64, help="head dimension D (even)")
    syn.add_argument("--prefill", type=positive_int, default=1024, help="prompt tokens per request")
    syn.add_argument("--steps", type=positive_int, default=512, help="decode steps")
    syn.add_argument("--reuse", type=float, default=0.8, help="share of queries that copy a recent one, in [0, 1]")
    syn.add_argument("--seed", type=int, default=0, help="seed of the stream's random values")
    syn.set_defaults(run=run_synthetic)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except InvalidOption as err:
        print(f"mac-attention: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
