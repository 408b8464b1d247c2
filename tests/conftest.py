"""Shared test setup: Triton interpreter lane, hypothesis profiles, the ``gpu`` marker, NaN poisoning.

Run the suite with ``make test`` (CPU, ``pytest -n 2 -m "not gpu and not slow"``). The
hypothesis profile comes from ``HYPOTHESIS_PROFILE`` (``ci`` by default; ``slow`` for a long
fuzz run: ``HYPOTHESIS_PROFILE=slow pytest -m slow``).
"""

import os

import torch

# The Triton interpreter is chosen when a kernel is decorated, so this must happen before
# anything imports triton (importing torch does not).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test tensors are tiny and `pytest -n 2` already fills both cores: intra-op threads on top
# only contend (a 130-step stream took 9 s with 2 threads per worker, 0.6 s with 1).
torch.set_num_threads(1)

import math  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "slow",
    deadline=None,
    max_examples=1000,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def poison_beyond(x: torch.Tensor, lengths, dim: int = 2) -> torch.Tensor:
    """A copy of ``x [B, ...]`` with every index ``≥ lengths[b]`` along ``dim`` set to NaN.

    A KV cache ``[B, Hkv, T, D]`` poisoned past each request's position proves that the code
    under test never reads there: one read turns the output NaN.
    """
    x = x.clone()
    index = torch.arange(x.shape[dim], device=x.device)
    for b in range(x.shape[0]):
        x[b].index_fill_(dim - 1, index[int(lengths[b]) :], math.nan)
    return x


@pytest.fixture(scope="session")
def poison():
    """NaN-poisoning helpers: ``poison.beyond(x, lengths, dim)`` and ``poison.like(x)``.

    ``poison.like`` allocates an output buffer full of NaN, so that an element a kernel
    forgot to write shows up instead of passing on stale memory.
    """

    class Poison:
        beyond = staticmethod(poison_beyond)

        @staticmethod
        def like(x: torch.Tensor) -> torch.Tensor:
            return torch.full_like(x, math.nan)

    return Poison()
