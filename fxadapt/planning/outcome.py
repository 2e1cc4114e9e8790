"""What a planning strategy produced, typed: the ``Outcome`` (the graph the plan applies to, the plan, what
the report says about it), the ``Binding`` constraint and the ``Latency`` a latency solve measured.

The verifier (``fxadapt.checks.verify.check_goal``) reads them, the report renders them
(``Outcome.history_entries``: the first history entry, as before), re-planning adds its ties and notes.

>>> o = Outcome(None, None, None, align=8, binding=Binding.PARAMS, params=1e6)
>>> o.history_entries()
({'align': 8, 'binding': 'params', 'params': 1000000.0},)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from torch.fx import GraphModule

from fxadapt.analysis import Analysis
from fxadapt.planning.plan import Plan


class Binding(str, Enum):
    """Which constraint decided the widths (where a budget has more than one)."""

    MACS = "macs"
    PARAMS = "params"
    LATENCY = "latency"


@dataclass(frozen=True)
class Latency:
    """A latency solve's measurement on the target (seconds): the adapted model, the budget, the original."""

    measured: float
    budget: float
    base: float


@dataclass(frozen=True)
class Outcome:
    """What a strategy produced: the graph the plan applies to, the plan, the analysis it refers to, the
    search's own history, the inserted depth slots, whether the change preserves the function; and, typed,
    what the report's first history entry says (``history_entries``): the alignment used, the binding
    constraint, the parameter count a params solve reached, the latency measured, the groups grown under a
    norm, the write-back ties and their notes, the output error of a non-preserving growth."""

    base: GraphModule
    plan: Plan
    analysis: Analysis
    history: tuple = ()
    slots: frozenset = frozenset()
    preserving: bool = False
    align: int | None = None
    binding: Binding | None = None
    params: float | None = None
    latency: Latency | None = None
    searched: str = ""
    grown_under_norm: tuple[str, ...] = ()
    ties: tuple[tuple[str, ...], ...] = ()
    notes: tuple[str, ...] = ()
    function_error: float | None = None

    def history_entries(self) -> tuple:
        """The report's history: the typed fields as its first entry (when a solve set any), then
        ``history``."""
        head: dict = {}
        if self.align is not None:
            head["align"] = self.align
        if self.latency is not None:
            head |= {"latency_s": self.latency.measured, "latency_budget_s": self.latency.budget,
                     "latency_base_s": self.latency.base}
        if self.binding is not None:
            head["binding"] = self.binding.value
        if self.searched:
            head["searched"] = self.searched
        if self.params is not None:
            head["params"] = self.params
        if self.grown_under_norm:
            head["grown_under_norm"] = list(self.grown_under_norm)
        if self.function_error is not None:
            head["function_error"] = self.function_error
        if self.ties:
            head |= {"ties": [list(t) for t in self.ties], "note": "re-planned: " + "; ".join(self.notes)}
        return ((head,) if head else ()) + tuple(self.history)
