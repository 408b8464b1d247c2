"""The figures of the docs site's concept pages, generated from the reference code.

Each ``fig_*`` function draws one PNG from numbers it computes (with ``mac_ref`` where the
figure is about the method, or with the project's measured H100 run
(``benchmarks/results/h100_final/decode.csv``) for
the memory-bound page). :func:`build_all` regenerates them when this file, ``mac_core``,
``mac_ref`` or that run changed; the docs build calls it (``docs/hooks.py``).

    python docs/scripts/figures.py [OUT_DIR]    # draw every figure, default build/docs/figures
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib import patches  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import mac_ref  # noqa: E402

OUT_DIR = REPO / "build" / "docs" / "figures"
DPI = 110
BAND_COLOR, TAIL_COLOR, REUSED_COLOR, SINK_COLOR = "#f28e2b", "#4e79a7", "#bab0ac", "#59a14f"

# ---------------------------------------------------------------------------------------
# 1. decode is memory-bound

# the project's own H100 run of benchmarks/bench_decode.py (H100 80GB HBM3, bf16, Hq 32,
# Hkv 8, D 128; CUDA-graph medians; the floor is the KV bytes over the measured copy bandwidth)
H100_RUN = REPO / "benchmarks" / "results" / "h100_final" / "decode.csv"


def h100_measured() -> dict[tuple[int, int], tuple[float, float, float]]:
    """``{(batch, context): (KV-read floor µs, FlashInfer µs (best of tensor cores on/off), SDPA µs)}``."""
    import csv

    times: dict = {}
    with H100_RUN.open() as f:
        for row in csv.DictReader(f):
            if row["hkv"] == "8" and row["window"] == "1024" and row["provider"] in ("sdpa", "flashinfer_tcon", "flashinfer_tcoff"):
                entry = times.setdefault((int(row["batch"]), int(row["ctx"])), {"floor": float(row["floor_us"])})
                entry[row["provider"]] = float(row["median_us"])
    return {key: (e["floor"], min(e["flashinfer_tcon"], e["flashinfer_tcoff"]), e["sdpa"]) for key, e in times.items()}


def kv_bytes_full(context, kv_heads=8, head_dim=128, bytes_per_elem=2):
    """Bytes of K and V one full-attention decode step reads, per layer and request."""
    return 2 * context * kv_heads * head_dim * bytes_per_elem


def kv_bytes_hit(lag, band, window, q_heads=32, kv_heads=8, head_dim=128, bytes_per_elem=2):
    """Bytes of an all-hit MAC step: band + tail keys and values, the query ring, the rows."""
    band_tail = 2 * (lag + band) * kv_heads * head_dim * bytes_per_elem
    ring_scan = q_heads * window * head_dim * bytes_per_elem
    rows = q_heads * (head_dim * 4 + 4)
    return band_tail + ring_scan + rows


def context_ticks(ax, contexts) -> None:
    """A context axis labelled in K (1K, 2K, … 128K), one tick per point."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [f"{n // 1024}K" for n in contexts])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def fig_bytes_per_step(path: Path) -> None:
    contexts = [2**k for k in range(10, 18)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=DPI)
    ax1.loglog(contexts, [kv_bytes_full(n) / 2**20 for n in contexts], "o-", label="full attention: all N keys")
    for window in (512, 1024, 2048):
        hit = [kv_bytes_hit(64, 256, window) / 2**20 for _ in contexts]
        ax1.loglog(contexts, hit, "--", label=f"MAC hit, W={window}, lag 64, r=256")
    ax1.set(xlabel="context N (tokens)", ylabel="MiB read per layer per step",
            title="bytes per decode step (Llama-3.1-8B shapes, bf16)")
    context_ticks(ax1, contexts)
    ax1.legend(fontsize=7)
    ax1.grid(True, which="both", alpha=0.3)

    for batch, marker in ((1, "o"), (16, "s")):
        rows = sorted((n, v) for (b, n), v in h100_measured().items() if b == batch)
        ns = [n for n, _ in rows]
        ax2.loglog(ns, [v[0] for _, v in rows], marker + "-", color="k", label=f"KV-read floor, batch {batch}")
        ax2.loglog(ns, [v[1] for _, v in rows], marker + "--", color="C1", label=f"FlashInfer, batch {batch}")
        ax2.loglog(ns, [v[2] for _, v in rows], marker + ":", color="C2", label=f"torch SDPA, batch {batch}")
    ax2.set(xlabel="context N (tokens)", ylabel="µs per decode step (one layer)",
            title="measured on one H100 (Hq=32, Hkv=8, D=128)")
    context_ticks(ax2, ns)
    ax2.set_ylim(top=ax2.get_ylim()[1] * 12)  # room above the lines for the legend
    ax2.legend(fontsize=7, loc="upper left", ncol=2)
    ax2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# 2. the conditioning of ⊖


def removal_error(remaining_share: float, storage_dtype: torch.dtype, rows: int = 2048, head_dim: int = 64) -> float:
    """Median relative error of ``(a ⊕ b) ⊖ b`` against ``a`` when ``a`` holds ``remaining_share``
    of the mass and the merged state is stored in ``storage_dtype`` (LSE in float32)."""
    gen = torch.Generator().manual_seed(0)
    o_a = torch.randn(rows, head_dim, generator=gen, dtype=torch.float64)
    o_b = torch.randn(rows, head_dim, generator=gen, dtype=torch.float64)
    lse_a = torch.randn(rows, generator=gen, dtype=torch.float64)
    lse_b = lse_a + math.log((1 - remaining_share) / remaining_share)  # b holds 1 − share of the mass
    a, b = mac_ref.Summary(o_a, lse_a), mac_ref.Summary(o_b, lse_b)
    total = mac_ref.merge(a, b)

    def stored(s):
        return mac_ref.Summary(s.o.to(storage_dtype).float(), s.lse.float())

    rest, _ = mac_ref.remove(stored(total), stored(b))
    err = (rest.o.double() - o_a).norm(dim=-1) / o_a.norm(dim=-1)
    return err.median().item()


def fig_remove_error(path: Path) -> None:
    shares = [10 ** (-k / 4) for k in range(0, 25)]  # remaining share 1 − e^δ from 1 to 1e-6
    shares[0] = 0.5
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=DPI)
    for dtype, name, color in ((torch.float32, "float32", "C0"), (torch.bfloat16, "bf16", "C3")):
        errors = [removal_error(s, dtype) for s in shares]
        eps = torch.finfo(dtype).eps
        ax.loglog(shares, errors, "o-", color=color, ms=4, label=f"(a ⊕ b) ⊖ b vs a, states stored in {name}")
        ax.loglog(shares, [eps / s for s in shares], "--", color=color, alpha=0.6, label=f"ε/(1 − e^δ), ε = {name} eps")
    ax.axvline(mac_ref.removal_epsilon(torch.float32), color="gray", ls=":", label="removal_epsilon(float32): result → empty")
    ax.invert_xaxis()
    ax.set(xlabel="remaining share 1 − e^δ (removed mass →)", ylabel="median relative error of o",
           title="⊖ is ill-conditioned as the removed part takes all the mass")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# 3. match: pre-RoPE vs post-RoPE, the threshold


def fig_rope_distance(path: Path, head_dim: int = 128, noise: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(1)
    lags = torch.arange(0, 1025, 8)
    t = 4096
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=DPI)
    for i in range(4):
        q = torch.randn(head_dim, generator=gen, dtype=torch.float64)
        copy = q + noise * torch.randn(len(lags), head_dim, generator=gen, dtype=torch.float64)  # the earlier query
        pre = (copy - q).norm(dim=-1)
        post = (mac_ref.apply_rope(copy, t - lags) - mac_ref.apply_rope(q, t)).norm(dim=-1)
        ax.plot(lags, post, color="C3", alpha=0.7, label="post-RoPE distance" if i == 0 else None)
        ax.plot(lags, pre, color="C0", alpha=0.7, label="pre-RoPE distance" if i == 0 else None)
    for tau, ls in ((0.45, "--"), (0.75, ":")):
        ax.axhline((1 - tau) * math.sqrt(2 * head_dim), color="k", ls=ls, lw=1, label=f"hit radius, τ = {tau}")
    ax.set(xlabel="lag t − j between a query and its near-copy", ylabel="L2 distance",
           title=f"the same query seen again (D={head_dim}, copy noise {noise})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fig_threshold(path: Path, head_dim: int = 128) -> None:
    gen = torch.Generator().manual_seed(2)
    n = 20000
    x = torch.randn(n, head_dim, generator=gen)
    random_pairs = (x - torch.randn(n, head_dim, generator=gen)).norm(dim=-1)
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=DPI)
    ax.hist(random_pairs, bins=80, color="C7", alpha=0.8, density=True, label="two independent queries")
    for noise, color in ((0.1, "C0"), (0.3, "C2"), (0.5, "C4")):
        near = (noise * torch.randn(n, head_dim, generator=gen)).norm(dim=-1)
        ax.hist(near, bins=80, color=color, alpha=0.7, density=True, label=f"near-copies, noise {noise}/entry")
    for tau, ls in ((0.45, "--"), (0.75, ":"), (0.9, "-.")):
        r = (1 - tau) * math.sqrt(2 * head_dim)
        ax.axvline(r, color="k", ls=ls, lw=1, label=f"τ = {tau}: radius {r:.1f}")
    ax.axvline(math.sqrt(2 * head_dim), color="k", lw=2, label=f"√(2D) = {math.sqrt(2 * head_dim):.1f} (τ = 0)")
    ax.set(xlabel="‖q̃_t − q̃_j‖ (entries of unit variance, D = 128)", ylabel="density",
           title="the hit radius (1 − τ)·√(2D) against the random-pair distance")
    ax.legend(fontsize=7, loc="upper center")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# 4. accept: which candidates the rules take


def fig_accept(path: Path) -> None:
    """The plane of a candidate's distance and mass share: what each rule accepts (the presets' τ, τ_m)."""
    paper, demo = mac_ref.PRESETS["paper"], mac_ref.PRESETS["demo"]
    x = torch.linspace(0, 1, 801)  # √(d / 2D) / s_h
    w = torch.linspace(0, 1, 801)[:, None]
    by_paper = x < 1 - paper.tau
    by_mass = (x < 1 - demo.tau) & (x * w < 1 - demo.rule.tau_m)
    # 0: neither, 1: the paper's rule only, 2: the mass rule only, 3: both
    region = by_paper.expand_as(by_mass).int() + 2 * by_mass.int()
    colors = ["white", "#f4c7a1", "#a9cce3", "#b5ddb0"]
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=DPI)
    ax.imshow(region, origin="lower", extent=(0, 1, 0, 1), aspect="auto", interpolation="nearest",
              cmap=matplotlib.colors.ListedColormap(colors), vmin=0, vmax=3)
    ax.axvline(1 - paper.tau, color="k", lw=1.2, ls="--")
    ax.axvline(1 - demo.tau, color="k", lw=1.2, ls=":")
    xs = torch.linspace(1 - demo.rule.tau_m, 1 - demo.tau, 200)
    ax.plot(xs, (1 - demo.rule.tau_m) / xs, color="k", lw=1.2)
    labels = [(colors[3], "a hit under both rules"), (colors[1], "a hit under the paper's rule only:\nnear, but the row carries most of the mass"),
              (colors[2], "a hit under the mass rule only:\nfar, but the row carries little mass"), (colors[0], "a miss under both")]
    handles = [patches.Patch(facecolor=c, edgecolor="grey", label=text) for c, text in labels]
    handles += [plt.Line2D([], [], color="k", ls="--", label=f"paper's radius, τ = {paper.tau:g}"),
                plt.Line2D([], [], color="k", ls=":", label=f"candidate cap, τ = {demo.tau:g}"),
                plt.Line2D([], [], color="k", label=f"mass rule: √(d/2D)·w = 1 − τ_m, τ_m = {demo.rule.tau_m:g}")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    ax.set(xlabel="distance of the candidate, √(d_j* / 2D) / s_h", ylabel="mass share of its row, w",
           title="which candidates are hits (presets \"paper\" and \"demo\")")
    fig.savefig(path, bbox_inches="tight")  # the legend sits outside the axes
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# 5. amend: where the mass sits, what the band buys


def related_neighbours_toy(T: int = 2048, D: int = 64, corr: float = 0.98, sharp: float = 2.0, seed: int = 4):
    """A toy context in which neighbouring tokens are related, as in text.

    Token ``j``'s direction ``u_j`` is a random walk (correlation ``corr`` per step, about
    ``1/(1 − corr)`` tokens of memory); its key is ``RoPE(u_j, j)`` and the query of the
    last token is ``sharp · u_{T−1}``. Returns ``(q_pre [D], k [T, D], v [T, D])`` float64.
    """
    gen = torch.Generator().manual_seed(seed)
    u = torch.empty(T, D, dtype=torch.float64)
    u[0] = torch.randn(D, generator=gen, dtype=torch.float64)
    for j in range(1, T):
        u[j] = corr * u[j - 1] + math.sqrt(1 - corr**2) * torch.randn(D, generator=gen, dtype=torch.float64)
    k = mac_ref.apply_rope(u, torch.arange(T))
    v = torch.randn(T, D, generator=gen, dtype=torch.float64)
    return sharp * u[-1], k, v


def reuse_error(q_pre, k, v, lag: int, band: int, noise: float = 0.05, seed: int = 0) -> float:
    """Relative error of ``A(q_j*, [0, P)) ⊕ A(q_t, [P, t+1))`` against full attention of ``q_t``.

    ``t`` is the last position, ``j* = t − lag`` holds a near-copy of ``q̃_t``, ``P = E(j*)``.
    """
    T, D = k.shape
    t = T - 1
    j = t - lag
    gen = torch.Generator().manual_seed(seed)
    q_match = q_pre + noise * torch.randn(D, generator=gen, dtype=torch.float64)
    q_t, q_j = mac_ref.apply_rope(q_pre, t), mac_ref.apply_rope(q_match, j)
    kk, vv = k[None, None], v[None, None]  # [1, 1, T, D]
    P = max(j + 1 - band, 0)
    reused = mac_ref.attend(q_j[None, None], kk, vv, 0, P)
    fresh = mac_ref.attend(q_t[None, None], kk, vv, P, t + 1)
    approx = mac_ref.merge(reused, fresh).o
    exact = mac_ref.attend(q_t[None, None], kk, vv, 0, t + 1).o
    return ((approx - exact).norm() / exact.norm()).item()


def fig_band(path: Path) -> None:
    q_pre, k, v = related_neighbours_toy()
    T, D = k.shape
    t = T - 1
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=DPI)

    # where the reused row is wrong: |softmax weight of q_t − of q_j*| on each key before j*
    for lag, color in ((1, "C2"), (4, "C0")):
        j = t - lag
        q_t, q_j = mac_ref.apply_rope(q_pre, t), mac_ref.apply_rope(q_pre, j)
        keys = k[: j + 1]
        gap = (torch.softmax(keys @ q_t / math.sqrt(D), 0) - torch.softmax(keys @ q_j / math.sqrt(D), 0)).abs()
        share = gap.flip(0).cumsum(0) / gap.sum()  # by distance j* − key
        ax1.semilogx(torch.arange(1, j + 2), share, color=color, label=f"match lag t − j* = {lag}")
    probs = torch.softmax(k @ mac_ref.apply_rope(q_pre, t) / math.sqrt(D), 0).flip(0).cumsum(0)
    ax1.semilogx(torch.arange(1, T + 1), probs, "k--", lw=1, label="softmax mass of q_t (from t back)")
    ax1.set(xlabel="keys nearest the boundary (distance < x)", ylabel="cumulative share",
            title="mass and reuse error both sit near the cursor")
    ax1.legend(fontsize=8)
    ax1.grid(True, which="both", alpha=0.3)

    bands = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    for lag, color in ((1, "C2"), (4, "C0"), (16, "C3")):
        errors = [reuse_error(q_pre, k, v, lag, band) for band in bands]
        ax2.loglog([max(b, 0.5) for b in bands], errors, "o-", color=color, ms=4, label=f"lag {lag}")
    ax2.set_xscale("log", base=2)
    ax2.set(xlabel="band r (r = 0 plotted at 0.5)", ylabel="relative error vs full attention",
            title="R_j* ⊕ A(q_t, [E(j*), t+1)): error against the band")
    ax2.legend(fontsize=8)
    ax2.grid(True, which="both", alpha=0.3)
    fig.suptitle("toy context with related neighbours (random-walk key directions, D = 64, N = 2048)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# 6. the decode step: the ranges and the ring


def fig_ranges(path: Path) -> None:
    t, r, lag, W = 100, 24, 13, 40
    j = t - lag
    P, N = j + 1 - r, t + 1 - r
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 4.4), dpi=DPI, gridspec_kw={"height_ratios": [1.25, 1]})

    def span(ax, y, a, b, color, text, hatch=None):
        ax.add_patch(patches.Rectangle((a, y), b - a, 0.8, facecolor=color, edgecolor="k", hatch=hatch, lw=0.8))
        box = {"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.5} if hatch else None
        ax.text((a + b) / 2, y + 0.4, text, ha="center", va="center", fontsize=8, bbox=box)

    span(ax1, 1.2, 0, P, REUSED_COLOR, "[0, P): never read — inside the reused row R_j*", hatch="//")
    span(ax1, 1.2, P, N, BAND_COLOR, "[P, N): band")
    span(ax1, 1.2, N, t + 1, TAIL_COLOR, "[N, t+1): tail")
    span(ax1, 0.0, 0, N, "#e0e0e0", "miss: [0, N) read with q_t")
    span(ax1, 0.0, N, t + 1, TAIL_COLOR, "tail")
    for x, name in ((P, "P = E(j*)"), (N, "N = E(t)"), (j, "j*"), (t, "t")):
        ax1.axvline(x, color="k", lw=0.6, ls=":")
        ax1.text(x, 2.15, name, ha="center", fontsize=8)
    ax1.text(-1, 1.6, "hit", ha="right", va="center", fontsize=9, weight="bold")
    ax1.text(-1, 0.4, "miss", ha="right", va="center", fontsize=9, weight="bold")
    ax1.set(xlim=(-12, t + 4), ylim=(-0.2, 2.5), yticks=[], xlabel="key position")
    ax1.set_title(f"the key ranges of one step (t={t}, band r={r}, match j*={j}, lag {lag})", fontsize=10)

    # the ring: slot s holds the row of the latest token j with j mod W = s
    for s in range(W):
        tok = t - 1 - ((t - 1 - s) % W)
        color = "#fde0c5" if tok == j else ("#dbe8f3" if tok >= t - W else "white")
        ax2.add_patch(patches.Rectangle((s, 0), 1, 1, facecolor=color, edgecolor="k", lw=0.5))
        ax2.text(s + 0.5, 0.5, str(tok), ha="center", va="center", fontsize=6, rotation=90)
    new_slot = t % W
    ax2.add_patch(patches.Rectangle((new_slot, 0), 1, 1, fill=False, edgecolor="C3", lw=2))
    ax2.annotate(f"slot t mod W = {new_slot}: after the step, row (q̃_t, R_t) overwrites token {t - W}",
                 (new_slot + 0.5, 1.0), (new_slot + 3, 1.55), fontsize=8, arrowprops={"arrowstyle": "->"})
    ax2.annotate(f"match j* = {j} (slot {j % W}): its row R_j* covers [0, P)", (j % W + 0.5, 0),
                 (j % W - 4, -0.8), fontsize=8, arrowprops={"arrowstyle": "->"})
    ax2.set(xlim=(-1, W + 1), ylim=(-1.1, 2.0), xticks=[], yticks=[])
    ax2.set_title(f"the ring (W={W} slots, token number in each): candidates are tokens [t − W, t)", fontsize=10)
    for ax in (ax1, ax2):
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
    ax2.spines["bottom"].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fig_split_kv(path: Path) -> None:
    """Split-KV schedule: each head's span cut into fixed chunks, one program per chunk."""
    spans = {"head 0 (hit, lag 3)": (740, 1024), "head 1 (hit, lag 40)": (703, 1024),
             "head 2 (miss)": (0, 1024), "head 3 (hit, lag 12)": (731, 1024)}
    chunk = 128
    fig, ax = plt.subplots(figsize=(10, 3.0), dpi=DPI)
    program = 0
    for y, (name, (a, b)) in enumerate(spans.items()):
        ax.add_patch(patches.Rectangle((0, y), a, 0.7, facecolor=REUSED_COLOR, hatch="//", edgecolor="none"))
        start = a
        while start < b:
            stop = min(start + chunk, b)
            color = TAIL_COLOR if start >= b - 100 else BAND_COLOR
            ax.add_patch(patches.Rectangle((start, y), stop - start, 0.7, facecolor=color, edgecolor="k", lw=0.6))
            ax.text((start + stop) / 2, y + 0.35, f"p{program}", ha="center", va="center", fontsize=7)
            program += 1
            start = stop
        ax.text(-10, y + 0.35, name, ha="right", va="center", fontsize=8)
    ax.set(xlim=(-260, 1060), ylim=(-0.3, len(spans)), yticks=[], xlabel="key position")
    ax.set_title(f"split-KV: each program (p0 … p{program - 1}) attends ≤ {chunk} keys of one head; "
                 "partial (o, lse) are then ⊕-merged per head", fontsize=10)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


FIGURES = {
    "bytes_per_step.png": fig_bytes_per_step,
    "remove_error.png": fig_remove_error,
    "rope_distance.png": fig_rope_distance,
    "threshold.png": fig_threshold,
    "accept.png": fig_accept,
    "band.png": fig_band,
    "ranges.png": fig_ranges,
    "split_kv.png": fig_split_kv,
}


def sources_key() -> str:
    """Hash of this script, ``mac_core``, ``mac_ref`` and the measured run: the figures change only when these do."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for path in [*sorted((REPO / "mac_core").glob("*.py")), *sorted((REPO / "mac_ref").glob("*.py")), H100_RUN]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_all(out_dir: Path = OUT_DIR, force: bool = False, log=print) -> dict[str, Path]:
    """Draw every figure into ``out_dir`` unless it is up to date; returns ``{name: path}``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = out_dir / ".key"
    key = sources_key()
    paths = {name: out_dir / name for name in FIGURES}
    if not force and stamp.exists() and stamp.read_text() == key and all(p.exists() for p in paths.values()):
        log("figures: up to date")
        return paths
    start = time.perf_counter()
    for name, draw in FIGURES.items():
        draw(paths[name])
    stamp.write_text(key)
    log(f"figures: {len(FIGURES)} drawn in {time.perf_counter() - start:.1f} s")
    return paths


if __name__ == "__main__":
    build_all(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR, force=True)
