"""The measured numbers of the pages, rendered from the result files (no GPU needed).

Every table of ``benchmarks/RESULTS.md`` and every measured figure that its prose or a docs
page (``docs/*.md``) quotes sits in a *region* rendered from the files that hold the
measurements (``benchmarks/results/``, ``studies/results/``)::

    <!-- report: NAME ARG ... -->what NAME renders<!-- /report -->

on one line (a figure in a sentence) or with the markers on lines of their own (a table).
``NAME`` is one of :data:`REGIONS`, its arguments shell-quoted, ``key=value`` for the
optional ones; paths are relative to the repository. Prose quotes tables: ``cell TABLE ROW
COLUMN`` is a cell of a table rendered here or of a study's summary, so a sentence and its
table cannot disagree.

    python -m benchmarks.report            # rewrite every region from the result files
    python -m benchmarks.report --check    # list the stale regions; exit status 1 if any

``tests/test_report.py`` runs the check, so a run that changes a result file without
regenerating the pages fails the tests. Plots: ``benchmarks/plots.py``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import re
import shlex
import statistics
import sys
from pathlib import Path

from . import plots

REPO = Path(__file__).resolve().parents[1]
PAGES = ("benchmarks/RESULTS.md", "docs/*.md")  # the files whose regions are rendered
DECODE = "benchmarks/results/decode.csv"
PROFILE = "benchmarks/results/profile.csv"
MODEL = "benchmarks/results/model.csv"
FIDELITY = "benchmarks/results/model_fidelity.csv"
KERNELS = "benchmarks/results/model_kernels.csv"
PAGED = "benchmarks/results/paged.csv"
STUDIES = "studies/results"

REGIONS: dict = {}  # name -> function(*args, **options) -> markdown


def region(fn):
    REGIONS[fn.__name__.rstrip("_")] = fn
    return fn


# --- reading the result files ------------------------------------------------------------


@functools.cache
def text(path: str) -> str:
    return (REPO / path).read_text(encoding="utf-8")


@functools.cache
def rows(path: str) -> list[dict]:
    with open(REPO / path, newline="") as f:
        return list(csv.DictReader(f))


@functools.cache
def points(path: str = DECODE) -> list[plots.Point]:
    return plots.read_points(REPO / path)


def keys(ctx) -> int:
    """A context as the pages write it (``8K``) or as the CSV files do (``8192``), in keys."""
    return int(ctx[:-1]) * 1024 if str(ctx).endswith("K") else int(ctx)


def point(batch, ctx, hkv=8, window=1024, file=DECODE) -> plots.Point:
    found = [p for p in points(file) if (p.batch, p.ctx, p.hkv, p.window) == (int(batch), keys(ctx), int(hkv), int(window))]
    if len(found) != 1:
        raise KeyError(f"{file} has no point batch {batch}, context {ctx}, Hkv {hkv}, W {window}")
    return found[0]


def clear() -> None:
    """Forget what was read (the files changed)."""
    for reader in (text, rows, points, tables):
        reader.cache_clear()


# --- formats -----------------------------------------------------------------------------


def fixed(value: float, nd) -> str:
    return f"{float(value):.{int(nd)}f}"


def span(values, fmt) -> str:
    """``"a–b"`` (``"a"`` when both ends read the same), each end formatted by ``fmt``."""
    low, high = fmt(min(values)), fmt(max(values))
    return low if low == high else f"{low}–{high}"


def percent(fraction, nd=1) -> str:
    return f"{100 * float(fraction):.{int(nd)}f} %"


# --- the tables of the pages -------------------------------------------------------------


@region
def headline(file=DECODE) -> str:
    """The decode benchmark's headline: MAC's speed-ups over FlashInfer (``plots.headline_table``)."""
    return plots.headline_table(points(file))


@region
def decode_tables(file=DECODE) -> str:
    """Every point of the decode benchmark, one table per (Hkv, W) (``plots.point_tables``)."""
    return plots.point_tables(points(file))


@region
def kernel_bytes(file, q_heads, ctx, window) -> str:
    """Per batch at one shape (``q_heads``), context and ring: each provider's step time, the bytes
    it moves, the achieved TB/s and the byte floor's share of its time (``bench_decode``)."""
    names = {"flashinfer_tcon": "FlashInfer (tensor cores)", "flashinfer_tcoff": "FlashInfer", "sdpa": "SDPA",
             "triton_full": "Triton full", "mac_match_only": "MAC match scan alone"}  # fmt: skip
    chosen = [r for r in rows(file) if r["q_heads"] == str(q_heads) and r["ctx"] == str(keys(ctx)) and r["window"] == str(window)]
    header = ["batch", "provider", "µs", "MB moved", "TB/s", "of the byte floor"]
    lines = [plots._row(header), plots._row(["---"] * len(header))]
    for r in sorted(chosen, key=lambda r: (int(r["batch"]), r["provider"] != "mac", r["provider"], float(r["hit_rate"] or 0))):
        name = f"MAC, {percent(r['hit_rate'], 0)} hits" if r["provider"] == "mac" else names.get(r["provider"], r["provider"])
        cells = [r["batch"], name, fixed(r["median_us"], 1), fixed(r["mbytes"], 1), fixed(r["tb_per_s"], 2), percent(r["byte_floor_fraction"], 0)]
        lines.append(plots._row(cells))
    return "\n".join(lines)


@region
def rule_cost(file=DECODE) -> str:
    """The mass-aware rule's step time over the paper's (``plots.rule_cost_table``)."""
    return plots.rule_cost_table(points(file))


# each target: what it asks, the points it reads (batch, context, provider), what the value is, the bound
TARGETS = [
    ("full decode ≥ 0.95× FlashInfer at every point", [(b, c, "triton_full") for b in (1, 16) for c in ("8K", "32K", "128K")], "x", 0.95),
    ("full decode ≥ 90 % of the KV-read floor at b16, 128K", [(16, "128K", "triton_full")], "floor", 0.90),
    ("all hits, 128K, b16: ≥ 20×", [(16, "128K", "mac@1.0")], "x", 20),
    ("all hits, 128K, b1: ≥ 6×", [(1, "128K", "mac@1.0")], "x", 6),
    ("all hits, 8K, b16: ≥ 2×", [(16, "8K", "mac@1.0")], "x", 2),
    ("95 % hits, 128K, b16: ≥ 6×", [(16, "128K", "mac@0.95")], "x", 6),
    ("0 % hits: ≥ 0.9× (match costs a miss ≤ 10 %)", [(b, c, "mac@0.0") for b in (1, 16) for c in ("8K", "32K", "128K")], "x", 0.9),
    ("all-hit time at 128K ≤ 1.15× that at 8K", [(b, "128K/8K", "mac@1.0") for b in (16, 1)], "flat", 1.15),
]


def _target_value(kind, batch, ctx, provider, hkv, file) -> tuple[float, str]:
    if kind == "flat":  # time at 128K over time at 8K
        far, near = (float(point(batch, c, hkv, file=file).us(provider)) for c in ctx.split("/"))
        return far / near, f"{far:.1f} / {near:.1f} µs = {far / near:.2f}"
    p = point(batch, ctx, hkv, file=file)
    if kind == "floor":
        value = float(p.rows[provider]["floor_fraction"])
        return value, percent(value, 0)
    value = float(p.speedup(provider))
    return value, f"{value:.2f}×"


@region
def targets(*files, hkv="8") -> str:
    """The project's targets, met or missed, one column per result file and Hkv (``hkv=8,4``)."""
    files = files or (DECODE,)
    columns = [(f, h) for f in files for h in str(hkv).split(",")]
    header = ["target"] + [f"{point(1, '8K', h, file=f).gpu.removeprefix('NVIDIA ').split(' ')[0]}, Hkv {h}" for f, h in columns]
    lines = [plots._row(header), plots._row(["---"] * len(header))]
    for label, where, kind, bound in TARGETS:
        cells = [label]
        for file, h in columns:
            values = [(b, c, *_target_value(kind, b, c, p, h, file)) for b, c, p in where]
            missed = [f"b{b} {c}" for b, c, v, _ in values if v < bound] if kind != "flat" else [f"b{b}" for b, c, v, _ in values if v > bound]
            shown = "; ".join(f"b{b} {c}: {s}" if len(values) > 1 else s for b, c, _, s in values)
            verdict = "**met**" if not missed else "missed" + (f" at {', '.join(missed)}" if len(values) > 1 else "")
            cells.append(f"{shown} ({verdict})")
        lines.append(plots._row(cells))
    return "\n".join(lines)


@region
def profile(file=PROFILE) -> str:
    """Per-kernel device times of a step, per point (``profile_step.py``): µs, one decimal."""
    kernels = {"match_kernel": "match", "attend_kernel": "attend", "fresh_kernel": "attend", "decide_kernel": "decide", "prefix_kernel": "prefix",
               "reduce_kernel": "reduce", "copy (ring restore)": "ring restore copy", "between kernels": "between"}  # fmt: skip  (a verifying step's fresh kernel is its attend)
    by_point: dict[str, dict] = {}
    for r in rows(file):
        by_point.setdefault(r["point"], {"replay": r["replay_us"]})[kernels[r["kernel"]]] = r["us"]
    columns = list(dict.fromkeys(kernels.values()))
    header = ["point", "replay µs", *columns]
    lines = [plots._row(header), plots._row(["---"] * len(header))]
    for name, times in by_point.items():
        cells = [name.replace("%", " %"), fixed(times["replay"], 1)] + [fixed(times[k], 1) if k in times else "–" for k in columns]
        lines.append(plots._row(cells))
    return "\n".join(lines)


@region
def yardsticks(file="benchmarks/results/h100_final/decode.csv") -> str:
    """FlashInfer's and torch SDPA's full decode beside the KV-read floor (Hkv 8, W 1024), µs."""
    header = ["batch", "context", "KV-read floor", "FlashInfer", "torch SDPA"]
    lines = [plots._row(header), plots._row(["---"] * len(header))]
    for p in sorted((p for p in points(file) if p.hkv == 8 and p.window == 1024), key=lambda p: (p.batch, p.ctx)):
        times = [p.rows["triton_full"]["floor_us"], p.flashinfer, p.us("sdpa")]
        lines.append(plots._row([str(p.batch), plots._ctx(p.ctx)] + [f"{float(t):.0f} µs" for t in times]))
    return "\n".join(lines)


MODEL_PROVIDERS = ("mac_paper", "mac_paper_policy", "mac_mass", "mac_mass_policy")


def model_point(ctx, batch, provider, file=MODEL) -> dict | None:
    """The row of one provider at one point, ``None`` where the run did not time it (``--providers``)."""
    return next((r for r in rows(file) if int(r["context"]) == keys(ctx) and int(r["batch"]) == int(batch) and r["provider"] == provider), None)


@region
def model(file=MODEL) -> str:
    """End to end: the best full attention per point and MAC's speed-up over it, each rule with and without the policy."""
    header = ["context", "batch", "best full attention, tok/s", "MAC, paper's rule", "paper's + policy", "MAC, mass rule", "mass + policy"]
    lines = [plots._row(header), plots._row(["---"] * len(header))]
    keys = sorted({(int(r["context"]), int(r["batch"])) for r in rows(file)}, key=lambda k: (-k[0], -k[1]))
    for ctx, batch in keys:
        mac = [model_point(ctx, batch, p, file) for p in MODEL_PROVIDERS]
        best = model_point(ctx, batch, next(r for r in mac if r)["best_full"], file)
        name = {"sdpa": "SDPA", "triton": "Triton", "flashinfer": "FlashInfer"}[best["provider"]]
        cells = [plots._ctx(ctx), str(batch), f"{name}, {float(best['tokens_per_s']):,.0f}"]
        for i, r in enumerate(mac):
            if r is None:
                cells.append("–")
                continue
            x = float(r["speedup_vs_best_full"])
            cell = f"{x:.2f}×" + (f", {float(r['tokens_per_s']):,.0f}" if i == 0 else "")
            cells.append(f"**{cell}**" if x >= 1.05 else cell)
        lines.append(plots._row(cells))
    return "\n".join(lines)


@region
def model_below(provider, bound, file=MODEL) -> str:
    """The points where ``provider`` is below ``bound`` × the best full attention (``"at 8K, batch 64"``)."""
    below = sorted((int(r["context"]), int(r["batch"])) for r in rows(file) if r["provider"] == provider and float(r["speedup_vs_best_full"]) < float(bound))
    if not below:
        return "at no point"
    parts = []
    for ctx in sorted({c for c, _ in below}):
        batches = [str(b) for c, b in below if c == ctx]
        parts.append(f"{plots._ctx(ctx)}, batch{'es' if len(batches) > 1 else ''} {', '.join(batches)}")
    return "at " + "; ".join(parts)


@region
def fidelity(file=FIDELITY) -> str:
    """The fidelity of the end-to-end configurations, teacher forced (``model_fidelity.csv``)."""
    header = ["context", "rule", "KV reads skipped, head / group", "Δppl ± SE", "KL mean", "top-1", "hit rate"]
    lines = [plots._row(header), plots._row(["---"] * len(header))]
    for r in rows(file):
        lines.append(plots._row([
            plots._ctx(int(r["context"])), r["provider"].removeprefix("mac_"),
            f"{percent(r['skipped_head'])} / {percent(r['skipped_group'])}",
            f"{100 * float(r['ppl_change']):+.2f} ± {100 * float(r['ppl_change_se']):.2f} %", f"{float(r['kl_mean']):.4f}",
            percent(r["top1"]), percent(r["hit_rate"]),
        ]))  # fmt: skip
    return "\n".join(lines)


def kernel_kind(name: str) -> str:
    """What a kernel of the end-to-end step does: one of MAC's stages, full attention, or the rest of the model."""
    if "_fresh_kernel" in name:  # a verifying step's attend
        return "attend"
    for stage in ("attend", "match", "decide", "prefix", "reduce"):
        if f"_{stage}_kernel" in name:
            return stage
    return "attention" if re.search(r"sdpa|flashinfer", name) else "rest"


def kernel_times(ctx, batch, provider, file=KERNELS) -> dict[str, tuple[float, int]]:
    """``{kind: (µs per step, launches)}`` of one provider's step."""
    times: dict[str, list] = {}
    for r in rows(file):
        if int(r["context"]) == keys(ctx) and int(r["batch"]) == int(batch) and r["provider"] == provider:
            entry = times.setdefault(kernel_kind(r["kernel"]), [0.0, 0])
            entry[0] += float(r["us"])
            entry[1] += int(float(r["launches"]))
    return {k: (us, n) for k, (us, n) in times.items()}


@region
def model_kernels(ctx, batch, file=KERNELS) -> str:
    """Where an end-to-end step's time goes, per provider: ms per step (launches) of each kind of kernel."""
    kinds = ["attention", "attend", "match", "decide", "prefix", "reduce", "rest"]
    header = ["provider", "full attention", "attend", "match", "decide", "prefix", "reduce", "rest of the model", "sum"]
    lines = [plots._row(header), plots._row(["---"] * len(header))]
    providers = dict.fromkeys(r["provider"] for r in rows(file))
    for provider in providers:
        times = kernel_times(ctx, batch, provider, file)
        if not times:
            continue
        cells = [provider] + [f"{times[k][0] / 1000:.2f} ({times[k][1]})" if k in times else "–" for k in kinds]
        lines.append(plots._row(cells + [f"{sum(us for us, _ in times.values()) / 1000:.2f}"]))
    return "\n".join(lines)


# SmolLM2-135M-Instruct's shape (docs/real_model.md; tests/test_real_model.py checks it against the GGUF file)
SMOLLM2 = dict(layers=30, q_heads=9, kv_heads=3, head_dim=64, bytes=2)


@region
def smollm(what, ctx, batch, provider="sdpa", log="benchmarks/results/decode.log") -> str:
    """SmolLM2's bytes per decode step against the end-to-end kernel times, at the copy bandwidth of the kernel run.

    ``what``: ``kv_gb`` (the keys and values a full-attention step reads), ``floor_ms`` (their
    read time), ``over_floor`` (the provider's attention time over it), ``useful_tbs`` (the KV
    bytes the provider does not skip per KV group over its attention time), ``ring_gb`` (the
    query rings of the demo's window) and ``match_over_floor``.
    """
    from mac_core.config import PRESETS

    m, tokens = SMOLLM2, keys(ctx)
    kv = 2 * tokens * int(batch) * m["layers"] * m["kv_heads"] * m["head_dim"] * m["bytes"]
    rings = int(batch) * m["layers"] * m["q_heads"] * PRESETS["demo"].window * m["head_dim"] * m["bytes"]
    bandwidth = _bandwidth(log) * 1e12
    times = kernel_times(ctx, batch, provider)
    attention = sum(times[k][0] for k in ("attention", "attend") if k in times) * 1e-6  # the kernels that read K and V
    skipped = 0.0
    if provider.startswith("mac_"):
        skipped = float(next(r for r in rows(FIDELITY) if int(r["context"]) == tokens and r["provider"] == provider.removesuffix("_policy"))["skipped_group"])
    return {
        "kv_gb": lambda: f"{kv / 1e9:.1f}", "floor_ms": lambda: f"{kv / bandwidth * 1e3:.2f}",
        "over_floor": lambda: f"{attention / (kv / bandwidth):.2f}×", "useful_tbs": lambda: f"{kv * (1 - skipped) / attention / 1e12:.1f}",
        "ring_gb": lambda: f"{rings / 1e9:.2f}", "match_over_floor": lambda: f"{times['match'][0] * 1e-6 / (rings / bandwidth):.1f}×",
    }[what]()  # fmt: skip


@region
def preset(name) -> str:
    """A configuration of ``mac_core.config.PRESETS``, as ``MACConfig.describe`` says it."""
    from mac_core.config import PRESETS

    return PRESETS[name].describe()


@region
def gpu(file=DECODE) -> str:
    """The GPU a result file was measured on."""
    return rows(file)[0]["gpu"]


def paged_rows(file=PAGED, **match) -> list[dict]:
    return [r for r in rows(file) if all(str(r[k]) == str(v) for k, v in match.items())]


@region
def paged(file=PAGED) -> str:
    """MAC paged over contiguous per page size and hit rate, the full decode paged, FlashInfer's paged decode."""
    header = ["B, context", "page", "MAC paged / contiguous, 0 / 95 / 100 % hits", "full decode paged µs (contiguous)", "FlashInfer paged µs"]
    lines = [plots._row(header), plots._row(["---"] * len(header))]
    for batch, ctx in dict.fromkeys((r["batch"], r["ctx"]) for r in rows(file)):
        shape = dict(batch=batch, ctx=ctx)
        contiguous = paged_rows(file, provider="triton_full", **shape)[0]["median_us"]
        for i, page in enumerate(dict.fromkeys(r["page_size"] for r in paged_rows(file, **shape) if r["page_size"])):
            ratios = [r["paged_over_contiguous"] for r in paged_rows(file, provider="mac_paged", page_size=page, **shape)]
            full = f"{float(paged_rows(file, provider='triton_full_paged', page_size=page, **shape)[0]['median_us']):.0f}"
            fi = f"{float(paged_rows(file, provider='flashinfer', page_size=page, **shape)[0]['median_us']):.0f}"
            cells = [f"{batch}, {plots._ctx(int(ctx))}", page, " / ".join(f"{float(x):.2f}" for x in ratios),
                     full + (f" ({float(contiguous):.0f})" if i == 0 else ""), fi]  # fmt: skip
            lines.append(plots._row(cells))
    return "\n".join(lines)


@region
def paged_vs_flashinfer(batch, file=PAGED) -> str:
    """Our paged full decode's time over FlashInfer's paged decode, lowest–highest over the page sizes."""
    ratios = [float(paged_rows(file, provider="triton_full_paged", batch=batch, page_size=r["page_size"])[0]["median_us"]) / float(r["median_us"])
              for r in paged_rows(file, provider="flashinfer", batch=batch)]  # fmt: skip
    return span(ratios, lambda v: f"{v:.1f}") + "×"


@region
def paged_range(page=None, batch=None, file=PAGED) -> str:
    """Lowest–highest MAC paged / contiguous, over every point or those of one page size or batch."""
    match = {k: v for k, v in (("page_size", page), ("batch", batch)) if v is not None}
    return span([float(r["paged_over_contiguous"]) for r in paged_rows(file, provider="mac_paged", **match)], lambda v: f"{v:.2f}") + "×"


@region
def paged_within(bound, file=PAGED) -> str:
    """How many MAC points run paged within ``bound`` × their contiguous time (``"4 of the 18"``)."""
    ratios = [float(r["paged_over_contiguous"]) for r in paged_rows(file, provider="mac_paged")]
    return f"{sum(x <= float(bound) for x in ratios)} of the {len(ratios)}"


@region
def kernel_change(decode=DECODE, paged_file=PAGED) -> str:
    """The contiguous rows of the paged benchmark (the final attend kernel) beside the decode benchmark's same points."""
    header = ["point", "decode benchmark µs", "paged benchmark, contiguous µs", "ratio"]
    lines = [plots._row(header), plots._row(["---"] * len(header))]
    for r in rows(paged_file):
        if r["page_size"] or r["provider"] not in ("mac", "triton_full"):
            continue
        provider = f"mac@{float(r['hit_rate'])}" if r["provider"] == "mac" else r["provider"]
        before = float(point(r["batch"], r["ctx"], r["hkv"], file=decode).us(provider))
        after = float(r["median_us"])
        name = f"MAC {percent(r['hit_rate'], 0)} hits" if r["provider"] == "mac" else "full decode"
        lines.append(plots._row([f"{name}, b{r['batch']} {plots._ctx(int(r['ctx']))}", f"{before:.1f}", f"{after:.1f}", f"{after / before:.3f}"]))
    return "\n".join(lines)


# --- figures quoted in prose -------------------------------------------------------------


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


@functools.cache
def tables(source: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The tables of a rendered region or of a study's summary: ``{section title: (header, rows)}``.

    ``source``: a table region with its arguments (``"profile"``, ``"model_kernels 8K 64"``), a
    study (``"real_model"``, ``"rule_frontier"``: ``studies/results/STUDY/summary.md``) or a
    markdown file (``benchmarks/results/paged.md``).
    """
    study = REPO / STUDIES / source / "summary.md"
    if source.endswith(".md"):
        markdown = text(source)
    elif study.is_file():
        markdown = study.read_text(encoding="utf-8")
    else:
        markdown = render(source)
    found, title, lines = {}, "", markdown.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("#"):
            title = line.lstrip("#").strip()
        elif line.startswith("|") and i + 1 < len(lines) and re.match(r"\|\s*-", lines[i + 1]) and title not in found:
            end = next((j for j in range(i + 2, len(lines)) if not lines[j].startswith("|")), len(lines))
            found[title] = (_cells(line), [_cells(row) for row in lines[i + 2:end]])
    return found


def table(spec: str, one: bool = True) -> tuple[list[str], list[list[str]]]:
    """``"SOURCE"`` or ``"SOURCE#SECTION"``: the table of :func:`tables` whose section's title starts
    with SECTION (``one=False``: the rows of all such tables, which share the first one's header)."""
    source, _, section = spec.partition("#")
    chosen = [t for title, t in tables(source).items() if title.startswith(section)]
    if not chosen or (one and len(chosen) > 1):
        raise KeyError(f"{spec!r}: {len(chosen)} tables of {source!r} have a title starting with {section!r}")
    return chosen[0][0], [row for _, body in chosen for row in body]


def _same(a: str, b: str) -> bool:
    return a.replace("\u00a0", " ").replace("*", "") == b.replace("\u00a0", " ").replace("*", "")


def _row(body: list[list[str]], key: str) -> list[str]:
    """The row whose first cells, joined by ", ", read ``key``."""
    found = [r for r in body if any(_same(", ".join(r[:k]), key) for k in range(1, len(r) + 1))]
    if len(found) != 1:
        raise KeyError(f"{len(found)} rows read {key!r}")
    return found[0]


def _column(header: list[str], name: str) -> int:
    found = [i for i, h in enumerate(header) if _same(h, name)]
    if len(found) != 1:
        raise KeyError(f"no column {name!r} in {header}")
    return found[0]


_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


def reformat(value: str, round=None, part=None) -> str:
    """A cell's text, its ``part``-th piece (from 1) of ``"a / b"``, ``"a, b"``, ``"a (b)"`` or ``"a ± b"``,
    and its first number rounded to ``round`` decimals."""
    value = value.replace("*", "")
    if part is not None:
        value = re.split(r"\s/\s|,\s|\s\(|\s±\s", value)[int(part) - 1].removesuffix(")")  # \s: the summaries' ± has non-breaking spaces
    if round is not None:
        value = _NUMBER.sub(lambda m: f"{float(m.group(0).replace(',', '')):{'+' if m.group(0)[0] == '+' else ''}.{int(round)}f}", value, count=1)
    return value


@region
def cell(spec, row, column, round=None, part=None) -> str:
    """A cell of a table (:func:`table`): the row whose first cells read ``row``, the column headed ``column``."""
    header, body = table(spec)
    return reformat(_row(body, row)[_column(header, column)], round, part)


@region
def diff(spec, row, other, column, part=None) -> str:
    """A cell of a table minus the cell of the row ``other`` in the same column (at the cells' decimals)."""
    a, b = (cell(spec, r, column, part=part) for r in (row, other))
    decimals = max(len(v.partition(".")[2]) for v in (a, b))
    return f"{float(a) - float(b):.{decimals}f}"


def _numbers(spec, column, rows=None, round=None, part=None) -> list[tuple[float, str]]:
    """``(number, its text)`` of a column's cells, in every table ``spec`` names (the rows whose
    first cells, joined by ", ", match the regular expression ``rows``)."""
    header, body = table(spec, one=False)
    i = _column(header, column)
    found = []
    for r in body:
        if rows is None or re.search(rows, ", ".join(r)):
            m = _NUMBER.search(reformat(r[i], round, part))
            if m:
                found.append((float(m.group(0).replace(",", "")), m.group(0)))
    return found


@region
def range_(spec, column, rows=None, round=None, part=None, end=None) -> str:
    """Lowest–highest number of a column (``rows``: as for :func:`_numbers`; ``end``: ``low`` or ``high`` alone),
    with the cells' unit when it is ``×`` or ``%``."""
    numbers = _numbers(spec, column, rows, round, part)
    low, high = min(numbers)[1], max(numbers)[1]
    header, body = table(spec, one=False)
    unit = re.search(r"(\s?[×%])$", body[0][_column(header, column)].replace("*", ""))
    unit = unit.group(1) if unit and part is None else ""
    if end:
        return {"low": low, "high": high}[end] + unit
    return (low if low == high else f"{low}–{high.lstrip('+') if low.startswith('+') else high}") + unit


@region
def gap(spec, column, other, rows=None, nd=0) -> str:
    """Lowest–highest difference between two columns' numbers (``column`` minus ``other``), row by row."""
    header, body = table(spec, one=False)
    i, j = _column(header, column), _column(header, other)
    gaps = [float(_NUMBER.search(r[i]).group(0)) - float(_NUMBER.search(r[j]).group(0)) for r in body if rows is None or re.search(rows, ", ".join(r))]
    return span(gaps, lambda v: fixed(v, nd))


@region
def median(spec, column, rows=None, round=None, part=None) -> str:
    """The (upper) median number of a column (``rows``: as for :func:`_numbers`)."""
    numbers = sorted(_numbers(spec, column, rows, round, part))
    return numbers[len(numbers) // 2][1]


@region
def drop(spec, row, other, column, part=None) -> str:
    """By how much the row ``other``'s number is below ``row``'s in one column, as a share of ``row``'s."""
    a, b = (float(_NUMBER.search(cell(spec, r, column, part=part)).group(0)) for r in (row, other))
    return percent(1 - b / a, 0)


@region
def x(batch, ctx, provider, hkv=8, window=1024, file=DECODE, nd=2, base="flashinfer") -> str:
    """A decode point's speed-up over FlashInfer (the faster of its two; ``provider``: ``mac@0.95``,
    ``triton_full``, …), or over ``base`` (``flashinfer_tcoff``: without tensor cores)."""
    p = point(batch, ctx, hkv, window, file)
    return f"{float(us(batch, ctx, base, hkv, window, file, 9)) / float(p.us(provider)):.{int(nd)}f}×"


@region
def us(batch, ctx, provider, hkv=8, window=1024, file=DECODE, nd=1) -> str:
    """A decode point's median time in µs (``provider``: as for :func:`x`, ``flashinfer`` for the faster of
    its two, ``floor`` for the KV-read floor)."""
    p = point(batch, ctx, hkv, window, file)
    value = {"flashinfer": lambda: p.flashinfer, "floor": lambda: p.rows["triton_full"]["floor_us"]}.get(provider, lambda: p.us(provider))()
    return fixed(value, nd)


@region
def over_floor(batch, ctx, provider, hkv=8, window=1024, file=DECODE, nd=1) -> str:
    """A decode point's time over its KV-read floor."""
    return f"{float(us(batch, ctx, provider, hkv, window, file, 9)) / float(us(batch, ctx, 'floor', hkv, window, file, 9)):.{int(nd)}f}×"


@region
def to_reach(batch, ctx, provider, speedup, hkv=8, window=1024, file=DECODE) -> str:
    """The step time that a speed-up of ``speedup`` over FlashInfer needs, and how much less that is than now."""
    needed = float(us(batch, ctx, "flashinfer", hkv, window, file, 9)) / float(speedup)
    return f"{needed:.1f} µs, {float(us(batch, ctx, provider, hkv, window, file, 9)) - needed:.1f} µs less"


@region
def ratio(batch, ctx, provider, before, after, hkv=8, window=1024, nd=2) -> str:
    """How many times faster a decode point got from the run ``before`` to the run ``after`` (two CSV files)."""
    old, new = (float(point(batch, ctx, hkv, window, f).us(provider)) for f in (before, after))
    return f"{old / new:.{int(nd)}f}×"


@region
def rerun(before, kind, file=DECODE) -> str:
    """This run's times over the run ``before``'s, at the same points: ``kind`` ``mac`` (every MAC point) or
    ``baselines`` (FlashInfer, SDPA, the full decode)."""
    old = {(p.hkv, p.batch, p.ctx, p.window): p for p in points(before)}
    ratios = []
    for p in points(file):
        q = old.get((p.hkv, p.batch, p.ctx, p.window))
        for provider in p.rows if q else ():
            chosen = provider.startswith("mac@") if kind == "mac" else provider in ("flashinfer_tcon", "flashinfer_tcoff", "sdpa", "triton_full")
            if chosen and provider in q.rows:
                ratios.append(float(p.us(provider)) / float(q.us(provider)))
    return f"{span(ratios, lambda v: f'{v:.2f}')}× the time (median {statistics.median(ratios):.3f}×, {len(ratios)} points)"


@region
def match_alone(batch, window=1024, file=DECODE) -> str:
    """The match scan's time alone (the ``mac_match_only`` rows), lowest–highest over Hkv and context, µs."""
    times = [float(p.us("mac_match_only")) for p in points(file) if p.batch == int(batch) and p.window == int(window) and p.us("mac_match_only")]
    return span(times, lambda v: f"{v:.1f}")


@region
def match_bandwidth(batch, window=1024, file=DECODE, log="benchmarks/results/decode.log") -> str:
    """The share of the copy bandwidth at which the match scan reads the rings (Hq 32, D 128, bf16 queries)."""
    ring_bytes = int(batch) * 32 * int(window) * 128 * 2
    times = [float(p.us("mac_match_only")) for p in points(file) if p.batch == int(batch) and p.window == int(window) and p.us("mac_match_only")]
    return percent(ring_bytes / (statistics.median(times) * 1e-6) / (_bandwidth(log) * 1e12), 0)


def _bandwidth(log) -> float:
    return float(re.search(r"copy bandwidth ([\d.]+) TB/s", text(log)).group(1))


@region
def bandwidth_ratio(log, other) -> str:
    """How many times the first log's copy bandwidth is the second's."""
    return f"{_bandwidth(log) / _bandwidth(other):.1f}×"


@region
def find(pattern, file, which="first", fmt=None) -> str:
    """What the group of the regular expression ``pattern`` catches in a file (a log's copy bandwidth,
    its tests passed): the first match, ``all`` of them joined by " / ", or (``which``) the ``max``,
    ``min`` or ``range`` of the numbers it catches; ``fmt``: a format for the numbers (``.1e``)."""
    found = re.findall(pattern, text(file))
    if not found:
        raise KeyError(f"{pattern!r} is not in {file}")
    if which == "all":
        return " / ".join(found)
    if which == "first":
        return format(float(found[0]), fmt) if fmt else found[0]
    numbers = [float(v) for v in found]
    show = (lambda v: format(v, fmt)) if fmt else (lambda v: found[numbers.index(v)])
    return {"max": lambda: show(max(numbers)), "min": lambda: show(min(numbers)), "range": lambda: span(numbers, show)}[which]()


@region
def csv_range(file, column, per=None, nd=2, pct=None, **where) -> str:
    """Lowest–highest of a CSV column (divided by the column ``per``, if given; ``pct``: as a percentage)
    over the rows that match ``where`` (``column=value`` options; ``batch=32|64``: either value)."""
    values = [float(r[column]) / (float(r[per]) if per else 1) for r in rows(file) if all(r[k] in v.split("|") for k, v in where.items())]
    if not values:
        raise KeyError(f"no row of {file} has {where}")
    return span([100 * v for v in values] if pct else values, lambda v: fixed(v, nd)) + (" %" if pct else "")


@region
def log_value(label, log, part=None) -> str:
    """What a log line says after ``label`` (the demo's report: ``"hit rate"`` -> ``"85.2%"``); ``part``: the n-th of its
    comma-separated pieces (from 1)."""
    line = next(line for line in text(log).split("\n") if line.strip().startswith(label))
    value = re.split(r"\s{3,}\(", line.strip()[len(label):].strip())[0]
    return value.split(", ")[int(part) - 1] if part else value


@region
def log(path, lang="text") -> str:
    """A log file whole, as a code block."""
    return f"```{lang}\n{text(path).rstrip()}\n```"


@region
def include(path) -> str:
    """A markdown result file whole (a benchmark's own table)."""
    return text(path).rstrip()


@region
def demo_runs(*logs) -> str:
    """The demo's report lines, one row per log (``python -m mac_llm demo`` runs)."""
    header = ["run", "hit rate", "skipped per head / group", "greedy tokens identical", "KL mean", "tokens/s full / MAC"]
    lines = [plots._row(header), plots._row(["---"] * len(header))]
    for path in logs:
        setting = log_value("MAC:", path)
        tokens = log_value("tokens per second", path)
        full, mac = re.findall(r"([\d.]+) (?:full attention|MAC)", tokens)
        greedy = " ".join(find(r"greedy tokens identical\s+([^\n]+)", path).split())
        cells = [f"`--backend {setting.split('backend ')[-1]}` ([log](repo/{path}))", log_value("hit rate", path),
                 f"{log_value('KV reads skipped, per query head', path)} / {log_value('KV reads skipped, per KV group', path)}",
                 greedy,
                 log_value("teacher forcing: KL(full‖MAC)", path, part=1).removesuffix(" mean"), f"{full} / {mac}"]  # fmt: skip
        lines.append(plots._row(cells))
    return "\n".join(lines)


# --- the regions of the pages ------------------------------------------------------------

_REGION = re.compile(r"(<!-- report: (.+?) -->)(.*?)(<!-- /report -->)", re.S)


def render(spec: str) -> str:
    """What the region ``NAME ARG ... key=value`` shows."""
    name, *words = shlex.split(spec)
    if name not in REGIONS:
        raise KeyError(f"no region {name!r}: expected one of {sorted(REGIONS)}")
    args = [w for w in words if not re.match(r"\w+=", w)]
    options = dict(w.split("=", 1) for w in words if re.match(r"\w+=", w))
    return REGIONS[name](*args, **options)


def refreshed(page: str) -> str:
    """The page's text with every region rendered afresh (a region on lines of its own stays so)."""
    def fill(m: re.Match) -> str:
        block = m.group(3).startswith("\n")
        try:
            body = render(m.group(2))
        except Exception as error:  # a region that cannot be rendered names itself
            raise ValueError(f"<!-- report: {m.group(2)} -->: {type(error).__name__}: {error}") from error
        return m.group(1) + (f"\n{body.strip()}\n" if block else body) + m.group(4)

    return _REGION.sub(fill, page)


def pages() -> list[Path]:
    return sorted(path for pattern in PAGES for path in REPO.glob(pattern))


def changed_pages():
    """``(path, old text, refreshed text)`` of every page whose regions differ from the result files."""
    clear()
    for path in pages():
        old = path.read_text(encoding="utf-8")
        new = refreshed(old)
        if new != old:
            yield path, old, new


def stale() -> list[str]:
    """The pages whose regions differ from what the result files give, with the first differing region of each."""
    found = []
    for path, old, new in changed_pages():
        first = next(o.group(2) for o, n in zip(_REGION.finditer(old), _REGION.finditer(new)) if o.group(3) != n.group(3))
        found.append(f"{path.relative_to(REPO)}: <!-- report: {first} -->")
    return found


def refresh() -> list[Path]:
    """Rewrite every region of the pages; returns the pages that changed."""
    changed = []
    for path, _, new in changed_pages():
        path.write_text(new, encoding="utf-8")
        changed.append(path)
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only list the stale regions (exit status 1 if any)")
    args = parser.parse_args()
    if args.check:
        problems = stale()
        print("\n".join(problems) or "every region is up to date")
        sys.exit(1 if problems else 0)
    for path in refresh():
        print(path.relative_to(REPO))


if __name__ == "__main__":
    main()
