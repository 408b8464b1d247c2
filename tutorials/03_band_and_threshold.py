# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. Band, reuse gap, τ and window
#
# Two questions decide whether MAC-Attention pays off:
#
# 1. **How wrong is a reused summary?** It depends on the band $r$ recomputed with the current
#    query and on the reuse gap (lag) $\Delta = t - j^*$. The paper sweeps the band (its
#    Figure 4): $r \approx 8$ removes most of the error, accuracy saturates by $r = 256$.
# 2. **How often does a step hit?** It depends on the threshold τ and the window $W$. The paper
#    sweeps both per layer (its Figure 5): returns diminish past $W \approx 2048$.
#
# We reproduce the *shape* of both on synthetic data, where every quantity is under our
# control. Real models differ in the numbers, not in the mechanics.

# %%
import math
import os
import time

import matplotlib.pyplot as plt
import torch

import mac_ref

SMALL = os.environ.get("MAC_TUTORIAL_SIZE", "full") == "small"  # CI knob: smaller sweeps
torch.set_printoptions(precision=3, sci_mode=False)

# %% [markdown]
# ## Part 1: error against band and reuse gap
#
# In text, neighbouring tokens are related, so attention mass sits near the cursor. We
# model that with key directions that follow a random walk (each step keeps a share `corr`
# of the previous direction): a query resembling the current token attends mostly to recent
# keys. The match $j^* = t - \Delta$ holds a near-copy of the current pre-RoPE query.
#
# The reused output is $R_{j^*} \oplus A(q_t, [E(j^*), t+1))$ with $E(j^*) = j^* + 1 - r$: the
# matched query's attention over the far prefix, then the band and the tail with the
# current query. We compare it with full attention of the current query.


# %%
def related_context(T, D, corr=0.98, sharp=2.0, seed=0):
    """Keys whose directions follow a random walk; the query of the last token points along it."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(T, D, generator=g, dtype=torch.float64)
    u = torch.empty(T, D, dtype=torch.float64)
    u[0] = steps[0]
    for j in range(1, T):
        u[j] = corr * u[j - 1] + math.sqrt(1 - corr**2) * steps[j]
    k = mac_ref.apply_rope(u, torch.arange(T))[None, None]  # [1, 1, T, D]
    v = torch.randn(1, 1, T, D, generator=g, dtype=torch.float64)
    return sharp * u[-1], k, v


def reuse_error(q_pre, k, v, lag, band, noise=0.05, seed=0):
    """Relative error of the reused summary at the last position, against full attention."""
    T, D = k.shape[2], k.shape[3]
    t, j = T - 1, T - 1 - lag
    g = torch.Generator().manual_seed(seed)
    q_match = q_pre + noise * torch.randn(D, generator=g, dtype=torch.float64)  # the matched query
    q_t = mac_ref.apply_rope(q_pre, t)[None, None]
    q_j = mac_ref.apply_rope(q_match, j)[None, None]
    P = max(j + 1 - band, 0)
    reused = mac_ref.merge(mac_ref.attend(q_j, k, v, 0, P), mac_ref.attend(q_t, k, v, P, t + 1))
    exact = mac_ref.attend(q_t, k, v, 0, t + 1)
    return ((reused.o - exact.o).norm() / exact.o.norm()).item()


T, D = (1024, 64) if SMALL else (2048, 64)
lags = [1, 2, 4, 8, 16, 32, 64, 128, 256]
bands = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256]
seeds = range(2 if SMALL else 4)
contexts = [related_context(T, D, seed=s) for s in seeds]

start = time.perf_counter()
errors = torch.zeros(len(lags), len(bands))
for i, lag in enumerate(lags):
    for j, band in enumerate(bands):
        errors[i, j] = sum(reuse_error(q, k, v, lag, band, seed=s) for s, (q, k, v) in zip(seeds, contexts)) / len(seeds)
print(f"{len(lags) * len(bands) * len(seeds)} reuse steps in {time.perf_counter() - start:.1f} s")

# %%
fig, ax = plt.subplots(figsize=(7.5, 4.2))
image = ax.imshow(errors.log10(), cmap="magma_r", aspect="auto", origin="lower")
ax.set_xticks(range(len(bands)), bands)
ax.set_yticks(range(len(lags)), lags)
ax.set_xlabel("band r")
ax.set_ylabel("reuse gap Δ = t − j*")
for i in range(len(lags)):
    for j in range(len(bands)):
        ax.text(j, i, f"{errors[i, j]:.0e}", ha="center", va="center", fontsize=6,
                color="white" if errors[i, j] > 0.03 else "black")
fig.colorbar(image, label="log10 relative error vs full attention")
ax.set_title(f"reused summary error (random-walk context, T={T}, D={D})")
plt.show()

# %% [markdown]
# Read the heatmap from the bottom row up. At a **short gap** with **no band** ($r = 0$) the
# error is large: the reused row was computed with the matched query and misses exactly the
# keys just before the boundary, where the current query puts most of its mass (and where
# the RoPE phase difference between the two positions matters). A band of 8–16 keys brings
# it down by two to three orders of magnitude, to the floor set by the difference between
# the two queries (the match `noise`). At a **long gap** the error is small even without a
# band: the lag keys $[j^*, t)$ are always recomputed, and here they already hold the mass.
# A long gap is not free, though: those keys are read at every hit, and the reused prefix
# was attended by an older query.

# %% [markdown]
# ## Part 2: hit rate against τ and window
#
# Hits need a recent query within the radius $(1-\tau)\sqrt{2D}$. `synthetic_stream` makes
# each query, with probability `reuse`, a noisy copy of one up to `max_lag` tokens back.
# The hit rate of a step only depends on the *nearest* candidate in its window, so one
# distance matrix gives the whole (τ, W) grid at once.

# %%
T2, D2, H2 = (1536, 64, 2) if SMALL else (3072, 64, 4)
prefill = T2 // 2
q_pre, k2, v2 = mac_ref.synthetic_stream(1, H2, 1, T2, D2, reuse=0.8, noise=0.25, max_lag=1024, seed=0)
dist = torch.cdist(q_pre[0].double(), q_pre[0].double())  # [H, T, T]
lag = torch.arange(T2)[:, None] - torch.arange(T2)[None, :]  # lag[t, j] = t − j
windows = [16, 32, 64, 128, 256, 512, 1024]
taus = [0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9]
hit_rate = torch.zeros(len(taus), len(windows))
for w_i, W in enumerate(windows):
    in_window = (lag >= 1) & (lag <= W)
    nearest = dist.masked_fill(~in_window, math.inf).min(dim=-1).values[:, prefill:]  # [H, decode steps]
    for t_i, tau in enumerate(taus):
        hit_rate[t_i, w_i] = (nearest**2 < 2 * D2 * (1 - tau) ** 2).float().mean()

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
image = ax1.imshow(hit_rate, cmap="viridis", aspect="auto", origin="lower", vmin=0, vmax=1)
ax1.set_xticks(range(len(windows)), windows)
ax1.set_yticks(range(len(taus)), taus)
ax1.set_xlabel("window W")
ax1.set_ylabel("τ")
for i in range(len(taus)):
    for j in range(len(windows)):
        ax1.text(j, i, f"{hit_rate[i, j]:.2f}", ha="center", va="center", fontsize=7,
                 color="white" if hit_rate[i, j] < 0.5 else "black")
fig.colorbar(image, ax=ax1, label="hit rate")
ax1.set_title("hit rate (reuse 0.8, copies ≤ 1024 back)")
for t_i in (0, 4, 6, 8):
    ax2.semilogx(windows, hit_rate[t_i], "o-", label=f"τ = {taus[t_i]}")
ax2.set_xlabel("window W")
ax2.set_ylabel("hit rate")
ax2.set_title("hit rate against the window")
ax2.legend()
ax2.grid(True, which="both", alpha=0.3)
plt.show()

# %% [markdown]
# Two things to see. Along τ, the hit rate falls off a cliff once the radius drops below
# the typical copy distance (here noise 0.25 per entry: $\approx 0.25\sqrt{D} = 2$, and more for
# copies of copies). Along $W$, it grows with the share of copy sources still inside the
# window. In this stream the sources are spread evenly up to 1024 tokens back, so every
# doubling up to 1024 helps; in real text most sources are recent and the paper sees the
# curve flatten past $W \approx 2048$, while the match scan's cost ($W$ queries per head per
# step) keeps doubling. Exercise 3 shows the plateau.
#
# ## Check: the shortcut agrees with the decode loop
#
# The grid above skipped the decode machinery. Run the real thing for one cell (fewer
# steps, to keep it quick) and compare.

# %%
W_check, tau_check, steps = 256, 0.6, (64 if SMALL else 192)
n = prefill + steps  # the same stream, cut after `steps` decode steps
config = mac_ref.MACConfig(window=W_check, band=16, tau=tau_check)
result = mac_ref.run_stream(q_pre[:, :, :n], k2[:, :, :n], v2[:, :, :n], prefill, config)
in_window = (lag >= 1) & (lag <= W_check)
nearest = dist.masked_fill(~in_window, math.inf).min(dim=-1).values[:, prefill:n]  # [H, steps]
shortcut = nearest**2 < 2 * D2 * (1 - tau_check) ** 2
loop = result.stats.hit[:, 0].T  # [H, steps]
print(f"decode loop hit rate {loop.float().mean():.3f}   distance-matrix shortcut {shortcut.float().mean():.3f}")
print(f"decisions that differ: {(loop != shortcut).sum().item()} of {loop.numel()}")
print(f"KV reads skipped {result.stats.skipped_fraction():.1%} of full attention's")

# %% [markdown]
# ## Exercises
#
# 1. Change `corr` in `related_context` to 0.9 and to 0.995 (shorter and longer memory).
#    How does the band needed to reach the floor move? Relate it to $1/(1 - \text{corr})$.
# 2. Set the match `noise` in `reuse_error` to 0 (an exact repeat). What error is left at
#    $r = 0$, and where does it come from? (Hint: RoPE.)
# 3. Regenerate Part 2's stream with `max_lag=128`. Where does the hit rate stop growing
#    with $W$, and why? Then try `noise=0.05`: which τ now gives the highest hit rate?
# 4. The paper finds shallow layers accept more matches than deep ones. Model two "layers"
#    with `reuse=0.95` and `reuse=0.5` and compare their (τ, W) grids.
# 5. Estimate, with the byte model of the docs' page 1, the window beyond which the match
#    scan costs more bytes than the band and tail it lets you skip.
