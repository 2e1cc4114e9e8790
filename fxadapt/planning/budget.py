"""Budgets: what the caller asks for, and the warning when the model cannot hit it exactly.

A budget is a MAC, parameter and/or latency target. ``parse_budget`` accepts a float (fraction of the
original MACs: 0.5 halves, 1.5 grows), a string (``"50%"``, ``"300M"``, ``"1.2G"`` MACs) or
``Budget(macs=..., params=..., latency=..., target=...)``: a MAC or parameter *number* is a fraction of the
original (``macs=0.5``), a *string* is a count (``macs="300M"``, ``params="1.2M"``) or a percentage
(``"50%"``), and ``macs_abs=`` / ``params_abs=`` take counts as numbers; a number above ``FRACTION_MAX``
in ``macs=``/``params=`` is refused (it would be a ``300000000x`` budget: write ``"300M"``); ``latency`` is a
fraction of the original's latency measured on ``target`` (a number, e.g. ``0.5``) or a duration string
(``"3.2ms"``, ``"800us"``, ``"0.01s"``), ``target`` a ``fxadapt.hw.Target`` (default: onnxruntime CPU, one
thread). Every constraint given must hold; latency budgets are solved by
``fxadapt.planning.latency.solve_latency``.

The width solver lives in ``fxadapt.planning.solver`` (re-exported here: ``SolveConfig``, ``solve_widths``,
``fit``, ``reachable``, ``in_window``, ``check_window``, ``TOL``): MACs land in ``[(1 - tol) T, T]`` when
shrinking and ``[T, (1 + tol) T]`` when growing. When the groups are too coarse for that window it returns
the closest widths on the right side of ``T`` and warns with ``BudgetWarning`` (or raises ``BudgetError``
with ``SolveConfig(strict=True)``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from fxadapt.errors import (
    BudgetError,
    BudgetWarning,  # noqa: F401  (defined in fxadapt.errors)
)
from fxadapt.planning.solver import TOL, SolveConfig, check_window, fit, in_window, reachable, solve_widths

__all__ = ["FRACTION_MAX", "TOL", "Budget", "Goal", "BudgetWarning", "SolveConfig", "check_window", "fit",
           "in_window", "latency_seconds", "parse_budget", "reachable", "solve_widths"]

FRACTION_MAX = 16.0
_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


@dataclass(frozen=True)
class Budget:
    """A compute target: ``macs`` and/or ``params`` (a number is a fraction of the original, a string a count
    such as ``"300M"`` or a percentage; ``macs_abs``/``params_abs`` counts as numbers) and/or ``latency`` on
    ``target`` (a fraction of the original's latency, or ``"3.2ms"``); all given must hold.

    >>> Budget(macs=0.5).resolve(1e9, 1e6).macs, Budget(macs="300M").resolve(1e9, 1e6).macs
    (500000000.0, 300000000.0)
    >>> Budget(macs_abs=2e8, params="50%").resolve(1e9, 1e6)
    Goal(macs=200000000.0, params=500000.0, latency=None, target=None)
    >>> Budget(macs=3e8)
    Traceback (most recent call last):
    ...
    fxadapt.errors.BudgetError: Budget(macs=300000000.0): a number is a fraction of the original (300000000x);
    for a count write macs='300000000' (or '300M') or macs_abs=300000000.0
    """

    macs: float | str | None = None
    params: float | str | None = None
    latency: float | str | None = None
    target: object = None
    macs_abs: float | None = None
    params_abs: float | None = None

    def __post_init__(self):
        for what in ("macs", "params"):
            v, a = getattr(self, what), getattr(self, f"{what}_abs")
            if v is not None and a is not None:
                raise BudgetError(f"give {what}= or {what}_abs=, not both")
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > FRACTION_MAX:
                raise BudgetError(f"Budget({what}={v!r}): a number is a fraction of the original ({v:.0f}x); "
                                  f"for a count write {what}='{v:.0f}' (or '{_human(v)}') or "
                                  f"{what}_abs={float(v)!r}")
        if self.latency is not None:
            latency_seconds(self.latency, 1.0)  # validates the form
        if self.target is not None and not hasattr(self.target, "align"):
            raise BudgetError(f"Budget target must be a fxadapt.hw.Target, got {type(self.target).__name__}")

    def resolve(self, base_macs: float, base_params: float) -> Goal:
        """The counts this budget asks for, given the original's MACs and parameters."""
        macs = _number(self.macs_abs, "macs_abs") if self.macs_abs is not None \
                else _absolute(self.macs, base_macs, "macs")
        params = (_number(self.params_abs, "params_abs") if self.params_abs is not None
                  else _absolute(self.params, base_params, "params"))
        return Goal(macs, params, self.latency, self.target)


@dataclass(frozen=True)
class Goal:
    """A resolved budget: MACs and parameters as counts (``None``: not asked), the latency budget as given and
    its hardware ``target`` (what the pipeline steps read)."""

    macs: float | None = None
    params: float | None = None
    latency: float | str | None = None
    target: object = None


def _human(v: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if v >= div:
            return f"{v / div:g}{unit}"
    return f"{v:g}"


_TIME = {"S": 1.0, "MS": 1e-3, "US": 1e-6, "µS": 1e-6, "NS": 1e-9}


def latency_seconds(value: float | str, base: float) -> float:
    """Seconds of a latency budget: a number is a fraction of ``base`` (the original's latency), a string a
    duration with unit ``s``, ``ms``, ``us`` or ``ns``.

    >>> latency_seconds(0.5, 0.02), latency_seconds("3.2ms", 0.02), latency_seconds(" 250 us", 0.02)
    (0.01, 0.0032, 0.00025)
    """
    if isinstance(value, str):
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:E[+-]?[0-9]+)?)(S|MS|US|µS|NS)",
                         value.strip().upper().replace(" ", ""))
        if not m:
            raise BudgetError(f"cannot read latency budget {value!r}: use a fraction of the original's "
                              f"latency (0.5) or a duration ('3.2ms', '800us', '0.01s')")
        return _number(float(m.group(1)), "latency") * _TIME[m.group(2)]
    v = _number(value, "latency")
    if v > FRACTION_MAX:
        raise BudgetError(f"latency budget {value!r} is not a fraction of the original's latency; give a "
                          f"duration string such as '3.2ms'")
    return v * base


def _number(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BudgetError(f"budget {what} must be a number, got {type(v).__name__} {v!r}")
    if not math.isfinite(v) or v <= 0:
        raise BudgetError(f"budget {what} must be a finite number > 0, got {v!r}")
    return float(v)


def _absolute(v, base: float, what: str) -> float | None:
    """A fraction times ``base``; a string as ``parse_budget`` reads it with ``base`` (counts,
    percentages)."""
    if v is None:
        return None
    if isinstance(v, str):
        text = v.strip().upper().replace(" ", "")
        if m := re.fullmatch(r"([0-9]*\.?[0-9]+)%", text):
            return _number(float(m.group(1)) / 100, what) * base
        if m := re.fullmatch(r"([0-9]*\.?[0-9]+(?:E[+-]?[0-9]+)?)([KMGT]?)(?:MACS?|PARAMS?)?", text):
            return _number(float(m.group(1)), what) * _SUFFIX[m.group(2)]
        raise BudgetError(f"cannot read {what}={v!r}: use a count ('300M', '1.2G', '250000') or a percentage "
                          "('50%')")
    return _number(v, what) * base


def parse_budget(budget: Budget | str | float, base_macs: float, base_params: float) -> Goal:
    """Absolute targets from any accepted budget form (see module docstring).

    >>> parse_budget("50%", 2e9, 1e6).macs, parse_budget("300M", 2e9, 1e6).macs, parse_budget(1.5, 2e9,
    ...                                                                                       1e6).macs
    (1000000000.0, 300000000.0, 3000000000.0)
    """
    if isinstance(budget, Budget):
        if all(v is None
               for v in (budget.macs, budget.params, budget.latency, budget.macs_abs, budget.params_abs)):
            raise BudgetError("Budget needs macs=, params= or latency= (or macs_abs= / params_abs= counts)")
        return budget.resolve(base_macs, base_params)
    if isinstance(budget, str):
        text = budget.strip().upper().replace(" ", "")
        if m := re.fullmatch(r"([0-9]*\.?[0-9]+)%", text):
            return Goal(_number(float(m.group(1)) / 100, "percentage") * base_macs)
        if m := re.fullmatch(r"([0-9]*\.?[0-9]+(?:E[+-]?[0-9]+)?)([KMGT]?)(?:MACS?)?", text):
            value = _number(float(m.group(1)), "string")
            return Goal(value * _SUFFIX[m.group(2)] if m.group(2) or value > FRACTION_MAX
                        else value * base_macs)
        raise BudgetError(f"cannot read budget {budget!r}: use a fraction (0.5), a percentage ('50%') "
                          f"or MACs with a suffix ('300M', '1.2G')")
    return Goal(_number(budget, "fraction") * base_macs)
