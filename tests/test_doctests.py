"""Every public docstring example runs (module docstrings state the math and carry runnable examples)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import fxadapt.passes
import pytest

import fxadapt

MODULES = sorted({m.name for m in pkgutil.walk_packages(fxadapt.__path__, "fxadapt.")}
                 | {m.name for m in pkgutil.walk_packages(fxadapt.passes.__path__, "fxadapt.passes.")})


def test_every_subpackage_is_walked():
    """The walk reaches every pipeline folder (a missing ``__init__`` would silently skip its doctests)."""
    assert {"fxadapt.ops.registry", "fxadapt.passes.materialize", "fxadapt.cli.adapt"} <= set(MODULES)


@pytest.mark.parametrize("name", [m for m in MODULES if m != "fxadapt.__main__"])
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
