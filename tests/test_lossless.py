"""Lossless MAC (``mac_llm.lossless``): MAC drafts, full attention verifies.

On the CPU in float32 at a tiny size: greedy tokens identical to full attention's (ragged
prompts, prompts shorter than the band, several ``k``, adaptive or not), the cache and the
rings after a run equal those of full attention that keeps its rings (MAC's miss step) and
differ when the repair is skipped, and speculative sampling's acceptance distributed as
full attention's by a chi-square test that fails when the rule is broken on purpose.
"""

import csv
import dataclasses
import os

import numpy as np
import pytest
import torch

from mac_core import MACConfig
from mac_llm.engine import DecodeEngine, FallbackPolicy
from mac_llm.lossless import DraftLength, LosslessDecoder, accept_greedy, accept_sampled
import mac_llm.lossless as lossless
from test_engine import prompts, tiny_model
from tolerances import assert_close

# Triton on CPU tensors runs in the interpreter only (a GPU machine runs the CUDA twins of these tests)
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
CAPACITY = 96
# τ −0.5: most heads hit, so drafts are often refused and the repair has work to do
CONFIG = MACConfig(window=8, band=3, tau=-0.5, sinks=1, max_chain=4)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def engine_for(model, batch, attention="mac", config=CONFIG, backend="ref", policy=None, device="cpu", dtype=torch.float32):
    engine = DecodeEngine(model, len(batch), CAPACITY, attention, config, dtype=dtype, device=device, mac_backend=backend, policy=policy)
    engine.prefill(batch)
    return engine


def full_greedy(model, batch, n, device="cpu"):
    """Full attention's greedy tokens (SDPA), ``n`` per request."""
    engine = engine_for(model, batch, "sdpa", device=device)
    out = [engine.tokens.clone()]
    for _ in range(n - 1):
        out.append(engine.step().argmax(-1).clone())
    return torch.stack(out, dim=1).tolist()


LENGTHS = [[11, 2, 17], [5], [2, 30]]  # ragged; 2 is shorter than the band
DRAFTS = [dict(k_max=1, adaptive=False), dict(k_max=3, adaptive=False), dict(k_max=5)]


def assert_greedy_is_full_attentions(model, lengths, draft, backend, n, device="cpu", policy=None):
    batch = prompts(lengths, seed=len(lengths))
    decoder = LosslessDecoder(engine_for(model, batch, backend=backend, device=device, policy=policy), DraftLength(**draft))
    assert decoder.generate(n) == full_greedy(model, batch, n, device)
    past = [p - length for p, length in zip(decoder.engine.host_positions, lengths)]
    # the round queued before the last one is read back may still carry a request that had its tokens: two rounds at most
    assert max(past) <= n - 1 + 2 * draft["k_max"] + 1, "a request that had its tokens went on (idle requests must wait)"
    assert all(-1 not in h for h in decoder.emitted), "a plain round's token was not read back"
    drafted = [a for k, row in zip(decoder.log.k, decoder.log.accepted) if k for a in row]
    assert max(drafted) > 0, "no draft was kept: the tokens came from the verify pass alone"
    return decoder


@pytest.mark.parametrize("lengths", LENGTHS, ids=["ragged", "one", "short"])
@pytest.mark.parametrize("draft", DRAFTS, ids=["k1", "k3", "adaptive5"])
def test_greedy_tokens_are_full_attentions(model, lengths, draft):
    """The reference MAC step drafts (``mac_ref``)."""
    assert_greedy_is_full_attentions(model, lengths, draft, "ref", 24)


@interpreter
def test_greedy_tokens_with_the_triton_draft(model):
    """The Triton MAC step drafts (the interpreter: one short case)."""
    assert_greedy_is_full_attentions(model, [2, 9], DRAFTS[1], "triton", 10)


@pytest.mark.gpu
@pytest.mark.parametrize("draft", DRAFTS, ids=["k1", "k3", "adaptive5"])
def test_greedy_tokens_with_the_triton_draft_on_the_gpu(model, draft):
    """Compiled kernels, the draft steps replayed as a CUDA graph; float32 (SDPA's greedy tokens as the reference)."""
    assert_greedy_is_full_attentions(model, [11, 2, 17, 40, 33], draft, "triton", 40, device="cuda")


def test_a_policy_steps_plainly_where_mac_cannot_win(model):
    """Below the policy's context threshold a round is one step of its full attention (SDPA,
    which leaves the rings stale); past it the rounds draft again (the stale rows retired
    before the round keeps its slots). The tokens stay full attention's."""
    policy = FallbackPolicy(min_batch=1, min_context=26, full="sdpa")
    decoder = assert_greedy_is_full_attentions(model, [11, 2, 17], DRAFTS[1], "ref", 24, policy=policy)
    plain = decoder.log.plain
    assert plain[0] and not plain[-1] and plain == sorted(plain, reverse=True), plain


@pytest.mark.parametrize("backend", ["ref", pytest.param("triton", marks=interpreter)])
def test_refused_drafts_fall_back_to_plain_steps(model, backend):
    """With a policy, a round that would draft nothing (``k = 0``: drafts refused too often) is
    one plain step, MAC's miss step on the Triton backend (the rings stay exact: they equal
    those of full attention that keeps its rings), the policy's SDPA on the reference's;
    a probe drafts again now and then. The tokens stay full attention's."""
    batch = prompts([13, 4, 21], seed=3)  # assert_greedy_is_full_attentions's prompts
    policy = FallbackPolicy(min_batch=1, min_context=0, min_hit_rate=0.0)
    draft = dict(k_max=3, min_accepted=4.0, probe_every=3)  # 4 > k_max: every round after the first is plain but the probes
    decoder = assert_greedy_is_full_attentions(model, [13, 4, 21], draft, backend, 16, policy=policy)
    plain = decoder.log.plain
    assert any(plain) and not all(plain), plain
    assert all(p == (k == 0) for p, k in zip(plain, decoder.log.k)), "a round that drafted nothing went through the verify pass"
    if backend == "triton":
        for b, prompt in enumerate(batch):
            assert_request_matches(decoder.engine, b, miss_run(model, prompt, decoder.emitted[b][:-1]))


def test_drafting_stops_where_it_is_slower_and_probes_again():
    """``by_speed``: once drafting is measured, a round measures the alternative; while drafting
    emits tokens more slowly, rounds draft nothing but one probe in ``probe_every``; when it is
    faster again, rounds draft."""
    draft = DraftLength(k_max=4, probe_every=4, by_speed=True)
    assert draft.next_k() == 4
    draft.observe(4, 3.0)
    draft.observe_speed(True, 2.0)
    assert draft.next_k() == 0  # the alternative is not measured yet
    draft.observe_speed(False, 1.0)
    assert [draft.next_k() for _ in range(8)] == [4 if r % 4 == 0 else 0 for r in range(3, 11)]
    draft.observe_speed(True, 0.2)  # averaged with 2.0: 1.1, still slower
    assert draft.next_k() == 0
    draft.observe_speed(True, 0.2)  # 0.65: faster
    assert draft.next_k() == 4


def test_generate_queues_the_next_round_before_reading_the_last_back(model):
    """The device need not wait for the host: each round but the first goes out before the
    previous one is landed (read back), while some request surely needs more tokens; rounds
    land in launch order, and the tokens are full attention's."""
    batch = prompts([11, 2, 17], seed=3)
    decoder = LosslessDecoder(engine_for(model, batch), DraftLength(k_max=3, adaptive=False))
    events, launch, land = [], decoder._launch, decoder._land

    def launched(*args):
        r = launch(*args)
        events.append(("launch", id(r)))
        return r

    def landed(r):
        events.append(("land", id(r)))
        return land(r)

    decoder._launch, decoder._land = launched, landed
    assert decoder.generate(16) == full_greedy(model, batch, 16)
    launches = [i for kind, i in events if kind == "launch"]
    assert [i for kind, i in events if kind == "land"] == launches, "rounds land in launch order, each once"
    in_flight, behind = 0, 0  # rounds launched and not landed; launches made while one was
    for kind, _ in events:
        behind += kind == "launch" and in_flight > 0
        in_flight += 1 if kind == "launch" else -1
    # most: near the end a round waits for the one before where every request might have its tokens after it
    assert behind > len(launches) // 2, events


def test_a_traced_decoder_times_every_part_of_its_rounds(model):
    """``trace=True``: every round that waits for the device adds its parts' times, and the
    gap between rounds from the second on; ``reset`` starts the sums afresh."""
    batch = prompts([11, 2, 17], seed=3)
    decoder = LosslessDecoder(engine_for(model, batch), DraftLength(k_max=3, adaptive=False), trace=True)
    decoder.generate(12)
    rounds = len(decoder.log.k)
    assert decoder.traced_rounds == rounds > 1
    assert set(decoder.trace_ms) == {"keep slots", "drafts", "verify", "accept, repair", "between rounds"}
    assert all(ms >= 0 for ms in decoder.trace_ms.values()) and decoder.trace_ms["verify"] > 0
    decoder.reset()
    assert decoder.trace_ms == {} and decoder.traced_rounds == 0


class RoundCosts:
    """A stand-in clock for a decoder: a round costs ``drafting`` ms if it drafted, else ``plain``.
    An untraced decoder marks each round twice, at its start and at its end, in launch order,
    and logs the rounds in the same order when it reads them back."""

    def __init__(self, decoder, drafting, plain):
        self.decoder, self.drafting, self.plain = decoder, drafting, plain
        self.marks = 0

    def mark(self):
        self.marks += 1
        return (self.marks - 1) // 2  # the round's index

    def ms(self, start, end):
        log = self.decoder.log
        return self.drafting if log.k[start] and not log.plain[start] else self.plain


@pytest.mark.parametrize("slower", [True, False], ids=["drafting-slower", "drafting-faster"])
def test_a_decoder_timed_by_speed_keeps_full_attentions_tokens(model, slower):
    """Where drafting rounds are slower per token (a stand-in clock), a decoder with a policy
    decodes in plain steps but for the probes; where they are faster it drafts. The tokens
    are full attention's either way."""
    batch = prompts([11, 2, 17], seed=3)
    policy = FallbackPolicy(min_batch=1, min_context=0, min_hit_rate=0.0, full="sdpa")
    # min_accepted 0: no round stops drafting for its acceptance, only for its speed
    decoder = LosslessDecoder(engine_for(model, batch, policy=policy), DraftLength(k_max=3, probe_every=5, by_speed=True, min_accepted=0.0))
    decoder.clock = RoundCosts(decoder, drafting=40.0 if slower else 1.0, plain=5.0)
    assert decoder.generate(30) == full_greedy(model, batch, 30)
    drafting = [k > 0 for k in decoder.log.k]
    # the second round goes out before the first is read back, so it drafts too; the third measures the plain step
    assert drafting[0] and drafting[1] and not drafting[2], decoder.log.k
    if slower:
        assert 2 < sum(drafting) <= len(drafting) // 5 + 2, decoder.log.k  # the first two and the probes only
    else:
        assert drafting.count(False) == 1, decoder.log.k  # the plain step measured once


def assert_bitwise_full_attention_through_the_verify_pass(model, device, dtype, n):
    """A fixed block: the cache (so every logit) is bit for bit that of full attention decoded
    through the same verify pass (``k_max = 0``), the tokens identical; drafts were kept. On a
    GPU the verify pass is a CUDA graph, and an eager run gives the same bits too."""
    batch = prompts([11, 2, 17], seed=3)
    kinds = [(0, True), (3, True)] + ([(3, False)] if device == "cuda" else [])  # (k_max, graph)
    runs = [LosslessDecoder(engine_for(model, batch, backend="triton", device=device, dtype=dtype), DraftLength(k_max=k_max), block=4, graph=graph)
            for k_max, graph in kinds]  # fmt: skip
    assert runs[1].graphed == (device == "cuda")
    full, *others = (run.generate(n) for run in runs)
    assert all(tokens == full for tokens in others)
    assert sum(n for row in runs[1].log.accepted for n in row) > 0, "no draft was kept"
    for b in range(len(batch)):
        p = min(run.engine.host_positions[b] for run in runs)
        for other in runs[1:]:
            for layer, (k_full, k_other) in enumerate(zip(runs[0].engine.k, other.engine.k)):
                assert torch.equal(k_other[b, :, :p], k_full[b, :, :p]), f"request {b}, layer {layer}: keys differ"


@interpreter
def test_a_fixed_block_is_full_attention_through_the_verify_pass_bit_for_bit(model):
    """The Triton verify kernel under the interpreter, float32 (the reference's attend is not batch-invariant)."""
    assert_bitwise_full_attention_through_the_verify_pass(model, "cpu", torch.float32, 12)


@pytest.mark.gpu
def test_a_fixed_block_is_full_attention_through_the_verify_pass_bit_for_bit_in_bf16(model):
    """bf16 on the GPU: the same tokens and cache bits as full attention through the same pass, graphed or not."""
    assert_bitwise_full_attention_through_the_verify_pass(model, "cuda", torch.bfloat16, 40)


def test_a_reset_decoder_decodes_the_same_again_after_a_rewind(model):
    engine = engine_for(model, prompts([9, 14], seed=2))
    checkpoint = engine.checkpoint()
    decoder = LosslessDecoder(engine, DraftLength(k_max=3), block=4)
    first, rounds = decoder.generate(10), len(decoder.log.k)
    engine.rewind(checkpoint)
    decoder.reset()
    assert decoder.log.k == [] and decoder.emitted == [[], []]
    assert decoder.generate(10) == first and len(decoder.log.k) == rounds


def miss_run(model, prompt, inputs):
    """One request under full attention that keeps its rings, fed ``inputs``: MAC at τ = 1,
    where no query is near enough to reuse a row, so every step is a miss (exact row, depth 0)."""
    engine = engine_for(model, [prompt], config=dataclasses.replace(CONFIG, tau=1.0))
    for token in inputs:
        engine.step(torch.tensor([token]))
    assert not engine.step_stats().hit.any()
    return engine


def assert_request_matches(got: DecodeEngine, b: int, want: DecodeEngine):
    """Request ``b`` of ``got`` against the one request of ``want``: position, cache below it, rings."""
    p = int(want.positions[0])
    assert int(got.positions[b]) == p
    for layer, (gs, ws) in enumerate(zip(got.states, want.states)):
        assert_close(got.k[layer][b, :, :p], want.k[layer][0, :, :p], "model_logits", msg=f"k, layer {layer}")
        assert_close(got.v[layer][b, :, :p], want.v[layer][0, :, :p], "model_logits", msg=f"v, layer {layer}")
        seeded = torch.isfinite(ws.ring_lse[0])
        assert torch.equal(torch.isfinite(gs.ring_lse[b]), seeded), f"layer {layer}: other slots hold rows"
        assert torch.equal(gs.ring_depth[b], ws.ring_depth[0]), f"layer {layer}: chain depths"
        assert_close(gs.ring_q[b], ws.ring_q[0], "model_logits", msg=f"ring q, layer {layer}")
        assert_close(gs.ring_o[b], ws.ring_o[0], "model_logits", msg=f"ring o, layer {layer}")
        assert_close(gs.ring_lse[b][seeded], ws.ring_lse[0][seeded], "model_logits", msg=f"ring lse, layer {layer}")
        assert int(gs.next_pos[b]) == p


def lossless_run(model, batch, steps=20):
    decoder = LosslessDecoder(engine_for(model, batch), DraftLength(k_max=4, adaptive=False))
    decoder.generate(steps)
    return decoder


def test_cache_and_rings_after_a_run_are_full_attentions(model):
    """Each request's cache and rings equal those of a full-attention run that keeps its rings, fed the same tokens."""
    batch = prompts([13, 4, 21], seed=5)
    decoder = lossless_run(model, batch)
    assert sum(n < 4 for row in decoder.log.accepted for n in row) > 0, "no draft was refused: the repair went untested"
    for b, prompt in enumerate(batch):
        emitted = decoder.emitted[b]  # the last is the next input, not yet in the cache
        assert_request_matches(decoder.engine, b, miss_run(model, prompt, emitted[:-1]))


def test_skipping_the_repair_leaves_the_drafts_rows(model, monkeypatch):
    """The test above fails when the repair is skipped: the draft's reused rows stay in the rings."""
    monkeypatch.setattr(lossless, "_repair", lambda *args: None)
    batch = prompts([13, 4, 21], seed=5)
    decoder = lossless_run(model, batch)
    with pytest.raises(AssertionError):
        for b, prompt in enumerate(batch):
            assert_request_matches(decoder.engine, b, miss_run(model, prompt, decoder.emitted[b][:-1]))


# -- sampling ---------------------------------------------------------------------------------------


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's test of ``counts`` against ``probs`` (bins with expected count < 5 pooled)."""
    expected = probs * counts.sum()
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    stat = float(((counts - expected) ** 2 / expected).sum())
    return float(torch.special.gammaincc(torch.tensor((len(counts) - 1) / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def broken_accept(p, q, drafts, generator=None):
    """The rule broken on purpose: every draft kept (the output follows the draft's ``q``)."""
    accepted = torch.full((drafts.shape[0],), drafts.shape[1], dtype=torch.int64)
    return accepted, torch.multinomial(p[:, -1], 1, generator=generator)[:, 0]


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_sampling_is_distributed_as_the_target(k):
    """First emitted token of 40 000 rounds on a 6-token vocabulary where the draft is far from
    the target (total variation 0.45): its frequencies pass a chi-square test against ``p_0``
    (p > 1e-3); with every draft kept they follow ``q_0`` and fail it. Power: the broken rule's
    noncentrality is N·Σ(q−p)²/p ≈ 2·10⁴, so it fails at any seed."""
    gen = torch.Generator().manual_seed(3)
    N, V = 40_000, 6
    p = torch.softmax(torch.randn(k + 1, V, generator=gen) * 2, -1).expand(N, -1, -1)
    q = torch.softmax(torch.randn(k, V, generator=gen) * 2, -1).expand(N, -1, -1)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=gen).view(N, k)
    target = p[0, 0].double().numpy()
    for rule, passes in ((accept_sampled, True), (broken_accept, False)):
        accepted, nxt = rule(p, q, drafts, gen)
        first = torch.where(accepted > 0, drafts[:, 0], nxt)
        counts = np.bincount(first.numpy(), minlength=V)
        assert (chi_square_p_value(counts, target) > 1e-3) == passes, (rule.__name__, counts / N, target)


def test_lossless_sampling_on_a_model_follows_full_attention(model):
    """512 copies of one prompt, one sampled round each (k 2, temperature 1.5, drafts mostly
    reused rows): the first token's frequencies match full attention's distribution, and
    fail to with every draft kept."""
    N, T = 512, 1.5
    prompt = prompts([14], seed=9)[0]
    full = engine_for(model, [prompt], "sdpa")
    target = torch.softmax(full.step().double() / T, -1)[0].numpy()  # after the prompt's greedy next token
    loose = MACConfig(window=8, band=2, tau=-1.0, sinks=1)  # nearly every head reuses a row: q far from p
    results = {}
    for name, rule in (("lossless", accept_sampled), ("broken", broken_accept)):
        engine = engine_for(model, [prompt] * N, config=loose)
        decoder = LosslessDecoder(engine, DraftLength(k_max=2, adaptive=False), temperature=T, generator=torch.Generator().manual_seed(11))
        lossless.accept_sampled, saved = rule, lossless.accept_sampled
        try:
            emitted, _ = decoder.round()
        finally:
            lossless.accept_sampled = saved
        results[name] = chi_square_p_value(np.bincount(emitted[:, 0].numpy(), minlength=len(target)), target)
    assert results["lossless"] > 1e-3 and results["broken"] < 1e-3, results


# -- errors -----------------------------------------------------------------------------------------


def test_errors_name_the_argument(model):
    batch = prompts([6, 7])
    with pytest.raises(ValueError, match="attention='mac'"):
        LosslessDecoder(engine_for(model, batch, "sdpa"))
    with pytest.raises(ValueError, match="k_max"):
        LosslessDecoder(engine_for(model, batch), DraftLength(k_max=8))
    with pytest.raises(ValueError, match="temperature"):
        LosslessDecoder(engine_for(model, batch), temperature=-1.0)
    for block in (4, 9):  # below k_max + 1; past the window W = 8 (two positions of a round in one slot)
        with pytest.raises(ValueError, match=r"block must be None or an int in \[draft.k_max \+ 1 = 5, W = 8\]"):
            LosslessDecoder(engine_for(model, batch), DraftLength(k_max=4), block=block)
    with pytest.raises(ValueError, match="k must be below the decoder's block=4"):
        LosslessDecoder(engine_for(model, batch), DraftLength(k_max=3), block=4).round(4)
    engine = engine_for(model, batch)
    decoder = LosslessDecoder(engine)
    engine.prefill(batch)
    with pytest.raises(ValueError, match="the engine was prefilled again after this LosslessDecoder was made"):
        decoder.round()
    decoder = LosslessDecoder(engine)
    with pytest.raises(ValueError, match="k must be"):
        decoder.round(8)
    small = DecodeEngine(model, 2, 9, "mac", CONFIG, dtype=torch.float32, device="cpu", mac_backend="ref")
    small.prefill(batch)
    with pytest.raises(ValueError, match="capacity"):
        LosslessDecoder(small).round(3)
    with pytest.raises(ValueError, match="n must be"):
        decoder.generate(0)
    with pytest.raises(TypeError, match="drafts"):
        accept_greedy(torch.zeros(1, 2, 5), torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[B, k\+1, V\]"):
        accept_greedy(torch.zeros(1, 3, 5), torch.zeros(1, 1, dtype=torch.int64))


def test_the_projection_onto_the_8b_engine_is_its_formula():
    """``bench_lossless --project``: n̄·t_full / (k̄·t_mac(h) + t_verify), the best full attention as t_full;
    a policy's rows are not projected (its plain rounds were decided for SmolLM2's point)."""
    bench = pytest.importorskip("benchmarks.bench_lossless")
    scale = [dict(context="32768", batch="4", provider=p, step_ms=ms) for p, ms in
             (("sdpa", "10"), ("triton", "12"), ("verified", "11"), ("mac@0.9", "6"), ("mac@1", "5"))]  # fmt: skip
    lossless_rows = [dict(provider="full", context="8192", batch="64"),
                     dict(provider="lossless:demo", context="8192", batch="64", tokens_per_round="3", mean_k="2.5"),
                     dict(provider="lossless:demo+policy", context="8192", batch="1", tokens_per_round="1", mean_k="0")]  # fmt: skip
    rows = bench.project(lossless_rows, scale)
    assert [(r["draft"], r["hit_rate"], r["speedup"]) for r in rows] == [("demo", 0.9, round(30 / 26, 3)), ("demo", 1.0, round(30 / 23.5, 3))]
    assert bench.project(lossless_rows, [r for r in scale if r["provider"] != "verified"]) == []  # no verified round timed: nothing


def test_runs_of_several_calls_merge_into_one_table(tmp_path):
    """``bench_lossless --merge``: the points of every run in one table and plot (numbers read back as
    numbers, a row's empty cells left out); runs of other machines or versions are refused."""
    bench = pytest.importorskip("benchmarks.bench_lossless")
    env = "gpu H100, torch 2.11, triton 3.6"
    common = dict(gpu="H100", tokens=8, best_full="sdpa", same_as_full=1.0, same_as_verified=1.0)
    for name, ctx in (("a", 2048), ("b", 8192)):
        run = tmp_path / name
        run.mkdir()
        rows = [dict(common, context=ctx, batch=1, provider="sdpa", speedup_vs_full=1.0, tokens_per_s=10.0),
                dict(common, context=ctx, batch=1, provider="mac", speedup_vs_full=0.8),
                dict(common, context=ctx, batch=1, provider="verified", speedup_vs_full=0.7),
                dict(common, context=ctx, batch=1, provider="lossless:demo", speedup_vs_full=0.9, mean_accepted=3.5, k_max=4,
                     tokens_per_round=4.5, batch_tokens_per_round=4.5, draft_share=1.0, plain_share=0.0, round_ms_verify=2.0)]  # fmt: skip
        bench.write(rows, [dict(context=ctx, batch=1, draft="demo", accepted=a, count=1 + a) for a in range(5)], run,
                    dict(part.split(" ", 1) for part in env.split(", ")))
        (run / "lossless.log").write_text(env + "\n")
    out = tmp_path / "merged"
    out.mkdir()
    bench.merge([tmp_path / "a", tmp_path / "b"], out)
    table = (out / "lossless.md").read_text()
    assert "| 2048 | 1 | sdpa, 10.0 | 0.8×, 100.0% | 0.7× | demo | 0.9× |" in table and "| 8192 | 1 | sdpa, 10.0 |" in table
    assert table.count("| lossless:demo | – | 2.0 |") == 0 and table.count("lossless:demo | 2.0 |") == 2  # only rows with parts timed
    with open(out / "lossless_hist.csv", newline="") as f:
        assert (out / "lossless_hist.png").exists() and len(list(csv.DictReader(f))) == 10
    (tmp_path / "b" / "lossless.log").write_text("gpu H200, torch 2.11, triton 3.6\n")
    with pytest.raises(SystemExit, match="different machines"):
        bench.merge([tmp_path / "a", tmp_path / "b"], out)
