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
# # 4. The Triton kernels next to the reference
#
# `mac_triton` has the same functions, signatures and state layout as `mac_ref`: ⊕ / ⊖ over
# rows, the match scan, the split-KV amend + complete, and the fused decode step. This
# notebook feeds both the same inputs and compares them stage by stage.
#
# **Where it runs.** On a machine with a CUDA GPU the kernels are compiled and the last
# section times them. Without one, `TRITON_INTERPRET=1` runs every kernel on the CPU through
# numpy: correct semantics, about a second per kernel launch, so the shapes here are tiny.
# The variable must be set *before* `mac_triton` is imported (the interpreter is chosen when
# a kernel is decorated).

# %%
import os
import time
import warnings

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # the interpreter evaluates -inf paths through numpy, which warns about log(0)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")

import matplotlib.pyplot as plt  # noqa: E402

import mac_ref  # noqa: E402
import mac_triton  # noqa: E402

SMALL = os.environ.get("MAC_TUTORIAL_SIZE", "full") == "small"  # CI knob: fewer decode steps
device = "cuda" if ON_GPU else "cpu"
print("device:", torch.cuda.get_device_name() if ON_GPU else "CPU, Triton interpreter")
gen = torch.Generator().manual_seed(0)

# %% [markdown]
# ## ⊕ and ⊖ over rows
#
# The kernels take summaries of any leading shape, with `o [..., D]` and `lse [...]`. We mix
# in empty summaries (LSE $-\infty$) on purpose: the kernels must keep the
# $(0, -\infty) \oplus (0, -\infty) = (0, -\infty)$ contract.


# %%
def random_summary(rows, dim, empty_share=0.25):
    o = torch.randn(rows, dim, generator=gen)
    lse = 3 * torch.randn(rows, generator=gen)
    empty = torch.rand(rows, generator=gen) < empty_share
    return mac_ref.Summary(o.masked_fill(empty[:, None], 0.0).to(device), lse.masked_fill(empty, -float("inf")).to(device))


a, b = random_summary(64, 32), random_summary(64, 32)
ref = mac_ref.merge(a, b)
tri = mac_triton.merge(a, b)
print("⊕  max |Δo| =", (ref.o - tri.o).abs().max().item(), "  LSEs equal where empty:",
      torch.equal(ref.lse.isinf(), tri.lse.isinf()), "  NaN:", tri.o.isnan().any().item())

# ⊖ amplifies rounding by 1 / (1 − removed share): compare on well-conditioned rows, then look
# at the conditioning of each row
total = mac_ref.merge(a, b)
(ref_rest, ref_flag), (tri_rest, tri_flag) = mac_ref.remove(total, b), mac_triton.remove(total, b)
removed_share = torch.exp(b.lse - total.lse).nan_to_num(0.0)  # e^δ, 0 for empty parts
ok = removed_share < 0.9
print("⊖  max |Δo| where the removed share < 0.9:", (ref_rest.o - tri_rest.o)[ok].abs().max().item(),
      "  same flags:", torch.equal(ref_flag, tri_flag))
worst = (removed_share * (~ref_flag)).argmax()
print(f"   worst row: removed share {removed_share[worst]:.6f}, |Δo| = {(ref_rest.o - tri_rest.o)[worst].abs().max():.1e}"
      " (the conditioning at work, see tutorial 1)")

# %% [markdown]
# ## Match
#
# The kernel scans the ring in tiles and folds, per head, the pair (distance, lag) into one
# 64-bit key with an atomic minimum, so the result does not depend on the order in which
# programs finish: ties go to the smallest lag, as in the reference.

# %%
B, Hq, D, W = 2, 4, 32, 64
config = mac_ref.MACConfig(window=W, band=8, tau=0.5)
state = mac_ref.new_state(B, Hq, D, config, device=device)
state.ring_q.copy_(torch.randn(B, Hq, W, D, generator=gen))
positions = torch.tensor([40, 200], device=device)  # request 0 has only 40 candidates
q_now = state.ring_q[:, :, 7] + 0.05 * torch.randn(B, Hq, D, generator=gen).to(device)  # near slot 7
state.ring_q[0, 1, 3] = state.ring_q[0, 1, 7]  # an exact tie for head 1 of request 0

ref_match, tri_match = mac_ref.find_match(q_now, state, positions, config), mac_triton.find_match(q_now, state, positions, config)
print("j* (reference):\n", ref_match.matched_pos)
print("same j*:", torch.equal(ref_match.matched_pos, tri_match.matched_pos), " same hits:", torch.equal(ref_match.hit, tri_match.hit))
print("max |Δ distance| =", (ref_match.distance - tri_match.distance).abs().max().item())

# %% [markdown]
# ## The whole decode step, along a stream
#
# `run_stream` takes the step function as an argument: the same prefill, the same state,
# the reference step or the fused Triton step (a few kernel launches per step: the match
# scan, then split-KV attention, then the reduction that also writes the ring). The two must make the same decisions (hit, $j^*$) and agree
# on the outputs to float32 rounding.

# %%
steps = 4 if SMALL else 12
T, prefill = 128 + steps, 128
q_pre, k, v = mac_ref.synthetic_stream(1, 4, 2, T, 32, reuse=0.9, seed=0)
q_pre, k, v = q_pre.to(device), k.to(device), v.to(device)
config = mac_ref.MACConfig(window=32, band=8)

start = time.perf_counter()
ref_run = mac_ref.run_stream(q_pre, k, v, prefill, config)
ref_s = time.perf_counter() - start
start = time.perf_counter()
tri_run = mac_ref.run_stream(q_pre, k, v, prefill, config, step_fn=mac_triton.decode_step)
tri_s = time.perf_counter() - start

diff = (ref_run.out[:, :, prefill:] - tri_run.out[:, :, prefill:]).abs().amax(dim=(0, 1, 3))  # per step
print(f"{steps} steps: reference {ref_s:.2f} s, Triton {tri_s:.2f} s ({'GPU' if ON_GPU else 'interpreter'})")
print("same hits:", torch.equal(ref_run.stats.hit, tri_run.stats.hit),
      " same j*:", torch.equal(ref_run.stats.matched_pos, tri_run.stats.matched_pos),
      f" hit rate {tri_run.stats.hit_rate:.2f}")
print("max |Δout| per step:", [f"{x:.1e}" for x in diff.tolist()])
bound = 1e-5  # the float32 row of tests/tolerances.py for mac_triton against mac_ref
print("verdict:", "agree within 1e-5" if diff.max() <= bound
      else f"DISAGREE from decode step {int((diff > bound).nonzero()[0])} on: a kernel bug to report")

# %% [markdown]
# ## Speed (GPU only)
#
# On a GPU we time one decode step for a batch of long contexts: the fused MAC step at a
# 100 % hit rate (every ring planted with a copy of the query 64 tokens back), the same
# kernels as full attention (`mac_triton.full_decode`), and torch's SDPA. Each is timed as
# a CUDA-graph replay, as `benchmarks/bench_decode.py` does: a step is a few small kernel
# launches, and without graphs the Python and launch overhead (about 0.2 ms) would hide
# the attention itself. On the CPU the cell only reports what it would do: interpreter
# timings say nothing about a GPU.

# %%
if ON_GPU:
    import triton

    B, Hq, Hkv, D, W, r = 4, 32, 8, 128, 1024, 256
    config = mac_ref.MACConfig(window=W, band=r, tau=0.45)
    contexts = [4096, 16384, 65536]
    times = {"MAC all-hit": [], "full (same kernels)": [], "torch SDPA": []}
    for N in contexts:
        k = torch.randn(B, Hkv, N, D, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        positions = torch.full((B,), N - 1, device=device)
        q_pre = torch.randn(B, Hq, D, device=device, dtype=torch.bfloat16)
        q_post = mac_ref.apply_rope(q_pre, positions[:, None])
        state = mac_ref.new_state(B, Hq, D, config, dtype=torch.bfloat16, device=device)
        state.ring_q.normal_()
        slot = (N - 1 - 64) % W
        state.ring_q[:, :, slot] = q_pre  # plant a hit 64 tokens back
        state.ring_lse.zero_()
        scale = config.softmax_scale(D)

        # each replay writes this step's row into slot (N-1) mod W; that slot is a candidate
        # at lag W for the next replay, at the same distance 0 as the planted one, so the tie
        # goes to the planted (more recent) match and every replay is the same all-hit step
        workspace = mac_triton.DecodeWorkspace.new(config, B, Hq, D, device)  # the step's match keys, kept between replays
        mac = lambda: mac_triton.mac_step(q_pre, q_post, k, v, state, positions, config, scale, workspace)  # noqa: E731
        full = lambda: mac_triton.full_step(q_post, k, v, positions)  # noqa: E731  (full_decode's kernels: no checks, no sync)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q_post[:, :, None], k, v, enable_gqa=True)  # noqa: E731
        for name, fn in (("MAC all-hit", mac), ("full (same kernels)", full), ("torch SDPA", sdpa)):
            fn()  # compile outside the graph
            times[name].append(triton.testing.do_bench_cudagraph(fn) * 1e3)
        print(f"N = {N}: hit share of the timed MAC step {mac()[2].hit.float().mean().item():.2f}")
    for name, values in times.items():
        plt.loglog(contexts, values, "o-", label=name)
        print(f"{name:22s}", " ".join(f"{x:8.1f} µs" for x in values))
    plt.xlabel("context N")
    plt.ylabel("µs per step (median of CUDA-graph replays)")
    plt.title(f"{torch.cuda.get_device_name()}: B={B}, Hq={Hq}, Hkv={Hkv}, D={D}, bf16")
    plt.legend()
    plt.show()
else:
    print("No GPU: skipping the timings. On a CUDA machine this cell times the MAC step, full decoding and SDPA.")

# %% [markdown]
# The interpreter is for *correctness*, not speed: here is how its time grows with the
# number of keys (each launch runs its programs one after another in numpy).

# %%
sizes = [64, 256] if SMALL else [64, 256, 1024]
seconds = []
for N in sizes:
    qn = torch.randn(1, 4, 32, generator=gen).to(device)
    kn, vn = torch.randn(2, 1, 2, N, 32, generator=gen).to(device)
    start = time.perf_counter()
    mac_triton.full_decode(qn, kn, vn, torch.tensor([N - 1], device=device))
    if ON_GPU:
        torch.cuda.synchronize()
    seconds.append(time.perf_counter() - start)
plt.figure(figsize=(5, 3))
plt.loglog(sizes, seconds, "o-")
plt.xlabel("keys")
plt.ylabel("seconds per call (first call includes compilation)" if ON_GPU else "seconds per call (interpreter)")
plt.grid(True, which="both", alpha=0.3)
plt.show()

# %% [markdown]
# ## Exercises
#
# 1. Make the tie in the match section exact for *every* head and check that both
#    implementations still pick the most recent slot.
# 2. Run the stream with `row_update="subtract"` in the config. Do the two paths still agree?
#    Which kernel computes the subtraction?
# 3. On a GPU: switch the inputs to `torch.bfloat16` and compare with the reference run on the
#    same bf16 inputs. Which tolerance row of `tests/tolerances.py` applies?
# 4. On a GPU: lower the hit rate by planting hits in only half of the heads. How does the
#    MAC step's time move between the all-hit and the full-attention curves, and why does the
#    GQA grouping of the misses matter?
# 5. Read the planning code of `mac_triton/plan.py`: how is the chunk size chosen, and what would
#    happen to a batch with one miss at 64K and fifteen hits if it were fixed instead?
