"""Packaging: every subpackage is listed in ``pyproject.toml``, and the built wheel carries every source file.

A subpackage missing from ``[tool.setuptools] packages`` works in an editable install and breaks
``pip install .`` (``ModuleNotFoundError`` on ``import fxadapt``); these tests catch it before CI's
non-editable install does.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _source_packages() -> dict[str, Path]:
    """Package name -> folder, for ``fxadapt/**`` and ``passes/`` (shipped as ``fxadapt.passes``)."""
    out = {}
    for init in sorted((ROOT / "fxadapt").rglob("__init__.py")):
        rel = init.parent.relative_to(ROOT)
        if "__pycache__" not in rel.parts:
            out[".".join(rel.parts)] = init.parent
    out["fxadapt.passes"] = ROOT / "passes"
    return out


def _source_files() -> dict[str, Path]:
    """Path inside the wheel -> source file, for every ``.py`` file of the packages."""
    files = {}
    for name, folder in _source_packages().items():
        for py in folder.glob("*.py"):
            files["/".join(name.split(".")) + "/" + py.name] = py
    return files


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(_setuptools()["packages"])
    assert set(_source_packages()) <= listed, sorted(set(_source_packages()) - listed)
    assert listed <= set(_source_packages()), sorted(listed - set(_source_packages()))
    assert _setuptools()["package-dir"]["fxadapt.passes"] == "passes"


def test_every_folder_with_python_files_is_a_package():
    for folder in [ROOT / "fxadapt", *(ROOT / "fxadapt").rglob("*"), ROOT / "passes"]:
        if folder.is_dir() and "__pycache__" not in folder.parts and any(folder.glob("*.py")):
            assert (folder / "__init__.py").exists(), f"{folder.relative_to(ROOT)} has no __init__.py"


@pytest.mark.slow
def test_wheel_carries_every_source_file(tmp_path):
    src = tmp_path / "src"
    for item in ("fxadapt", "passes", "pyproject.toml", "README.md"):
        copy = shutil.copytree if (ROOT / item).is_dir() else shutil.copy
        copy(ROOT / item, src / item, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                          if (ROOT / item).is_dir() else {}))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                           str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("fxadapt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(set(_source_files()) - names)
    assert not missing, missing
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fxadapt = fxadapt.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
