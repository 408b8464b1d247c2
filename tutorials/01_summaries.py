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
# # 1. Attention summaries, ⊕ and ⊖ hands-on
#
# MAC-Attention never stores attention *outputs*; it stores **summaries** $(o, \ell)$ that can
# be glued together (⊕) and taken apart (⊖). In this notebook you build summaries from raw
# scores, check the algebra numerically, reproduce the classic NaN bug of the textbook merge
# formula, and measure how badly ⊖ behaves when the removed part holds almost all the mass.
#
# Everything runs on the CPU in a few seconds.

# %%
import math
import os

import matplotlib.pyplot as plt
import torch

import mac_ref

SMALL = os.environ.get("MAC_TUTORIAL_SIZE", "full") == "small"  # CI knob: smaller sweeps
torch.set_printoptions(precision=4, sci_mode=False)
gen = torch.Generator().manual_seed(0)

# %% [markdown]
# ## A summary from first principles
#
# For a query $q$ and keys $[a, b)$: $s_j = q \cdot k_j / \sqrt D$,
# $\ell = \log \sum_j e^{s_j}$ and $o = \sum_j e^{s_j - \ell} v_j$.
# Shapes follow the project's layout: queries `[B, Hq, D]`, cache `[B, Hkv, T, D]`.

# %%
B, Hq, Hkv, T, D = 1, 2, 1, 48, 16
q = torch.randn(B, Hq, D, generator=gen, dtype=torch.float64)
k = torch.randn(B, Hkv, T, D, generator=gen, dtype=torch.float64)
v = torch.randn(B, Hkv, T, D, generator=gen, dtype=torch.float64)

a, b = 10, 30
scores = (q[0] @ k[0, 0, a:b].T) / math.sqrt(D)  # [Hq, b - a]
lse_by_hand = torch.logsumexp(scores, dim=-1)
o_by_hand = torch.softmax(scores, dim=-1) @ v[0, 0, a:b]

s = mac_ref.attend(q, k, v, a, b)
print("lse by hand:", lse_by_hand)
print("mac_ref    :", s.lse[0])
print("max |o difference|:", (s.o[0] - o_by_hand).abs().max().item())

# %% [markdown]
# ## ⊕: any split, any order
#
# Cut the keys into segments, summarise each, merge them in two different orders. Both
# must equal the summary of all the keys (float64 here, so to ~1e-15).

# %%
cuts = [0, 7, 19, 20, 41, T]
parts = [mac_ref.attend(q, k, v, lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:])]
whole = mac_ref.attend(q, k, v, 0, T)

left_to_right = parts[0]
for p in parts[1:]:
    left_to_right = mac_ref.merge(left_to_right, p)
right_to_left = parts[-1]
for p in reversed(parts[:-1]):
    right_to_left = mac_ref.merge(p, right_to_left)
stacked = mac_ref.merge_all(torch.stack([p.o for p in parts], dim=-2), torch.stack([p.lse for p in parts], dim=-1))

for name, s in [("left to right", left_to_right), ("right to left", right_to_left), ("merge_all", stacked)]:
    print(f"{name:14s} max |Δo| = {(s.o - whole.o).abs().max().item():.1e}   |Δlse| = {(s.lse - whole.lse).abs().max().item():.1e}")

# %% [markdown]
# ## The empty summary and the NaN bug
#
# The textbook merge shifts by $m = \max(\ell_a, \ell_b)$. With two *empty* summaries
# $(0, -\infty)$ it computes $(-\infty) - (-\infty)$: NaN. Empty summaries are everywhere in MAC
# (a band of length 0 early in a stream, a row of a token with $t < r$), so the contract is
# that $(0, -\infty) \oplus (0, -\infty) = (0, -\infty)$.


# %%
def naive_merge(x, y):
    m = torch.maximum(x.lse, y.lse)
    w_x, w_y = torch.exp(x.lse - m), torch.exp(y.lse - m)
    lse = m + torch.log(w_x + w_y)
    o = (w_x[..., None] * x.o + w_y[..., None] * y.o) / (w_x + w_y)[..., None]
    return mac_ref.Summary(o, lse)


empty = mac_ref.empty_summary((1, 2), D, dtype=torch.float64)
print("naive  empty ⊕ empty:", naive_merge(empty, empty).lse.tolist(), "o has NaN:", naive_merge(empty, empty).o.isnan().any().item())
print("mac_ref empty ⊕ empty:", mac_ref.merge(empty, empty).lse.tolist(), "o has NaN:", mac_ref.merge(empty, empty).o.isnan().any().item())
print("identity: max |(s ⊕ empty) − s| =", (mac_ref.merge(whole, empty).o - whole.o).abs().max().item())

# %% [markdown]
# ## ⊖: removing keys, and its conditioning
#
# $(o_a, \ell_a) \ominus (o_b, \ell_b)$ with $\delta = \ell_b - \ell_a$ undoes a merge. The share of the
# mass that is removed is $e^\delta$; the result's error grows like $\varepsilon / (1 - e^\delta)$.

# %%
head, tail = mac_ref.attend(q, k, v, 0, 40), mac_ref.attend(q, k, v, 40, T)
rest, flagged = mac_ref.remove(whole, tail)
print("removed share e^δ:", torch.exp(tail.lse - whole.lse)[0])
print("max |(whole ⊖ tail) − head| =", (rest.o - head.o).abs().max().item(), " flagged:", flagged.tolist())

# %% [markdown]
# Now sweep the removed share towards 1. We build $a \oplus b$ exactly (float64), round the
# stored state to a working dtype (LSE kept in float32, as the rings do), remove $b$ and
# compare with $a$.


# %%
def removal_error(remaining, dtype, rows=512, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    o_a, o_b = torch.randn(2, rows, dim, generator=g, dtype=torch.float64)
    lse_a = torch.zeros(rows, dtype=torch.float64)
    lse_b = lse_a + math.log((1 - remaining) / remaining)  # b holds 1 - remaining of the mass
    a, b = mac_ref.Summary(o_a, lse_a), mac_ref.Summary(o_b, lse_b)
    total = mac_ref.merge(a, b)

    def stored(x):
        return mac_ref.Summary(x.o.to(dtype).float(), x.lse.float())

    r, flag = mac_ref.remove(stored(total), stored(b))
    err = ((r.o.double() - o_a).norm(dim=-1) / o_a.norm(dim=-1)).median().item()
    return err, flag.float().mean().item()


remaining = torch.logspace(-0.3, -6, 12 if SMALL else 24).tolist()
plt.figure(figsize=(6.5, 4))
for dtype, color in [(torch.float32, "C0"), (torch.float16, "C2"), (torch.bfloat16, "C3")]:
    errs = [removal_error(x, dtype)[0] for x in remaining]
    eps = torch.finfo(dtype).eps
    plt.loglog(remaining, errs, "o-", ms=3, color=color, label=f"stored in {str(dtype)[6:]}")
    plt.loglog(remaining, [eps / x for x in remaining], "--", color=color, alpha=0.5)
plt.gca().invert_xaxis()
plt.xlabel("remaining share 1 − e^δ")
plt.ylabel("median relative error")
plt.title("(a ⊕ b) ⊖ b vs a; dashed: ε / (1 − e^δ)")
plt.legend()
plt.grid(True, which="both", alpha=0.3)
plt.show()

# %% [markdown]
# Where the remainder is below `removal_epsilon` (8 float32 ulps) the reference gives up
# and returns the empty summary, flagged: the remainder is indistinguishable from rounding
# noise, and its weight wherever it is merged later is just as tiny.

# %%
for x in (1e-3, 1e-6, 1e-7, 1e-8):
    err, flagged_share = removal_error(x, torch.float32)
    print(f"remaining {x:.0e}: error {err:.1e}, flagged {flagged_share:.0%}  (removal_epsilon = {mac_ref.removal_epsilon(torch.float32):.1e})")

# %% [markdown]
# ## Exercises
#
# 1. Write ⊕ in the $(S, Z)$ form (un-normalised numerator and normaliser, no logs) and find
#    scores for which it overflows float32 while `mac_ref.merge` does not.
# 2. Prove that ⊕ is associative from its log form. Which line of `mac_ref.merge` makes the
#    proof hold for empty summaries too?
# 3. Does `naive_merge` also fail when only *one* input is empty? Try it and explain the
#    result.
# 4. In the sweep, bf16 reaches an error of 1 (pure noise) at which removed share? Relate it
#    to `torch.finfo(torch.bfloat16).eps`.
# 5. Compute ⊖ with `log1p(-exp(δ))` instead of `log(-expm1(δ))` for $\delta$ near 0 and near
#    $-\infty$. Which is better where, and why does the reference use `expm1`?
