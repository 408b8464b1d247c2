"""Tables and plots of the benchmarks, made from their CSV files (no GPU needed).

``benchmarks/bench_decode.py`` measures and writes ``results/decode.csv`` (one row per
provider and point); this module turns that file into what a reader looks at:

* ``decode_headline.md``: the headline table, the MAC speed-ups over FlashInfer
  (Hkv = 8, ring W = 1024, both batches, every context), its caption line after it;
* ``decode_tables.md``: every point, one table per (Hkv, W), lead columns first and the
  columns that are constant across a table in its caption line;
* one plot per question, each readable at page width (8 × 4 inches):
  ``speedup_b1.png`` and ``speedup_b16.png`` (speed-up over FlashInfer against context at
  each hit rate, batch 1 and batch 16), ``speedup_vs_hits.png`` (the speed-up at 128K
  against the hit rate: how many hits MAC needs) and ``full_decode.png`` (full decode
  against FlashInfer and the KV-read floor);
* from ``results/model.csv`` (``bench_model.py``, which calls them): ``model_speedup.png``
  (MAC's speed-up over the best full attention against batch, one panel per rule with and
  without the fallback policy) and ``model_tokens_per_s.png`` (one panel per context).

Every number shown is the CSV's as written there (times in µs with its two decimals,
ratios with its three); nothing is re-rounded. The same tables in ``benchmarks/RESULTS.md``
are regions of ``benchmarks/report.py``. Regenerate after a benchmark run with::

    python -m benchmarks.plots            # or: python benchmarks/plots.py [--results DIR]
    python -m benchmarks.report           # the tables and quoted figures of the pages
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
HIT_RATES = ("1.0", "0.95", "0.5", "0.0")  # the column order of every table: most hits first
FIG_SIZE = (8, 4)
HEADLINE_SIZE = (8, 3.3)  # the opening plot: it shares the first screen with the headline table
FONT_SIZE = 12


@dataclass
class Point:
    """One (Hkv, batch, context, window) point of the benchmark: its CSV rows by provider."""

    gpu: str
    hkv: int
    batch: int
    ctx: int
    window: int
    rows: dict[str, dict] = field(default_factory=dict)  # provider ("mac@0.95" for MAC) -> CSV row

    def us(self, provider: str) -> str | None:
        row = self.rows.get(provider)
        return row["median_us"] if row else None

    @property
    def flashinfer(self) -> str:
        """FlashInfer's time: the faster of tensor cores on and off (the benchmark's baseline); "nan" where it did not import."""
        times = [r["median_us"] for p, r in self.rows.items() if p.startswith("flashinfer")]
        return min(times, key=float) if times else "nan"

    def speedup(self, provider: str) -> str | None:
        row = self.rows.get(provider)
        return row["speedup_vs_flashinfer"] if row and row["speedup_vs_flashinfer"] else None


def read_points(csv_path: Path = RESULTS / "decode.csv", shape: tuple[int, int] = (32, 128)) -> list[Point]:
    """The CSV's points of one shape ``(Hq, D)`` (the paper's by default; rows of a CSV without
    these columns are of that shape), in the order the benchmark ran them."""
    points: dict[tuple, Point] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if (int(row.get("q_heads") or 32), int(row.get("head_dim") or 128)) != shape:
                continue
            key = (int(row["hkv"]), int(row["batch"]), int(row["ctx"]), int(row["window"]))
            point = points.setdefault(key, Point(row["gpu"], *key))
            provider = row["provider"]
            if provider in ("mac", "mac_mass"):
                provider = f"{provider.replace('mac_', '')}@{float(row['hit_rate'])}"
            point.rows[provider] = row
    return list(points.values())


def _ctx(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def _x(value: str | None) -> str:
    return f"{value}×" if value else "–"


def _percent(fraction: str) -> str:
    return f"{Decimal(fraction) * 100:f}".rstrip("0").rstrip(".") + " %"


def _mac_rates(points: list[Point]) -> list[str]:
    return [r for r in HIT_RATES if any(f"mac@{r}" in p.rows for p in points)]


def _rate(rate: str) -> str:
    return f"{float(rate):.0%}".replace("%", " %")


def headline_table(points: list[Point], hkv: int = 8, window: int = 1024, csv_link: str = "results/decode.csv") -> str:
    """The headline: MAC's speed-up over FlashInfer per hit rate, then full decode's, per batch and context.

    ``csv_link``: the CSV's path relative to where the table is shown (RESULTS.md by default).
    """
    chosen = [p for p in points if p.hkv == hkv and p.window == window]
    rates = _mac_rates(chosen)
    caption = (
        f"*Speed-up over FlashInfer (its time over ours; above 1× MAC is faster) of one decode step, batch 16 and 1; "
        f"MAC x %: at x % hits. "
        f"{chosen[0].gpu}, Hkv = {hkv}, Hq = 32, D = 128, bf16, ring W = {window}, band 256, lag 64. "
        f"Times, and Hkv = 4: the tables below; data: [`{csv_link}`]({csv_link}).*"
    )
    header = ["batch, context"] + [f"MAC {_rate(r)}".replace(" %", "\u00a0%") for r in rates] + ["full decode"]
    lines = [_row(header), _row(["---"] * len(header))]
    for p in sorted(chosen, key=lambda p: (-p.batch, p.ctx)):  # batch 16 first: the plot's rows
        cells = [f"{p.batch}, {_ctx(p.ctx)}"] + [_x(p.speedup(f"mac@{r}")) for r in rates]
        lines.append(_row(cells + [_x(p.speedup("triton_full"))]))
    return "\n".join(lines + ["", caption])


def rule_cost_table(points: list[Point]) -> str:
    """The mass-aware rule's step time over the paper's, on the same planted rings in the same run."""
    lines = [
        "| Hkv | batch, context | hits | paper's rule µs | mass rule µs | mass / paper |",
        "|---|---|---|---|---|---|",
    ]
    for p in sorted(points, key=lambda p: (-p.hkv, -p.batch, p.ctx)):
        for rate in HIT_RATES:
            paper, mass = p.us(f"mac@{rate}"), p.us(f"mass@{rate}")
            if paper and mass:
                lines.append(f"| {p.hkv} | {p.batch}, {_ctx(p.ctx)} | {_rate(rate)} | {paper} | {mass} | {float(mass) / float(paper):.3f} |")
    if len(lines) == 2:
        return ""
    gpu = points[0].gpu if points else ""
    lines.append("")
    lines.append(f"*The mass-aware rule (`MassRule(tau_m=0.5)`, two phases) against the paper's rule, one decode step each, "
                 f"{gpu}, Hq = 32, D = 128, bf16, W = 1024, r = 256, lag 64; every planted hit accepted by both.*")
    return "\n".join(lines)


def point_tables(points: list[Point]) -> str:
    """Every point: one table per (Hkv, W), speed-ups first, then the times they come from."""
    parts = []
    for hkv, window in dict.fromkeys((p.hkv, p.window) for p in points):
        chosen = [p for p in points if p.hkv == hkv and p.window == window]
        rates = _mac_rates(chosen)
        shared = window != min(p.window for p in points)  # the full-decode providers ran once per (Hkv, B, ctx)
        header = ["batch", "context"] + [f"MAC {_rate(r)} × FI" for r in rates]
        header += ["FlashInfer µs"] + [f"MAC {_rate(r)} µs" for r in rates]
        if not shared:
            header += ["Triton full × FI", "Triton full µs", "% of floor", "SDPA µs"]
        header += ["floor µs", "measured hits (95 %)", "match alone µs"]
        caption = (
            f"*Hkv = {hkv}, ring W = {window}; Hq = 32, D = 128, bf16, band 256, lag 64; {chosen[0].gpu}. "
            "× FI: FlashInfer's time over ours (above 1× MAC is faster). "
            + ("FlashInfer and the floor do not depend on W: the same runs as in the W = 1024 table (its full-decode and SDPA columns too)."
               if shared else "% of floor: the KV-read floor over the full decode's time (100 %: at the floor).")
            + "*"
        )
        lines = [f"### Hkv = {hkv}, W = {window}", "", caption, "", _row(header), _row(["---"] * len(header))]
        for p in chosen:
            cells = [str(p.batch), _ctx(p.ctx)] + [_x(p.speedup(f"mac@{r}")) for r in rates]
            cells += [p.flashinfer] + [p.us(f"mac@{r}") or "–" for r in rates]
            full = p.rows["triton_full"]
            if not shared:
                cells += [_x(full["speedup_vs_flashinfer"]), full["median_us"], _percent(full["floor_fraction"]), p.us("sdpa")]
            measured = p.rows.get("mac@0.95", {}).get("measured_hit_rate")
            cells += [full["floor_us"], _percent(measured) if measured else "–", p.us("mac_match_only") or "–"]
            lines.append(_row(cells))
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


# --- plots ------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.size": FONT_SIZE, "axes.titlesize": FONT_SIZE + 1, "axes.labelsize": FONT_SIZE,
        "legend.fontsize": FONT_SIZE - 1, "xtick.labelsize": FONT_SIZE - 1, "ytick.labelsize": FONT_SIZE - 1,
        "axes.spines.top": False, "axes.spines.right": False,
    })  # fmt: skip
    return plt


_HIT_COLORS = {"1.0": "#1b7837", "0.95": "#5aae61", "0.5": "#e08214", "0.0": "#b2182b"}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")  # "tight": a legend placed outside the axes is kept
    _pyplot().close(fig)
    return path


def _ratio_axis(ax, ticks=(0.5, 1, 2, 5, 10, 20)) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.axhline(1.0, color="grey", lw=1, zorder=0)


def _y_labels(ax, label) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: label(v)))


def _context_axis(ax, contexts) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [_ctx(c) for c in contexts])
    ax.minorticks_off()
    ax.set_xlabel("context (keys in the KV cache)")


def speedup_plot(points: list[Point], batch: int, path: Path, hkv: int = 8, window: int = 1024, size=FIG_SIZE) -> Path:
    """Speed-up over FlashInfer against context, one line per hit rate (and full decode), one batch."""
    plt = _pyplot()
    chosen = sorted((p for p in points if p.hkv == hkv and p.batch == batch and p.window == window), key=lambda p: p.ctx)
    contexts = [p.ctx for p in chosen]
    fig, ax = plt.subplots(figsize=size)
    for rate in _mac_rates(chosen):
        ys = [float(p.speedup(f"mac@{rate}")) for p in chosen]
        ax.plot(contexts, ys, marker="o", lw=2.2, color=_HIT_COLORS.get(rate), label=f"MAC, {_rate(rate)} hits")
        ax.annotate(f"{ys[-1]:.2f}×", (contexts[-1], ys[-1]), xytext=(8, 0), textcoords="offset points",
                    va="center", color=_HIT_COLORS.get(rate), fontsize=FONT_SIZE - 1)  # fmt: skip
    ax.plot(contexts, [float(p.speedup("triton_full")) for p in chosen], "k--", marker="s", lw=1.5, label="full decode (Triton)")
    top = max(float(p.speedup("mac@1.0") or 1) for p in chosen)
    _ratio_axis(ax, ticks=[t for t in (0.5, 1, 2, 5, 10, 20, 50) if t <= 2 * top])
    _context_axis(ax, contexts)
    ax.set_xlim(contexts[0] / 1.3, contexts[-1] * 1.6)
    ax.set_ylabel("speed-up over FlashInfer")
    ax.set_title(f"Batch {batch}: MAC step against FlashInfer ({chosen[0].gpu.removeprefix('NVIDIA ')}, Hkv {hkv}, W {window})")
    ax.legend(loc="upper left", frameon=False)
    return _save(fig, path)


def hits_plot(points: list[Point], path: Path, window: int = 1024) -> Path:
    """Speed-up over FlashInfer at the longest context against the hit rate: how many hits MAC needs."""
    plt = _pyplot()
    ctx = max(p.ctx for p in points)
    fig, ax = plt.subplots(figsize=FIG_SIZE)
    styles = {(8, 16): ("#2166ac", "-"), (8, 1): ("#2166ac", ":"), (4, 16): ("#762a83", "-"), (4, 1): ("#762a83", ":")}
    for p in sorted((p for p in points if p.ctx == ctx and p.window == window), key=lambda p: (-p.hkv, -p.batch)):
        rates = sorted(_mac_rates([p]), key=float)
        color, ls = styles.get((p.hkv, p.batch), (None, "-"))
        ax.plot([100 * float(r) for r in rates], [float(p.speedup(f"mac@{r}")) for r in rates], ls=ls, marker="o", lw=2,
                color=color, label=f"Hkv {p.hkv}, batch {p.batch}")  # fmt: skip
    _ratio_axis(ax)
    ax.set_xlabel("hit rate (% of query heads that reuse a row)")
    ax.set_xticks([0, 25, 50, 75, 95, 100], ["0", "25", "50", "75", "95", "100"])
    ax.set_ylabel("speed-up over FlashInfer")
    ax.set_title(f"How many hits MAC needs: the speed-up at {_ctx(ctx)} context (W {window})")
    ax.legend(loc="upper left", frameon=False)
    return _save(fig, path)


def full_decode_plot(points: list[Point], path: Path, hkv: int = 8, window: int = 1024) -> Path:
    """Full-decode times over the KV-read floor against context: Triton, FlashInfer and SDPA, both batches."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIG_SIZE)
    providers = [("triton_full", "full decode (Triton)", "black"), ("flashinfer", "FlashInfer (best)", "#2166ac"),
                 ("sdpa", "torch SDPA", "#5aae61")]  # fmt: skip
    for batch, ls, marker in ((1, ":", "o"), (16, "-", "s")):
        chosen = sorted((p for p in points if p.hkv == hkv and p.batch == batch and p.window == window), key=lambda p: p.ctx)
        contexts = [p.ctx for p in chosen]
        for name, label, color in providers:
            times = [float(p.flashinfer if name == "flashinfer" else p.us(name)) for p in chosen]
            ys = [t / float(p.rows["triton_full"]["floor_us"]) for t, p in zip(times, chosen)]
            ax.plot(contexts, ys, ls=ls, marker=marker, color=color, lw=2, ms=6, label=f"{label}, batch {batch}")
    ax.axhline(1.0, color="grey", lw=1, zorder=0)
    ax.annotate("the KV-read floor", (contexts[1], 1.0), xytext=(0, 6), textcoords="offset points", color="grey", ha="center",
                fontsize=FONT_SIZE - 1)  # fmt: skip
    _context_axis(ax, contexts)
    ax.set_ylabel("time over the KV-read floor")
    _y_labels(ax, lambda v: f"{v:g}×")
    ax.set_title(f"Full decode against FlashInfer and the KV-read floor (Hkv {hkv})")
    ax.legend(loc="upper right", frameon=False, ncol=2, fontsize=FONT_SIZE - 2)
    return _save(fig, path)


# --- end to end: SmolLM2-135M (results/model.csv, written by bench_model.py) --------------

# one style per context (colour, marker and line: each tells the contexts apart alone)
_CONTEXT_STYLES = [("#6baed6", "o", ":"), ("#2171b5", "s", "--"), ("#08306b", "D", "-")]
_MODEL_PANELS = {"mac_paper": "MAC, the paper's rule", "mac_paper_policy": "the paper's rule + fallback policy",
                 "mac_mass": "MAC, the mass rule", "mac_mass_policy": "the mass rule + fallback policy"}  # fmt: skip
# the full attentions in greys, MAC in colour: the question is MAC against the best of them
_MODEL_LINES = {"flashinfer": ("FlashInfer", "#bdbdbd", "^", ":"), "triton": ("Triton full decode", "#737373", "s", "--"),
                "sdpa": ("torch SDPA", "#252525", "D", "-."), "mac_paper": ("MAC, paper's rule", "#2166ac", "o", "-"),
                "mac_mass": ("MAC, mass rule", "#e08214", "o", "-")}  # fmt: skip


def read_model(csv_path: Path = RESULTS / "model.csv") -> list[dict]:
    """The end-to-end CSV's rows (one per context, batch and provider)."""
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def _batch_axis(ax, batches) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()


def _series(rows: list[dict], provider: str, context: int, column: str) -> tuple[list[int], list[float]]:
    points = sorted((int(r["batch"]), float(r[column])) for r in rows if r["provider"] == provider and int(r["context"]) == context)
    return [b for b, _ in points], [y for _, y in points]


def model_speedup_plot(rows: list[dict], path: Path) -> Path:
    """MAC's speed-up over the best full attention against batch: one panel per rule, without
    and with the fallback policy; one line per context."""
    plt = _pyplot()
    contexts = sorted({int(r["context"]) for r in rows})
    batches = sorted({int(r["batch"]) for r in rows})
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.4), sharex=True, sharey=True)
    for ax, (provider, title) in zip(axes.flat, _MODEL_PANELS.items()):
        for ctx, (color, marker, ls) in zip(contexts, _CONTEXT_STYLES):
            ax.plot(*_series(rows, provider, ctx, "speedup_vs_best_full"), color=color, marker=marker, ls=ls, lw=2, ms=6,
                    label=f"context {_ctx(ctx)}")  # fmt: skip
        ax.axhline(1.0, color="grey", lw=1, zorder=0)
        ax.set_title(title)
        _batch_axis(ax, batches)
    for ax in axes[1]:
        ax.set_xlabel("batch (requests decoded together)")
    for ax in axes[:, 0]:
        ax.set_ylabel("× the best full attention")
    _y_labels(axes[0, 0], lambda v: f"{v:g}×")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(contexts), frameon=False)
    fig.suptitle(f"Where MAC decodes faster than full attention: SmolLM2-135M end to end ({rows[0]['gpu'].removeprefix('NVIDIA ')}, {rows[0]['dtype']})")
    return _save(fig, path)


def model_tokens_plot(rows: list[dict], path: Path) -> Path:
    """Tokens per second against batch, one panel per context: the full attentions and MAC's two rules."""
    plt = _pyplot()
    contexts = sorted({int(r["context"]) for r in rows})
    batches = sorted({int(r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(4 * len(contexts), 4.2), sharey=True, squeeze=False)
    for ax, ctx in zip(axes[0], contexts):
        for provider, (label, color, marker, ls) in _MODEL_LINES.items():
            batch, tokens = _series(rows, provider, ctx, "tokens_per_s")
            if batch:
                ax.plot(batch, tokens, color=color, marker=marker, ls=ls, lw=2, ms=5, label=label)
        ax.set_yscale("log")
        _y_labels(ax, lambda v: f"{v:,.0f}")
        ax.set_title(f"context {_ctx(ctx)}")
        ax.set_xlabel("batch")
        _batch_axis(ax, batches)
    axes[0, 0].set_ylabel("tokens per second")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(_MODEL_LINES), frameon=False)
    fig.suptitle(f"Throughput of each attention as the batch grows: SmolLM2-135M ({rows[0]['gpu'].removeprefix('NVIDIA ')}, {rows[0]['dtype']})")
    return _save(fig, path)


def model_plots(rows: list[dict], results: Path = RESULTS) -> list[Path]:
    """The end-to-end plots: ``model_speedup.png`` and ``model_tokens_per_s.png``."""
    return [model_speedup_plot(rows, results / "model_speedup.png"), model_tokens_plot(rows, results / "model_tokens_per_s.png")]


# --- every file ---------------------------------------------------------------------------


def write_all(results: Path = RESULTS) -> list[Path]:
    """Every table and plot of ``results/`` from its ``decode.csv`` (and ``model.csv``)."""
    points = read_points(results / "decode.csv")
    written = []
    rule_cost = rule_cost_table(points)
    outputs = [("decode_headline.md", headline_table(points, csv_link="decode.csv")), ("decode_tables.md", point_tables(points))]
    if rule_cost:
        outputs.append(("rule_cost.md", rule_cost))
    for name, text in outputs:
        (results / name).write_text("<!-- written by benchmarks/plots.py from decode.csv -->\n" + text + "\n", encoding="utf-8")
        written.append(results / name)
    written.append(speedup_plot(points, 1, results / "speedup_b1.png"))
    written.append(speedup_plot(points, 16, results / "speedup_b16.png", size=HEADLINE_SIZE))  # the page's opening plot
    written.append(hits_plot(points, results / "speedup_vs_hits.png"))
    written.append(full_decode_plot(points, results / "full_decode.png"))
    if (results / "model.csv").is_file():
        written += model_plots(read_model(results / "model.csv"), results)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the folder holding decode.csv (default: %(default)s)")
    args = parser.parse_args()
    for path in write_all(args.results):
        print(path)


if __name__ == "__main__":
    main()
