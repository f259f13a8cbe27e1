"""Every example in ganflow's docstrings runs and prints what it says (a stale example is a wrong doc)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import ganflow

MODULES = sorted(m.name for m in pkgutil.walk_packages(ganflow.__path__, "ganflow.")
                 if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed"


def test_a_stale_example_fails():
    import types

    stale = types.ModuleType("stale", "Example:\n    >>> 1 + 1\n    3\n")
    assert doctest.testmod(stale, report=False).failed == 1
