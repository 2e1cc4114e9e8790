"""Readable tables: the analysis summary (groups and blocks)."""

from __future__ import annotations

from dataclasses import dataclass


def table(headers: list[str], rows: list[list]) -> str:
    """A plain-text table with right-aligned numbers.

    >>> print(table(["a", "b"], [[1, "x"]]))
    a  b
    -  -
    1  x
    """
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if _num(c) and k else c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def _num(s: str) -> bool:
    return s.replace(".", "", 1).replace(",", "").replace("%", "").replace("-", "", 1).isdigit()


def human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return f"{n:.0f}"


def analysis_table(a) -> str:
    rows = [[g.id, g.name[:48], g.width, g.granularity, len(g.members), f"{100 * g.macs_share:.1f}%",
             "prunable" if g.prunable else f"frozen: {g.reason}"] for g in a.groups]
    out = [f"MACs {human(a.macs())}  params {human(a.params())}  groups {len(a.groups)} "
           f"({len(a.prunable)} prunable)  blocks {len(a.blocks)} "
           f"({sum(b.removable for b in a.blocks)} removable)", "",
           table(["id", "group", "width", "gran", "members", "MACs share", "state"], rows)]
    if a.blocks:
        brows = [[b.id, b.entry, b.exit, len(b.body), "yes" if b.removable else "no",
                  "yes" if b.repeatable else "no", b.reason or ""] for b in a.blocks]
        out += ["", table(["id", "entry", "exit", "body ops", "removable", "repeatable", "note"], brows)]
    return "\n".join(out)


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

    @staticmethod
    def build(a, outcome, out, target, macs: float, strategy: str, seconds: float) -> Report:
        """``a``: the original model's analysis; ``outcome``: what the strategy produced."""
        before = {g.producer: g.width for g in a.groups}
        pa, plan = outcome.analysis, outcome.plan
        groups = tuple(GroupChange(g.id, g.name, before.get(g.producer, 0),
                                   plan.units.get(g.id, g.units) * g.granularity) for g in pa.groups)
        blocks = {b.id: b for b in pa.blocks}
        removed = tuple(blocks[b].exit for b in sorted(plan.remove) if b not in outcome.slots)
        added = tuple(blocks[b].exit for b in sorted(outcome.slots) if b not in plan.remove)
        added += tuple(f"{blocks[b].exit} x{k}" for b, k in sorted(plan.repeat.items()))
        return Report(strategy, a.macs(), macs, target.macs, a.params(),
                      float(sum(p.numel() for p in out.parameters())), target.params, groups,
                      removed, added, seconds, tuple(outcome.history))

    def table(self) -> str:
        head = table(["", "before", "after", "target", "ratio"], [
            ["MACs", human(self.macs_before), human(self.macs_after), human(self.macs_target),
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
        if self.blocks_removed or self.blocks_added:
            lines.append(f"blocks removed: {list(self.blocks_removed)}  added: {list(self.blocks_added)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def attach(model, report: Report):
    model.fxadapt_report = report
    return model


def report(model) -> Report:
    """The ``Report`` of a model returned by ``fxadapt.transform``."""
    rep = getattr(model, "fxadapt_report", None)
    if rep is None:
        raise ValueError("this model was not produced by fxadapt.transform (it carries no report)")
    return rep
