"""``mac_llm.engine.DecodeEngine`` on a CUDA GPU (marker ``gpu``): the CUDA-graph replay of a
decode step gives the eager step's result, for every attention, on a tiny random model."""

import pytest
import torch

from mac_core import MACConfig, MassRule
from mac_llm.engine import DecodeEngine, FallbackPolicy

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model():
    from test_engine import tiny_model  # the same tiny random Llama as the CPU tests

    return tiny_model().to("cuda")


LOOSE = MACConfig(window=8, band=4, tau=-2.0, max_chain=1)


@pytest.mark.parametrize(
    "attention, config, policy",
    [("triton", None, None), ("sdpa", None, None), ("mac", MACConfig(window=8, band=4, tau=-2.0), None),
     ("mac", MACConfig(window=8, band=4, tau=-2.0, rule=MassRule(tau_m=0.9)), None),
     ("mac", LOOSE, dict(min_batch=1, min_context=28)),  # SDPA graphs for 2 steps, then MAC on marked rows
     ("mac", LOOSE, dict(min_batch=1, min_context=0, min_hit_rate=2.0, probe_every=3))],  # miss steps and probes
    ids=["triton", "sdpa", "mac-paper", "mac-mass", "policy-full-then-mac", "policy-miss-and-probe"],
)
def test_graph_replay_equals_the_eager_step(model, attention, config, policy):
    prompts = [list(range(3, 20)), list(range(5, 30))]
    runs = []
    for graph in (False, True):
        engine = DecodeEngine(model, 2, 48, attention, config, dtype=torch.float32, device="cuda",
                              policy=None if policy is None else FallbackPolicy(**policy))
        engine.prefill(prompts)
        logits = [engine.step(graph=graph).clone() for _ in range(6)]
        runs.append((torch.stack(logits), engine.tokens.clone(), [s.ring_o.clone() for s in engine.states]))
    (eager, eager_tokens, eager_rings), (graphed, graphed_tokens, graphed_rings) = runs
    assert torch.equal(eager_tokens, graphed_tokens)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    for a, b in zip(eager_rings, graphed_rings):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
