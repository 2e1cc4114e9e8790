"""Budgets: what the caller asks for, and the warning when the model cannot hit it exactly.

A budget is a MAC (and optionally parameter) target. ``parse_budget`` accepts a float (fraction of the
original MACs: 0.5 halves, 1.5 grows), a string (``"50%"``, ``"300M"``, ``"1.2G"`` MACs) or
``Budget(macs=..., params=...)`` whose numbers are fractions when at most ``FRACTION_MAX`` and absolute
counts otherwise.

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

from fxadapt.errors import BudgetError
from fxadapt.planning.solver import TOL, SolveConfig, check_window, fit, in_window, reachable, solve_widths

__all__ = ["FRACTION_MAX", "TOL", "Budget", "BudgetWarning", "SolveConfig", "check_window", "fit", "in_window",
           "parse_budget", "reachable", "solve_widths"]

FRACTION_MAX = 16.0
_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


class BudgetWarning(UserWarning):
    """The widths returned miss the ``tol`` window (the groups are too coarse) but lie on the right side of
    the budget; the message says how far. ``warnings.simplefilter("error", BudgetWarning)`` or
    ``SolveConfig(strict=True)`` turns it into a refusal.

    >>> issubclass(BudgetWarning, UserWarning)
    True
    """


@dataclass(frozen=True)
class Budget:
    """A compute target: ``macs`` (and/or ``params``), fractions if <= 16, absolute counts otherwise.

    >>> Budget(macs=0.5).resolve(1e9, 1e6)
    Budget(macs=500000000.0, params=None)
    """

    macs: float | None = None
    params: float | None = None

    def resolve(self, base_macs: float, base_params: float) -> Budget:
        return Budget(_absolute(self.macs, base_macs, "macs"), _absolute(self.params, base_params, "params"))


def _number(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BudgetError(f"budget {what} must be a number, got {type(v).__name__} {v!r}")
    if not math.isfinite(v) or v <= 0:
        raise BudgetError(f"budget {what} must be a finite number > 0, got {v!r}")
    return float(v)


def _absolute(v, base: float, what: str) -> float | None:
    if v is None:
        return None
    v = _number(v, what)
    return v * base if v <= FRACTION_MAX else v


def parse_budget(budget, base_macs: float, base_params: float) -> Budget:
    """Absolute targets from any accepted budget form (see module docstring).

    >>> parse_budget("50%", 2e9, 1e6).macs, parse_budget("300M", 2e9, 1e6).macs, parse_budget(1.5, 2e9, 1e6).macs
    (1000000000.0, 300000000.0, 3000000000.0)
    """
    if isinstance(budget, Budget):
        if budget.macs is None and budget.params is None:
            raise BudgetError("Budget needs macs= or params=")
        return budget.resolve(base_macs, base_params)
    if isinstance(budget, str):
        text = budget.strip().upper().replace(" ", "")
        if m := re.fullmatch(r"([0-9]*\.?[0-9]+)%", text):
            return Budget(_number(float(m.group(1)) / 100, "percentage") * base_macs)
        if m := re.fullmatch(r"([0-9]*\.?[0-9]+(?:E[+-]?[0-9]+)?)([KMGT]?)(?:MACS?)?", text):
            value = _number(float(m.group(1)), "string")
            return Budget(value * _SUFFIX[m.group(2)] if m.group(2) or value > FRACTION_MAX else value * base_macs)
        raise BudgetError(f"cannot read budget {budget!r}: use a fraction (0.5), a percentage ('50%') "
                          f"or MACs with a suffix ('300M', '1.2G')")
    return Budget(_number(budget, "fraction") * base_macs)
