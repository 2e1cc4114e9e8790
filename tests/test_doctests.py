"""Every public docstring example runs (module docstrings state the math and carry runnable examples)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import fxadapt.passes
import pytest

import fxadapt

MODULES = sorted(
    [f"fxadapt.{m.name}" for m in pkgutil.iter_modules(fxadapt.__path__)]
    + [f"fxadapt.rules.{m.name}" for m in pkgutil.iter_modules(importlib.import_module("fxadapt.rules").__path__)]
    + [f"fxadapt.passes.{m.name}" for m in pkgutil.iter_modules(fxadapt.passes.__path__)]
)


@pytest.mark.parametrize("name", [m for m in MODULES if m != "fxadapt.__main__"])
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
