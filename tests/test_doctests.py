"""The examples in the docstrings run and print what they say (e.g. the band and tail lengths
of a concrete step in ``mac_core.step``, ⊕ of two key ranges against attending the whole
range in ``mac_ref.summary``)."""

import doctest
import importlib
import os

import pytest

MODULES = ["mac_core.step", "mac_ref.summary", "mac_core.kv", "mac_ref.decode", "mac_llm.llama", "mac_llm.hf"]
# the Triton examples use CPU tensors: they run under the interpreter only (conftest sets it without a GPU)
TRITON_MODULES = ["mac_triton.summary", "mac_triton.decode"]
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize(
    "name",
    MODULES + [pytest.param(m, marks=pytest.mark.skipif(not INTERPRETER, reason="needs TRITON_INTERPRET=1")) for m in TRITON_MODULES],
)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0
