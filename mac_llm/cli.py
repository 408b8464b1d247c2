"""The `mac-attention` command line.

    mac-attention demo [options]        MAC-Attention in every layer of SmolLM2-135M against full attention
    mac-attention synthetic [options]   decode a synthetic stream through mac_ref and report
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import mac_ref


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def chain_bound(text: str) -> int | None:
    """``--max-chain``: a positive integer, or ``none`` for unbounded chains (the paper's rule)."""
    return None if text.lower() == "none" else positive_int(text)


def add_mac_options(parser: argparse.ArgumentParser, defaults: mac_ref.MACConfig) -> None:
    """The MAC knobs shared by every subcommand."""
    parser.add_argument("--tau", type=float, default=defaults.tau, help="match threshold τ (higher is stricter)")
    parser.add_argument("--window", type=positive_int, default=defaults.window, help="ring size / match window W")
    parser.add_argument("--band", type=int, default=defaults.band, help="band r recomputed on a hit")
    parser.add_argument("--sinks", type=int, default=defaults.sinks, help="sink keys F recomputed at every step")
    parser.add_argument(
        "--max-chain", type=chain_bound, default=defaults.max_chain, metavar="K",
        help=f"longest reuse chain: rows reused K times over are no match candidates; 'none': unbounded, the paper's rule (default: {defaults.max_chain})",
    )  # fmt: skip


class InvalidOption(ValueError):
    """A bad command-line value, reported as ``mac-attention: error: ...`` (exit status 2)."""


def config_from(args: argparse.Namespace, **extra) -> mac_ref.MACConfig:
    try:
        return mac_ref.MACConfig(
            window=args.window, band=args.band, tau=args.tau, sinks=args.sinks, max_chain=args.max_chain, **extra
        )
    except (TypeError, ValueError) as err:
        raise InvalidOption(str(err)) from None


def run_synthetic(args: argparse.Namespace) -> int:
    config = config_from(args)
    total = args.prefill + args.steps
    q_pre, k, v = mac_ref.synthetic_stream(
        args.batch, args.q_heads, args.kv_heads, total, args.head_dim, reuse=args.reuse, seed=args.seed
    )
    print(
        f"synthetic stream: batch {args.batch}, {args.q_heads} query / {args.kv_heads} KV heads, D={args.head_dim}, "
        f"prefill {args.prefill} + {args.steps} decode steps, reuse {args.reuse:.0%}"
    )
    print(f"config: window {config.window}, band {config.band}, tau {config.tau}, sinks {config.sinks}, max chain {config.max_chain}")
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
    print(f"  KV reads skipped            {stats.skipped_fraction:8.1%}")
    print(f"  max |out - full attention|  {err.max().item():8.2e}")
    print(f"  relative RMS error          {rel.item():8.2e}")
    print(f"  reference decode time       {elapsed:8.2f} s ({args.steps / elapsed:.0f} steps/s, CPU)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mac-attention", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    from .demo import add_demo_options, run_demo

    demo = sub.add_parser("demo", help="MAC-Attention in every layer of a real model (SmolLM2-135M) against full attention")
    add_demo_options(demo)
    demo.set_defaults(run=run_demo)
    syn = sub.add_parser("synthetic", help="decode a synthetic stream through the reference and report")
    add_mac_options(syn, mac_ref.MACConfig(window=256, band=64))
    syn.add_argument("--batch", type=positive_int, default=2)
    syn.add_argument("--q-heads", type=positive_int, default=8)
    syn.add_argument("--kv-heads", type=positive_int, default=2)
    syn.add_argument("--head-dim", type=positive_int, default=64)
    syn.add_argument("--prefill", type=positive_int, default=1024)
    syn.add_argument("--steps", type=positive_int, default=512)
    syn.add_argument("--reuse", type=float, default=0.8, help="share of queries that copy a recent one")
    syn.add_argument("--seed", type=int, default=0)
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
