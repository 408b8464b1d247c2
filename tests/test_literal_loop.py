"""The decode recurrence of the spec (docs/spec.md#spec-decode-step), written again as
literally as possible, against ``mac_ref``.

:func:`literal_stream` uses Python floats and loops only: no tensors, no ``mac_ref``
internals. It follows the spec line by line (match with most-recent tie-break and
``min_context`` and ``max_chain``, per head or shared by a KV group, the acceptance rules with ``w`` and their group-aware
variant, amend, complete, sinks, both row rules, exact prefill seeding, chain depths), so
a disagreement points at one side or the other rather than at a shared helper.
"""

import math

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from mac_ref import MACConfig, MassRule, PaperRule, run_stream, synthetic_stream
from tolerances import tolerance

NEG_INF = -math.inf


def literal_rope(x: list[float], position: int, base: float) -> list[float]:
    """Rotate-half RoPE: pair ``(x_i, x_{i+D/2})`` turns by ``position · base^(−2i/D)``."""
    half = len(x) // 2
    out = [0.0] * len(x)
    for i in range(half):
        angle = position * base ** (-2.0 * i / len(x))
        c, s = math.cos(angle), math.sin(angle)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


def literal_attend(q, keys, values, a: int, b: int, scale: float):
    """``A(q, [a, b))`` as ``(o, lse)``; ``([0…], −inf)`` when the range is empty."""
    D = len(q)
    if b <= a:
        return [0.0] * D, NEG_INF
    scores = []
    for j in range(a, b):
        dot = 0.0
        for i in range(D):
            dot += q[i] * keys[j][i]
        scores.append(scale * dot)
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    o = [sum(w * values[a + n][i] for n, w in enumerate(weights)) / total for i in range(D)]
    return o, top + math.log(total)


def literal_merge(x, y):
    """⊕ with the empty summary as identity."""
    (o_x, l_x), (o_y, l_y) = x, y
    if l_x == NEG_INF:
        return y
    if l_y == NEG_INF:
        return x
    top = max(l_x, l_y)
    lse = top + math.log(math.exp(l_x - top) + math.exp(l_y - top))
    w_x, w_y = math.exp(l_x - lse), math.exp(l_y - lse)
    return [w_x * a + w_y * b for a, b in zip(o_x, o_y)], lse


# The documented ⊖ epsilon: a remainder share below 8 ulps of float64 is empty.
REMOVAL_EPSILON = 8 * 2.0**-52


def literal_remove(total, part):
    """⊖ and its flag: ``(remainder, ill_conditioned)`` (docs/spec.md#spec-remove)."""
    (o_t, l_t), (o_p, l_p) = total, part
    empty = ([0.0] * len(o_t), NEG_INF)
    if l_p == NEG_INF:
        return total, False
    if l_t == NEG_INF:
        return empty, True
    delta = l_p - l_t
    if delta > 0:
        return empty, True
    share = -math.expm1(delta)
    if share < REMOVAL_EPSILON:
        return empty, True
    kept = math.exp(delta)
    return ([(a - kept * b) / share for a, b in zip(o_t, o_p)], l_t + math.log(share)), False


def literal_decision(config: MACConfig, D: int, s_h: float, candidate: bool, d: float, row_lse: float, fresh_lse: float):
    """The acceptance rule of one head, and ``w``: ``(hit, w)``.

    ``w = e^{ℓ_row} / (e^{ℓ_row} + e^{ℓ_fresh})`` (0 without a candidate); the paper's rule
    takes every candidate, the mass rule those with ``sqrt(d / 2D) · w / s_h < 1 − τ_m``
    (written squared, as the rule states it)."""
    if not candidate:
        return False, 0.0
    w = 0.0 if row_lse == NEG_INF else 1.0 / (1.0 + math.exp(fresh_lse - row_lse))
    if config.rule.name == "paper":
        return True, w
    tau_m = config.rule.tau_m
    return tau_m < 1 and d * w * w < 2.0 * D * (1.0 - tau_m) ** 2 * s_h**2, w


def literal_stream(q_pre, k, v, prompt_lengths, config: MACConfig):
    """Prefill then decode, one request at a time, its query heads side by side, with nested
    lists of floats.

    Returns ``{(b, h, t): dict(o, lse, hit, matched_pos, distance, keys_read, ill, depth,
    candidate, w)}`` for every decoded position, ``{(b, h, t): (o, lse)}`` for prefill
    positions, and the final rows ``{(b, h, j): (o, lse)}`` of the last ``W`` tokens.
    """
    B, Hq, T, D = len(q_pre), len(q_pre[0]), len(q_pre[0][0]), len(q_pre[0][0][0])
    group = Hq // len(k[0])
    W, r, F, tau = config.window, config.band, config.sinks, config.tau
    scale = 1.0 / math.sqrt(D) if config.scale is None else config.scale
    scales = config.radius_scale or (1.0,) * Hq  # per-head radius factors s_h
    steps = T - max(prompt_lengths)

    def E(t):  # the end of what token t's row covers
        return max(t + 1 - r, 0)

    decoded, prefilled, final_rows = {}, {}, {}
    for b in range(B):
        n = prompt_lengths[b]
        keys = [k[b][h // group] for h in range(Hq)]
        values = [v[b][h // group] for h in range(Hq)]
        q_post = [[literal_rope(q_pre[b][h][t], t, config.rope_base) for t in range(T)] for h in range(Hq)]
        rows = [{} for _ in range(Hq)]  # per head: token j -> its row R_j
        depth = [{} for _ in range(Hq)]  # per head: token j -> reuse links behind R_j (0: exact)
        for h in range(Hq):
            for t in range(n):
                prefilled[(b, h, t)] = literal_attend(q_post[h][t], keys[h], values[h], 0, t + 1, scale)
                if t >= n - W:
                    rows[h][t] = literal_attend(q_post[h][t], keys[h], values[h], min(F, E(t)), E(t), scale)
                    depth[h][t] = 0
        for t in range(n, n + steps):
            N = E(t)
            S = min(F, N)
            found = []

            def distance(h, j):  # d_j of head h; inf for a row at the end of a reuse chain of max_chain links
                if config.max_chain is not None and depth[h][j] >= config.max_chain:
                    return math.inf
                return sum((x - y) ** 2 for x, y in zip(q_pre[b][h][t], q_pre[b][h][j]))

            for h in range(Hq):
                # 1. match: nearest of the last W queries, ties to the most recent; rows at the end
                #    of a reuse chain are no candidates. A group match: the group's heads share the
                #    row nearest in the sum of their distances; each keeps its own distance to it.
                heads = range(h - h % group, h - h % group + group) if config.group_match else [h]
                best_j, best_sum = -1, math.inf
                for j in range(t - 1, max(0, t - W) - 1, -1):
                    total = sum(distance(g, j) for g in heads)
                    if total < best_sum:
                        best_j, best_sum = j, total
                best_d = distance(h, best_j) if best_j >= 0 else math.inf
                radius_sq = 2.0 * D * (1.0 - tau) ** 2 * scales[h] ** 2  # only used when tau < 1
                candidate = best_j >= 0 and t >= config.min_context and tau < 1 and best_d < radius_sq
                # 2. the rule: what the reused row would carry against the fresh keys [0, S) and [P, t+1)
                P = max(E(best_j), S) if candidate else S
                fresh = literal_merge(literal_attend(q_post[h][t], keys[h], values[h], 0, S, scale),
                                      literal_attend(q_post[h][t], keys[h], values[h], P, t + 1, scale))
                row_lse = rows[h][best_j][1] if candidate else NEG_INF
                hit, w = literal_decision(config, D, scales[h], candidate, best_d, row_lse, fresh[1])
                found.append(dict(j=best_j, d=best_d, candidate=candidate, hit=hit, w=w))
            if config.rule.per_group:  # a group reuses only if each of its heads would
                for g in range(Hq // group):
                    heads = range(g * group, (g + 1) * group)
                    together = all(found[h]["hit"] for h in heads)
                    measured = all(found[h]["candidate"] for h in heads)  # else the group misses whole, unmeasured
                    for h in heads:
                        found[h]["hit"] = found[h]["hit"] and together
                        found[h]["w"] = found[h]["w"] if measured else 0.0
            for h in range(Hq):
                best_j, hit = found[h]["j"], found[h]["hit"]
                # 3. amend + complete
                sinks = literal_attend(q_post[h][t], keys[h], values[h], 0, S, scale)
                tail = literal_attend(q_post[h][t], keys[h], values[h], N, t + 1, scale)
                if hit:
                    band_start = max(E(best_j), S)
                    cached = literal_merge(rows[h][best_j], literal_attend(q_post[h][t], keys[h], values[h], band_start, N, scale))
                else:
                    band_start = S
                    cached = literal_attend(q_post[h][t], keys[h], values[h], S, N, scale)
                out = literal_merge(literal_merge(sinks, cached), tail)
                # 4. row update
                if config.row_update == "split":
                    rows[h][t], ill = cached, False
                else:
                    rows[h][t], ill = literal_remove(out, literal_merge(sinks, tail))
                depth[h][t] = depth[h][best_j] + 1 if hit else 0
                decoded[(b, h, t)] = dict(
                    o=out[0], lse=out[1], hit=hit, matched_pos=best_j, distance=found[h]["d"],
                    keys_read=S + (N - band_start) + (t + 1 - N), ill=ill, depth=depth[h][t],
                    candidate=found[h]["candidate"], w=found[h]["w"],
                )
        last = n + steps
        for h in range(Hq):
            for j in range(max(0, last - W), last):
                final_rows[(b, h, j)] = rows[h][j]
    return decoded, prefilled, final_rows


def check_against_literal(q_pre, k, v, prompt_lengths, config: MACConfig):
    """Run both implementations and compare every output, statistic and final row."""
    result = run_stream(q_pre, k, v, torch.tensor(prompt_lengths), config)
    decoded, prefilled, final_rows = literal_stream(q_pre.tolist(), k.tolist(), v.tolist(), prompt_lengths, config)
    atol = tolerance("literal", torch.float64).atol

    def close(x, y):
        return x == y or abs(x - y) <= atol

    for (b, h, t), (o, lse) in prefilled.items():
        assert close(result.lse[b, h, t].item(), lse), (b, h, t)
        assert all(close(x, y) for x, y in zip(result.out[b, h, t].tolist(), o)), (b, h, t)
    stats = result.stats
    n_hits = 0
    for (b, h, t), want in decoded.items():
        s = t - prompt_lengths[b]
        where = f"request {b} head {h} position {t}"
        assert bool(stats.hit[s, b, h]) == want["hit"], where
        assert int(stats.matched_pos[s, b, h]) == want["matched_pos"], where
        assert close(stats.distance[s, b, h].item(), want["distance"]), where
        assert int(stats.keys_read[s, b, h]) == want["keys_read"], where
        assert int(stats.context[s, b]) == t + 1, where
        assert bool(stats.ill_conditioned[s, b, h]) == want["ill"], where
        assert int(stats.chain_depth[s, b, h]) == want["depth"], where
        assert bool(stats.candidate[s, b, h]) == want["candidate"], where
        assert close(stats.mass_share[s, b, h].item(), want["w"]), where
        assert close(result.lse[b, h, t].item(), want["lse"]), where
        assert all(close(x, y) for x, y in zip(result.out[b, h, t].tolist(), want["o"])), where
        n_hits += want["hit"]
    W = config.window
    for (b, h, j), (o, lse) in final_rows.items():
        assert close(result.state.ring_lse[b, h, j % W].item(), lse), ("row", b, h, j)
        assert all(close(x, y) for x, y in zip(result.state.ring_o[b, h, j % W].tolist(), o)), ("row", b, h, j)
    return n_hits, len(decoded)


@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    head_dim=st.sampled_from([2, 4, 8]),
    prompt_lengths=st.lists(st.integers(0, 10), min_size=2, max_size=2),
    steps=st.integers(1, 20),
    window=st.integers(1, 10),
    band=st.integers(0, 10),
    tau=st.one_of(st.sampled_from([0.0, 0.45, 0.75, 1.0]), st.floats(-0.2, 1.2)),
    radius_scale=st.one_of(st.none(), st.lists(st.floats(0.25, 2.0), min_size=4, max_size=4)),
    sinks=st.integers(0, 3),
    min_context=st.sampled_from([0, 4]),
    max_chain=st.sampled_from([None, 1, 3]),
    row_update=st.sampled_from(["split", "subtract"]),
    rule=st.sampled_from([PaperRule(), PaperRule(per_group=True), MassRule(tau_m=0.45), MassRule(tau_m=0.75, per_group=True), MassRule(tau_m=1.0)]),
    group_match=st.booleans(),
    noise=st.sampled_from([0.0, 0.05]),  # 0: exact repeats, so distance ties
    seed=st.integers(0, 2**31),
)
def test_mac_ref_equals_the_literal_recurrence(
    batch, kv_heads, group, head_dim, prompt_lengths, steps, window, band, tau, radius_scale, sinks, min_context,
    max_chain, row_update, rule, group_match, noise, seed,
):
    prompt_lengths = prompt_lengths[:batch]
    T = max(prompt_lengths) + steps
    q_heads = kv_heads * group
    q, k, v = synthetic_stream(
        batch, q_heads, kv_heads, T, head_dim, reuse=0.8, noise=noise, max_lag=8, seed=seed, dtype=torch.float64
    )
    config = MACConfig(
        window=window, band=band, tau=tau, sinks=sinks, min_context=min_context, max_chain=max_chain,
        row_update=row_update, radius_scale=None if radius_scale is None else tuple(radius_scale[:q_heads]), rule=rule,
        group_match=group_match,
    )
    n_hits, n_steps = check_against_literal(q, k, v, prompt_lengths, config)
    event(f"hit share {round(n_hits / n_steps, 1)}")


@pytest.mark.parametrize("max_chain", [None, 2])
@pytest.mark.parametrize("row_update", ["split", "subtract"])
def test_long_stream_with_chained_reuse(row_update, max_chain):
    """120 steps with sinks, ragged prompts and many hits: chained rows agree to 1e-10."""
    q, k, v = synthetic_stream(2, 4, 2, 130, 8, reuse=0.8, noise=0.05, max_lag=12, seed=7, dtype=torch.float64)
    config = MACConfig(window=16, band=6, tau=0.45, sinks=2, min_context=3, max_chain=max_chain, row_update=row_update)
    n_hits, n_steps = check_against_literal(q, k, v, [10, 4], config)
    assert 0.3 < n_hits / n_steps < 0.95  # hits and misses both exercised


@pytest.mark.parametrize("rule", [MassRule(tau_m=0.6), MassRule(tau_m=0.6, per_group=True)], ids=["mass", "mass-per-group"])
def test_long_stream_with_the_mass_rule(rule):
    """The mass rule along 120 steps: it rejects some candidates (loose cap), the decisions are
    the literal loop's, and so are every output and row (to 1e-10)."""
    q, k, v = synthetic_stream(2, 4, 2, 130, 8, reuse=0.8, noise=0.2, max_lag=12, seed=8, dtype=torch.float64)
    config = MACConfig(window=16, band=6, tau=0.1, sinks=2, max_chain=2, rule=rule)
    n_hits, n_steps = check_against_literal(q, k, v, [10, 4], config)
    stats = run_stream(q, k, v, torch.tensor([10, 4]), config).stats
    rejected = (stats.candidate & ~stats.hit).float().mean().item()
    assert 0.05 < rejected and 0.2 < n_hits / n_steps < 0.95, (rejected, n_hits / n_steps)


@pytest.mark.slow
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([2, 4, 8, 16]),
    prompt_lengths=st.lists(st.integers(0, 40), min_size=3, max_size=3),
    steps=st.integers(1, 80),
    window=st.integers(1, 40),
    band=st.integers(0, 30),
    tau=st.floats(-0.5, 1.5),
    sinks=st.integers(0, 8),
    min_context=st.integers(0, 20),
    row_update=st.sampled_from(["split", "subtract"]),
    noise=st.sampled_from([0.0, 0.02, 0.1]),
    max_lag=st.integers(1, 40),
    seed=st.integers(0, 2**31),
)
def test_long_fuzz_against_the_literal_recurrence(
    batch, kv_heads, group, head_dim, prompt_lengths, steps, window, band, tau, sinks, min_context, row_update,
    noise, max_lag, seed,
):
    """Not in CI: ``HYPOTHESIS_PROFILE=slow pytest -m slow tests/test_literal_loop.py``."""
    prompt_lengths = prompt_lengths[:batch]
    T = max(prompt_lengths) + steps
    q, k, v = synthetic_stream(
        batch, kv_heads * group, kv_heads, T, head_dim, reuse=0.8, noise=noise, max_lag=max_lag, seed=seed,
        dtype=torch.float64,
    )
    config = MACConfig(window=window, band=band, tau=tau, sinks=sinks, min_context=min_context, row_update=row_update)
    check_against_literal(q, k, v, prompt_lengths, config)


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("rule", [PaperRule(), MassRule(tau_m=0.6)], ids=["paper", "mass"])
def test_long_stream_with_a_group_match(group, rule):
    """A group match along 60 steps at GQA ratios 1, 3, 4 and 8: the literal loop's decisions,
    outputs and rows (to 1e-10), and every head of a KV group on the same row."""
    q, k, v = synthetic_stream(2, 2 * group, 2, 70, 8, reuse=0.8, noise=0.05, max_lag=12, seed=9, dtype=torch.float64)
    config = MACConfig(window=16, band=6, tau=0.1, sinks=2, max_chain=2, rule=rule, group_match=True)
    n_hits, n_steps = check_against_literal(q, k, v, [10, 4], config)
    assert 0.1 < n_hits / n_steps < 0.95, n_hits / n_steps
    matched = run_stream(q, k, v, torch.tensor([10, 4]), config).stats.matched_pos  # [S, B, Hq]
    by_group = matched.view(*matched.shape[:2], 2, group)
    assert (by_group == by_group[..., :1]).all()
