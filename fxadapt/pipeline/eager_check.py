"""The budget of a graph result against the model as it runs eagerly.

``transform`` budgets and verifies MACs on the captured graph: the original's MACs are the captured
original's. A model whose eager forward takes another code path than its trace (a kernel-hub function that
falls back to a different reference implementation when not traced, a branch on ``torch.compiler``
state) runs other MACs eagerly, so a returned *graph* (write-back fallback) measured against the eager model
misses the budget by the difference (Qwen3-Next's gated delta-net: 1.50x of the captured original, 1.94x of
the eager one). That miss is never silent: a ``BudgetWarning`` gives both counts and both ratios. A module
result runs the model's own code again, on the same path as the eager original, and is not concerned.
"""

from __future__ import annotations

from typing import Any

from fxadapt.analysis.count import count_macs
from fxadapt.errors import BudgetWarning, warn

TOL = 0.01


def eager_gap(model: Any, called: Any, captured: float, result: float, tol: float = TOL) -> str:
    """The warning text when ``model`` run eagerly on ``called`` counts other MACs than ``captured`` (its
    captured graph's) by more than ``tol``; ``""`` when they agree or the eager count fails.

    >>> import torch
    >>> eager_gap(torch.nn.Linear(4, 3), (torch.randn(2, 4),), 24.0, 12.0)
    ''
    >>> eager_gap(torch.nn.Linear(4, 3), (torch.randn(2, 4),), 30.0, 15.0)[:40]
    'Linear runs 24 MACs eagerly but 30 as ca'
    """
    try:
        eager = count_macs(model, called)
    except Exception:  # noqa: BLE001 - the eager count is a diagnostic; the graph was verified
        return ""
    if not captured or not eager or abs(eager - captured) <= tol * captured:
        return ""
    return (f"{type(model).__name__} runs {eager:,.0f} MACs eagerly but {captured:,.0f} as captured (its "
            f"forward takes another code path when traced); the returned graph runs {result:,.0f} MACs: "
            f"{result / captured:.3f}x of the captured original, {result / eager:.3f}x of the model as it "
            f"runs eagerly")


def warn_eager_gap(model: Any, called: Any, captured: float, result: float) -> None:
    """``BudgetWarning`` with ``eager_gap``'s text, if any."""
    msg = eager_gap(model, called, captured, result)
    if msg:
        warn(msg, BudgetWarning)
