"""``mac_llm.engine.DecodeEngine`` on a CUDA GPU (marker ``gpu``): the CUDA-graph replay of a
decode step gives the eager step's result, for every attention, on a tiny random model."""

import pytest
import torch

from mac_core import MACConfig, MassRule
from mac_llm.engine import DecodeEngine

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model():
    from test_engine import tiny_model  # the same tiny random Llama as the CPU tests

    return tiny_model().to("cuda")


@pytest.mark.parametrize(
    "attention, config",
    [("triton", None), ("sdpa", None), ("mac", MACConfig(window=8, band=4, tau=-2.0)), ("mac", MACConfig(window=8, band=4, tau=-2.0, rule=MassRule(tau_m=0.9)))],
    ids=["triton", "sdpa", "mac-paper", "mac-mass"],
)
def test_graph_replay_equals_the_eager_step(model, attention, config):
    prompts = [list(range(3, 20)), list(range(5, 30))]
    runs = []
    for graph in (False, True):
        engine = DecodeEngine(model, 2, 48, attention, config, dtype=torch.float32, device="cuda")
        engine.prefill(prompts)
        logits = [engine.step(graph=graph).clone() for _ in range(6)]
        runs.append((torch.stack(logits), engine.tokens.clone(), [s.ring_o.clone() for s in engine.states]))
    (eager, eager_tokens, eager_rings), (graphed, graphed_tokens, graphed_rings) = runs
    assert torch.equal(eager_tokens, graphed_tokens)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    for a, b in zip(eager_rings, graphed_rings):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
