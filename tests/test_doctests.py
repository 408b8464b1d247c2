"""The examples in the docstrings run and print what they say (e.g. the band and tail lengths
of a concrete step in ``mac_ref.amend``)."""

import doctest
import importlib

import pytest

MODULES = ["mac_ref.amend"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0
