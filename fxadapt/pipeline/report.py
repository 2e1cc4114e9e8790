"""The ``Report`` of a transform: what ``fxadapt.pipeline.transform`` attaches to the model it returns
(``fxadapt.report(model)``): widths per group, blocks, MACs/params before/after/target, the history (its
first entry rendered from the typed ``Outcome``: ``Outcome.history_entries``), step timings. Saved and
loaded as plain data (``to_dict`` / ``from_dict``: ``fxadapt.export.save``); re-exported by
``fxadapt.export.report``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fxadapt.analysis.hold import held_groups
from fxadapt.analysis.summary import human, table

if TYPE_CHECKING:
    from torch import nn

    from fxadapt.analysis.analyze import Analysis


@dataclass(frozen=True)
class GroupChange:
    id: int
    name: str
    before: int
    after: int


@dataclass(frozen=True)
class Report:
    """What ``transform`` did: widths per group, blocks, MACs/params before/after/target, history."""

    strategy: str
    macs_before: float
    macs_after: float
    macs_target: float
    params_before: float
    params_after: float
    params_target: float | None
    groups: tuple[GroupChange, ...]
    blocks_removed: tuple[str, ...] = ()
    blocks_added: tuple[str, ...] = ()
    seconds: float = 0.0
    history: tuple = ()
    timings: tuple = ()          # (pipeline step, seconds) in the order the steps ran
    returned: str = ""           # "module" (the user's class), "graph", "exported_program"
    dynamic: tuple = ()          # graph outputs: per input, the axes left free ((name, (0, 1)), ...)
    write_back: str = ""         # why the plan could not be written back into the user's modules, if not
    # what keep= / only= / min_width= / max_width= held: {"group", "width", "held"}
    held: tuple = ()
    # transform(recovery=W): search_steps + recovery_steps = total, lr, schedule (fxadapt.pipeline.recovery)
    recovery: dict | None = None

    @staticmethod
    def build(a: Analysis, outcome, out, goal, macs: float) -> Report:
        """``a``: the original model's analysis; ``outcome``: what the strategy produced; ``out``: the
        adapted model, of ``macs`` MACs; ``goal``: the resolved budget (``fxadapt.planning.budget.Goal``).
        What the run itself was (``strategy``, ``seconds``, ``timings``, ...) is the caller's to fill in
        (``dataclasses.replace``)."""
        pa, plan = outcome.analysis, outcome.plan
        if pa is a:  # the plan refers to the original groups themselves
            before = {g.id: g.width for g in a.groups}
            key = lambda g: g.id  # noqa: E731
        else:  # a rewritten graph's groups (a supernet): matched by their producer parameter and axis
            before = {g.producer: g.width for g in a.groups}
            key = lambda g: g.producer  # noqa: E731
        groups = tuple(GroupChange(g.id, g.name, before.get(key(g), 0),
                                   plan.units.get(g.id, g.units) * g.granularity) for g in pa.groups)
        blocks = {b.id: b for b in pa.blocks}
        removed = tuple(blocks[b].exit for b in sorted(plan.remove) if b not in outcome.slots)
        added = tuple(blocks[b].exit for b in sorted(outcome.slots) if b not in plan.remove)
        added += tuple(f"{blocks[b].exit} x{k}" for b, k in sorted(plan.repeat.items()))
        return Report("", a.macs(), macs, goal.macs, a.params(),
                      float(sum(p.numel() for p in out.parameters())), goal.params, groups,
                      removed, added, history=outcome.history_entries(), held=tuple(held_groups(a)))

    def table(self) -> str:
        head = table(["", "before", "after", "target", "ratio"], [
            ["MACs", human(self.macs_before), human(self.macs_after),
             human(self.macs_target) if self.macs_target else "-",
             f"{self.macs_after / self.macs_before:.3f}"],
            ["params", human(self.params_before), human(self.params_after),
             human(self.params_target) if self.params_target else "-",
             f"{self.params_after / self.params_before:.3f}"]])
        changed = [[c.id, c.name[:48], c.before, c.after, f"{c.after / c.before:.2f}" if c.before else "new"]
                   for c in self.groups if c.before != c.after]
        lines = [f"fxadapt.transform ({self.strategy}, {self.seconds:.1f} s)", head, "",
                 f"{len(changed)} of {len(self.groups)} groups changed width"]
        if changed:
            lines.append(table(["id", "group", "before", "after", "x"], changed))
        first = self.history[0] if self.history else {}
        if isinstance(first, dict) and "latency_s" in first:
            lines.append(f"latency (measured on the target): before {1e3 * first['latency_base_s']:.3f} ms, "
                         f"after {1e3 * first['latency_s']:.3f} ms, budget "
                         f"{1e3 * first['latency_budget_s']:.3f} ms "
                         f"({first['latency_s'] / first['latency_base_s']:.3f}x; {first['binding']} "
                         "binding)")
        last = self.history[-1] if self.history else {}
        if isinstance(last, dict) and last.get("gates"):
            lines.append("gates moved (expected units initial -> final, chosen): " + ", ".join(
                f"{m['group']}: {m['initial']}->{m['final']:.1f} ({m['chosen']})" for m in last["gates"]))
        if isinstance(last, dict) and last.get("note"):
            lines.append(f"note: {last['note']}")
        if self.held:
            lines.append(f"held ({len(self.held)} groups): " + ", ".join(
                f"{h['group']} ({h['held']})" for h in self.held[:8])
                + (" ..." if len(self.held) > 8 else ""))
        if self.recovery:
            r = self.recovery
            lines.append(f"recovery: {r['total']} weight steps = search {r['search_steps']} + fine-tune "
                         f"{r['recovery_steps']} (distilled from the original; {r['schedule']})")
        if self.blocks_removed or self.blocks_added:
            lines.append(f"blocks removed: {list(self.blocks_removed)}  added: {list(self.blocks_added)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        """Plain data (numbers, strings, lists, dicts) for ``fxadapt.export.save``; history entries that are
        not plain data are dropped.

        >>> r = Report("datafree", 4.0, 2.0, 2.0, 10.0, 5.0, None, (GroupChange(0, "conv", 8, 4),))
        >>> Report.from_dict(r.to_dict()) == r
        True
        """
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out = {k: v for k, v in out.items() if v is not _SKIP}    # a field that is not plain data: default
        out["groups"] = [dataclasses.astuple(g) for g in self.groups]
        out["blocks_removed"], out["blocks_added"] = list(self.blocks_removed), list(self.blocks_added)
        out["history"] = [p for p in map(_plain, self.history) if p is not _SKIP]
        return out

    @staticmethod
    def from_dict(d: dict) -> Report:
        """The ``Report`` that ``to_dict`` described."""
        known = {f.name: d[f.name] for f in dataclasses.fields(Report) if f.name in d}
        return Report(**{**known, "groups": tuple(GroupChange(*g) for g in d["groups"]),
                         "blocks_removed": tuple(d["blocks_removed"]),
                         "blocks_added": tuple(d["blocks_added"]), "history": tuple(d["history"]),
                         "held": tuple(d.get("held", ()))})


_SKIP = object()


def _plain(v):
    """``v`` as builtin types (numpy/torch scalars become ``float``/``int``), or ``_SKIP``."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, (int, float)) or (hasattr(v, "item") and getattr(v, "ndim", 1) == 0):
        return v.item() if hasattr(v, "item") else (int(v) if isinstance(v, int) else float(v))
    if isinstance(v, (list, tuple)):
        seq = [_plain(x) for x in v]
        return _SKIP if any(x is _SKIP for x in seq) else (seq if isinstance(v, list) else tuple(seq))
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        d = {k: _plain(x) for k, x in v.items()}
        return _SKIP if any(x is _SKIP for x in d.values()) else d
    return _SKIP


def attach(model: nn.Module, report: Report) -> nn.Module:
    model.fxadapt_report = report  # type: ignore[assignment]  # a plain attribute (Module types only its own)
    return model


def report(model: nn.Module) -> Report:
    """The ``Report`` of a model returned by ``fxadapt.transform``."""
    rep = getattr(model, "fxadapt_report", None)
    if rep is None:
        raise ValueError("this model was not produced by fxadapt.transform (it carries no report)")
    return rep
