"""What a reachable-range refusal adds so the user knows why and what to do instead.

- above the widest model (``growth_note``): the ops that forbid function-preserving growth (a norm or
  reduction over the channels, interleaved layouts), grouped by reason, most MACs first, and the budget at
  which ``grow_depth=True`` copies the repeatable blocks (zero-initialised) instead;
- below the narrowest model (``floor_note``): the frozen channel groups and their reasons.

>>> import torch, fxadapt
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(1, 8), torch.nn.Conv2d(8, 4, 1))
>>> "group_norm" in growth_note(fxadapt.analyze(m, (torch.randn(1, 3, 8, 8),)))
True
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fxadapt.planning.plan import growth_blocker

if TYPE_CHECKING:
    from fxadapt.analysis.analyze import Analysis


def growth_note(a: Analysis) -> str:
    """Why growth stops where it does: the ops that forbid function-preserving growth (most MACs first), and
    what can still grow a model that widths cannot."""
    blocked: dict[str, list] = {}
    for g in sorted(a.prunable, key=lambda g: -getattr(g, "macs_share", 0.0)):
        why = growth_blocker(a, g)
        if why is not None:
            blocked.setdefault(why, []).append(g.name)
    if not blocked:
        return ""
    top = "; ".join(f"{', '.join(names[:2])}{f' (+{len(names) - 2} more)' if len(names) > 2 else ''}: {why}"
                    for why, names in list(blocked.items())[:2])
    rep = [b.id for b in a.blocks if b.repeatable]
    deeper = a.cost.macs({}, {b: 2.0 for b in rep}) / a.cost.macs() if rep else 1.0
    return (f"; {sum(map(len, blocked.values()))} of {len(a.prunable)} groups cannot grow "
            f"function-preservingly ({top}); "
            + (f"grow_depth=True with a budget of about {deeper:.2f}x copies its {len(rep)} repeatable "
                            f"block(s) (zero-initialised, function-preserving)" if rep else
                            "it has no repeatable block to copy either")
            + "; solve=SolveConfig(preserve=False) widens them anyway (not function-preserving; the output "
              "error is reported)")


def floor_note(a: Analysis) -> str:
    """What keeps the narrowest model from being smaller: the frozen groups' reasons (most common first)."""
    reasons: dict[str, list[str]] = {}
    for g in a.groups:
        if not g.prunable and g.reason:
            reasons.setdefault(g.reason, []).append(g.name)
    if not reasons:
        return ""
    top = sorted(reasons.items(), key=lambda kv: -len(kv[1]))[:3]
    return (f"; {sum(map(len, reasons.values()))} channel group(s) are frozen and keep their size: "
            + "; ".join(f"{names[0]}{f' (+{len(names) - 1} more)' if len(names) > 1 else ''}: {why}"
                        for why, names in top)
            + "; give a budget inside the range (fxadapt inspect lists every frozen group and why)")
