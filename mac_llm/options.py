"""Command-line options shared by the ``mac-attention`` subcommands, and their errors."""

from __future__ import annotations

import argparse

from mac_core import CALIBRATIONS, RULES, MACConfig, MassRule


class InvalidOption(ValueError):
    """A bad command-line value, reported as ``mac-attention: error: ...`` (exit status 2)."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def unit_interval(text: str) -> float:
    """A number in [0, 1]: a threshold whose ends mean "any candidate" and "no hit"."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def chain_bound(text: str) -> int | None:
    """``--max-chain``: a positive integer, or ``none`` for unbounded chains (the paper's rule)."""
    return None if text.lower() == "none" else positive_int(text)


def calibration(text: str) -> str | None:
    """``--calibration``: ``none`` or the name of a radius calibration."""
    if text.lower() == "none":
        return None
    if text not in CALIBRATIONS:
        raise argparse.ArgumentTypeError(f"expected none or one of {', '.join(CALIBRATIONS)}, got {text!r}")
    return text


def add_mac_options(parser: argparse.ArgumentParser, defaults: MACConfig) -> None:
    """The MAC knobs shared by every subcommand, with ``defaults`` shown in ``--help``."""
    group = parser.add_argument_group("MAC-Attention", "the method's knobs (mac_core.MACConfig)")
    group.add_argument("--rule", choices=sorted(RULES), default=defaults.rule.name, help="acceptance rule (mac_core.rules): paper (the distance test) or mass (candidates verified by the mass their row carries)")
    tau_m = getattr(defaults.rule, "tau_m", MassRule.tau_m)
    group.add_argument("--tau-m", type=unit_interval, help=f"the mass rule's threshold τ_m in [0, 1] (with --rule mass only; --tau is then its cap; default: {tau_m:g})")
    parser.set_defaults(default_tau_m=tau_m)
    group.add_argument("--per-group", action=argparse.BooleanOptionalAction, default=defaults.rule.per_group,
                       help="group-aware decisions: a KV group reuses only if all its heads would")
    group.add_argument("--group-match", action=argparse.BooleanOptionalAction, default=defaults.group_match,
                       help="one matched row per KV group (the nearest in the sum of its heads' distances), each head tested at its own distance")
    group.add_argument("--tau", type=float, default=defaults.tau, help="match threshold τ of the distance test (higher is stricter; ≥ 1: no hits)")
    group.add_argument("--window", type=positive_int, default=defaults.window, help="ring size / match window W")
    group.add_argument("--band", type=int, default=defaults.band, help="band r: a ring row leaves out its token's last r keys")
    group.add_argument("--sinks", type=int, default=defaults.sinks, help="sink keys F recomputed at every step")
    group.add_argument(
        "--max-chain", type=chain_bound, default=defaults.max_chain, metavar="K",
        help="longest reuse chain: rows reused K times over are no match candidates; 'none': unbounded, the paper's rule",
    )  # fmt: skip
    group.add_argument(
        "--calibration", type=calibration, default=defaults.calibration, metavar="{none,keynorm,qnorm}",
        help="per-head radius calibration from the prompt (none: the paper's radius)",
    )  # fmt: skip


def config_from(args: argparse.Namespace, **extra) -> MACConfig:
    """The configuration the options describe; a bad value is an :class:`InvalidOption`."""
    if args.tau_m is not None and args.rule != "mass":
        raise InvalidOption(f"--tau-m is the mass rule's threshold: it needs --rule mass (the rule is {args.rule})")
    try:
        params = {"per_group": args.per_group}
        if args.rule == "mass":
            params["tau_m"] = args.tau_m if args.tau_m is not None else args.default_tau_m
        return MACConfig(
            window=args.window, band=args.band, tau=args.tau, sinks=args.sinks, max_chain=args.max_chain,
            calibration=args.calibration, rule=RULES[args.rule](**params), group_match=args.group_match, **extra,
        )
    except (TypeError, ValueError) as err:
        raise InvalidOption(str(err)) from None
