"""Which source lines are the user's: one rule for every message that points at the user's code.

A frame is the user's when its file exists, is no ``<string>`` / ``<doctest>`` source, and lies outside
fxadapt (this package and ``passes/``, by their directories: a user's own checkout whose path merely
contains "fxadapt" is the user's), torch and the standard library. Installed packages (``site-packages``)
are the user's only where the question is the *model's* code (``packages=True``: a ``transformers``
forward that reads a size, a capture failure), not where it is a callable the user passed (the runner: a
library the user did not write raising is not the user's bug).

>>> try:
...     {}["missing"]
... except KeyError as e:
...     where = user_frame(e.__traceback__)
>>> where is None   # a doctest's frame is no file
True
"""

from __future__ import annotations

import os
import traceback
from types import TracebackType

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
LIBRARY = tuple(d + os.sep for d in (_HERE, os.path.join(os.path.dirname(_HERE), "passes"),
                                     os.path.dirname(os.path.abspath(torch.__file__)),
                                     os.path.dirname(os.path.abspath(os.__file__))))


def is_user_path(filename: str, packages: bool = False) -> bool:
    """Whether ``filename`` is the user's code (module docstring)."""
    if filename.startswith("<"):
        return False
    path = os.path.abspath(filename)
    return (not path.startswith(LIBRARY) and (packages or "site-packages" not in path)
            and os.path.exists(path))


def user_frame(tb: TracebackType | None, innermost: bool = False,
               packages: bool = False) -> traceback.FrameSummary | None:
    """The innermost frame of ``tb`` that is the user's (``innermost``: only when the innermost frame of all
    is: the user's own callable raised; ``packages``: module docstring), else None."""
    frames = traceback.extract_tb(tb) if tb is not None else []
    if innermost:
        frames = frames[-1:]
    return next((f for f in reversed(frames) if is_user_path(f.filename, packages)), None)


def where(f: traceback.FrameSummary, source: bool = False) -> str:
    """``file:line in function`` (``source``: the full path and the line's text too)."""
    if source:
        return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
    return f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}"
