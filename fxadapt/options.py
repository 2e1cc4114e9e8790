"""Option dataclasses that check themselves: a bad option fails where it is written, in one line naming the
field, the value given and the values allowed.

A config class derives from ``Options`` (a frozen dataclass on top): a field annotated ``Literal[...]``
takes exactly those values (checked in ``__post_init__``); a keyword that is no field is refused with the
valid ones listed, and ``moved`` (a class attribute, field name -> hint) says where an option that moved
now lives. ``error`` (a class attribute) is the ``FxAdaptError`` subclass raised.

Example:
    >>> from dataclasses import dataclass
    >>> from typing import Literal
    >>> @dataclass(frozen=True)
    ... class Demo(Options):
    ...     kind: Literal["a", "b"] = "a"
    ...     moved = {"size": "pass size={value!r} to the caller"}
    >>> Demo(kind="c")
    Traceback (most recent call last):
    fxadapt.errors.InputError: Demo.kind must be one of 'a', 'b'; got 'c'
    >>> Demo(size=3)
    Traceback (most recent call last):
    fxadapt.errors.InputError: unknown Demo option 'size': pass size=3 to the caller; valid: kind
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import typing
from typing import Any, ClassVar, Literal

import torch

from fxadapt.errors import FxAdaptError, InputError

# SearchConfig / FurConfig keywords that live on the transform: one source, TransformConfig.device /
# .precision
RUN_OPTIONS = {
    "device": "where a search runs is set once, on the transform: fxadapt.transform(..., device={value!r}) "
              "or fxadapt.TransformConfig(device={value!r}) (dna()/fur() called directly: "
              "ctx=fxadapt.dist.setup({value!r}))",
    "precision": "the search's precision is set once, on the transform: fxadapt.transform(..., "
                 "precision={value!r}) or fxadapt.TransformConfig(precision={value!r}) (dna()/fur() called "
                 "directly: ctx=fxadapt.dist.setup(device, {value!r}))",
}


class Options:
    """Base of fxadapt's option dataclasses (see module docstring)."""

    error: ClassVar[type[FxAdaptError]] = InputError
    moved: ClassVar[dict[str, str]] = {}
    hints: ClassVar[dict[str, str]] = {}     # field -> what its values mean, appended to a refusal

    def __new__(cls, *args: Any, **kwargs: Any):
        valid = [f.name for f in dataclasses.fields(typing.cast(Any, cls))]   # a dataclass subclass
        if set(kwargs) - set(valid):
            raise cls.error(unknown_options(cls.__name__, kwargs, valid, cls.moved))
        return super().__new__(cls)

    def __post_init__(self) -> None:
        cls: type[Options] = type(self)
        for name, allowed in literal_fields(typing.cast(type, cls)).items():
            value = getattr(self, name)
            if value not in allowed:
                hint = cls.hints.get(name)
                raise cls.error(f"{cls.__name__}.{name} must be one of {', '.join(map(repr, allowed))}; got "
                                f"{value!r}" + (f" ({hint})" if hint else ""))

    def check(self, ok: bool, field: str, requirement: str) -> None:
        """Raise ``error`` naming ``field``, its value and ``requirement`` unless ``ok``."""
        if not ok:
            raise self.error(f"{type(self).__name__}.{field} must be {requirement}; got "
                             f"{getattr(self, field)!r}")


def check_device(owner: str, device: str, error: type[FxAdaptError] = InputError) -> None:
    """``device`` names a CPU or CUDA device (``"cpu"``, ``"cuda"``, ``"cuda:N"``); whether this machine has
    it is checked where the work starts.

    >>> check_device("Demo", "tpu9")
    Traceback (most recent call last):
    fxadapt.errors.InputError: Demo.device: unknown device 'tpu9'; use 'cpu' or 'cuda' (or 'cuda:N')
    """
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise error(f"{owner}.device: unknown device {device!r}; use 'cpu' or 'cuda' (or 'cuda:N')")


def unknown_options(owner: str, given: dict, valid: list[str], moved: dict[str, str]) -> str:
    """One line: the unknown keywords of ``given``, where the moved ones live now, and the valid ones."""
    unknown = sorted(set(given) - set(valid))
    hints = [moved[k].format(value=given[k]) for k in unknown if k in moved]
    names = ", ".join(repr(k) for k in unknown)
    return (f"unknown {owner} option{'s' if len(unknown) > 1 else ''} {names}: " + "; ".join(hints)
            + ("; " if hints else "") + "valid: " + ", ".join(valid))


@functools.cache
def literal_fields(cls: type) -> dict[str, tuple]:
    """The fields of dataclass ``cls`` annotated ``Literal[...]``, with their values (annotations resolved
    in the module that defines the class)."""
    ns = vars(sys.modules[cls.__module__]) if cls.__module__ in sys.modules else {}
    out = {}
    for f in dataclasses.fields(cls):
        t = f.type
        if isinstance(t, str):
            try:
                t = eval(t, dict(ns))  # noqa: S307  (a dataclass annotation, as typing.get_type_hints does)
            except (NameError, AttributeError, TypeError, SyntaxError):
                continue
        if typing.get_origin(t) is Literal:
            out[f.name] = typing.get_args(t)
    return out
