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
# # 2. One decode step, stage by stage
#
# `mac_ref.decode_step` is a few stages: **match**, the rule's **accept** (the paper's rule
# accepts every candidate of the match), **amend**, **complete**, **row update**.
# Here we call the stages one by one on a toy stream small enough to print: a ring of
# $W = 8$ slots, a band of $r = 4$ keys, one query head. You will see the ring's contents,
# the candidate distances, the three key ranges, the summaries, and the check that a miss
# is exactly full attention while a hit is close to it.

# %%
import math

import matplotlib.pyplot as plt
import torch

import mac_ref

torch.set_printoptions(precision=3, sci_mode=False, linewidth=120)

# %% [markdown]
# ## A toy stream with a repeat
#
# 48 tokens, pre-RoPE queries of dimension 16. Token 36 repeats token 33 (plus a little
# noise), so the step at $t = 36$ should find it; token 44 repeats token 42. Keys are
# RoPE-rotated, as in a model.

# %%
B, Hq, Hkv, T, D = 1, 1, 1, 48, 16
config = mac_ref.MACConfig(window=8, band=4, tau=0.5)
gen = torch.Generator().manual_seed(0)
q_pre = torch.randn(B, Hq, T, D, generator=gen, dtype=torch.float64)
q_pre[..., 36, :] = q_pre[..., 33, :] + 0.05 * torch.randn(D, generator=gen, dtype=torch.float64)
q_pre[..., 44, :] = q_pre[..., 42, :] + 0.05 * torch.randn(D, generator=gen, dtype=torch.float64)
k = mac_ref.apply_rope(torch.randn(B, Hkv, T, D, generator=gen, dtype=torch.float64), torch.arange(T))
v = torch.randn(B, Hkv, T, D, generator=gen, dtype=torch.float64)
print(config)
print(f"hit radius: {math.sqrt(config.hit_radius_sq(D)):.2f}  (random pair ≈ √(2D) = {math.sqrt(2 * D):.2f})")

# %% [markdown]
# ## Prefill, and the ring it seeds
#
# Prefill of the first 36 tokens is plain causal attention. The rows of the last $W$ prompt
# tokens are seeded exactly: $R_j = A(q_j, [0, E(j)))$ with $E(j) = \max(j + 1 - r, 0)$.


# %%
def show_ring(state, t):
    """Which token each slot holds when the next step is at position t, and its row's LSE."""
    W = state.window
    for slot in range(W):
        token = t - 1 - ((t - 1 - slot) % W)
        print(f"slot {slot}: token {token:2d}  covers keys [0, {max(token + 1 - config.band, 0):2d})  "
              f"lse {state.ring_lse[0, 0, slot].item():7.3f}")


prompt = 36
_, _, state = mac_ref.prefill(q_pre[:, :, :prompt], k, v, prompt, config)
t = int(state.next_pos[0])
print("next position t =", t)
show_ring(state, t)

# %% [markdown]
# ## Stage 1: match
#
# Distances from $\tilde q_t$ to the candidates $j \in [t - W, t)$; the nearest one is $j^*$.

# %%
positions = state.next_pos.clone()  # [B]
q_t = q_pre[:, :, t]  # [B, Hq, D]
for j in range(t - config.window, t):
    d = (q_t[0, 0] - q_pre[0, 0, j]).norm().item()
    print(f"j = {j}: ‖q̃_t − q̃_j‖ = {d:6.2f}")
result = mac_ref.find_match(q_t, state, positions, config)
print(f"\nj* = {result.matched_pos.item()}, distance {result.distance.sqrt().item():.3f}, hit = {result.hit.item()}")

# %% [markdown]
# ## Stage 2: the ranges, and amend
#
# $N = E(t)$; on a hit $P = E(j^*)$. The reused row covers $[0, P)$, the band $[P, N)$ is
# recomputed with the current query, the tail $[N, t+1)$ comes next.

# %%
spans = mac_ref.step_spans(positions, result, config)
P, N, end = spans.band_start.item(), spans.band_end.item(), spans.tail_end.item()
print(f"reused row: [0, {P})   band: [{P}, {N})   tail: [{N}, {end})")
print("keys read:", spans.keys_read().item(), "of", t + 1)

q_post = mac_ref.apply_rope(q_t, positions[:, None])
scale = config.softmax_scale(D)
C = mac_ref.amend_row(q_post, k, v, state, result, spans, scale)
row = state.rows(result.matched_pos)
print("\nR_j* (reused) lse:", row.lse.item())
print("band            lse:", mac_ref.attend(q_post, k, v, P, N).lse.item())
print("C = R_j* ⊕ band lse:", C.lse.item())

# %% [markdown]
# ## Stage 3: complete, and how close the hit is
#
# $\text{out} = C \oplus A(q_t, [N, t+1))$ (no sinks here). `edge_summaries` attends the
# sinks and the tail (the same whatever the step decides, so a step computes them once);
# `complete_output` merges them with $C$ and keeps the fresh part beside the output,
# $A(q_t, [N, t+1))$, which the `subtract` row rule needs. Full
# attention for comparison:
# $A(q_t, [0, t+1))$, and the *exact* $C$ that the reused row approximates.

# %%
sinks, tail = mac_ref.edge_summaries(q_post, k, v, spans, scale)
completion = mac_ref.complete_output(C, sinks, tail)
out = completion.out
full = mac_ref.attend(q_post, k, v, 0, t + 1)
exact_C = mac_ref.attend(q_post, k, v, 0, N)
print("out  lse:", out.lse.item(), "  full attention lse:", full.lse.item())
print("relative error of out:", ((out.o - full.o).norm() / full.o.norm()).item())
print("relative error of C  :", ((C.o - exact_C.o).norm() / exact_C.o.norm()).item())

# %% [markdown]
# A large error! This toy has *random* keys: the softmax mass is spread over the whole
# prefix instead of sitting near the cursor, and the reused row was computed with the query
# rotated to position 33, whose RoPE phase against every old key differs from position
# 36's. Real text concentrates attention near the cursor, where the band recomputes it
# exactly ([Amend](../../amend/)); tutorial 3 measures error against band and lag.

# %% [markdown]
# ## Stage 4: the row update
#
# Token $t$ writes $(\tilde q_t, R_t)$ into slot $t \bmod W$, evicting token $t - W$. With the
# `split` rule $R_t = C$; with `subtract`, $R_t = \text{out} \ominus \text{tail}$. Same row.
# The slot also keeps the row's *chain depth*: how many reuses lie behind it (the matched
# row's depth plus one on a hit, 0 on a miss), which `MACConfig.max_chain` can bound.

# %%
row_split, _ = mac_ref.update_row(completion, config)
row_subtract, flagged = mac_ref.update_row(completion, mac_ref.MACConfig(window=8, band=4, row_update="subtract"))
print("split vs subtract: max |Δo| =", (row_split.o - row_subtract.o).abs().max().item(), " flagged:", flagged.item())
depth = torch.where(result.hit, state.depths(result.matched_pos.clamp(min=0)) + 1, 0)
print("chain depth of the new row:", depth.tolist())
state.write(positions, q_t, row_split, depth)
state.advance(positions)
show_ring(state, t + 1)

# %% [markdown]
# ## The same, for the rest of the stream
#
# `decode_step` runs the four stages; we print the statistics it returns for each step.
# Misses read everything and are exact; hits read the band and tail only.

# %%
ref_post = mac_ref.apply_rope(q_pre, torch.arange(T))
ref_o, _ = mac_ref.causal_attention(ref_post, k, v)
print(" t | hit | j* | band start P | N  | keys read | full | rel. error")
history = []
while int(state.next_pos[0]) < T:
    pos = state.next_pos.clone()
    o, lse, stats = mac_ref.decode_step(q_pre[:, :, pos[0]], k, v, state, pos, config)
    tt = int(pos[0])
    err = ((o[0, 0] - ref_o[0, 0, tt]).norm() / ref_o[0, 0, tt].norm()).item()
    j = int(stats.matched_pos)
    band_start = max(j + 1 - config.band, 0) if stats.hit else 0
    history.append((tt, bool(stats.hit), band_start, max(tt + 1 - config.band, 0)))
    print(f"{tt:2d} | {int(stats.hit):3d} | {j:2d} | {band_start:12d} | {history[-1][3]:2d} | {int(stats.keys_read):9d} | {tt + 1:4d} | {err:.1e}")

# %% [markdown]
# Each bar below is one step: grey keys come from the reused row (never read), orange the
# band (on a miss, the whole prefix $[0, N)$), blue the tail.

# %%
fig, ax = plt.subplots(figsize=(7, 2.2))
for row_i, (tt, hit, P_, N_) in enumerate(history):
    if hit:
        ax.barh(row_i, P_, color="#bab0ac", hatch="//")
    ax.barh(row_i, N_ - P_, left=P_, color="#f28e2b")
    ax.barh(row_i, tt + 1 - N_, left=N_, color="#4e79a7")
ax.set_yticks(range(len(history)), [f"t={h[0]}" + (" hit" if h[1] else " miss") for h in history])
ax.set_xlabel("key position")
plt.show()

# %% [markdown]
# ## Exercises
#
# 1. Set `tau=1.0`: every step misses. Check that every relative error is at float64
#    rounding level (a miss is exactly full attention).
# 2. Set `band=40` (≥ t + 1): what are the ranges, and why is a "hit" now exact too?
# 3. Make token 38 a copy of token 36 (itself a copy of 33). The row of 36 was built on
#    the reused row of 33: follow how the error chains, and what a miss in between changes.
# 4. Shrink the window to 2. Token 36 can no longer see token 33: what does it match, and
#    is it a hit?
# 5. Give the stream a second query head (`Hq = 2`, `Hkv = 1`) whose queries never repeat.
#    Check that the two heads of the GQA group take different paths in the same step.
