"""What the user holds: modules whose sizes never change, per-module width limits, the scope that may change.

A group resizes every parameter it has a site in; its *modules* are those parameters' owners (the parameter
name without its last part). A pattern names a module (``"lm_head"``, and then every module inside it:
``"transformer.h.0"`` covers ``transformer.h.0.mlp.c_fc``), a parameter, or either by ``fnmatch``
(``"*.mlp.*"``, ``"layer1.?.conv2"``). ``Hold``:

- ``keep``: a group touching a kept module is frozen (``reason`` "held: keep '<pattern>'"): that module's
  sizes never change (keeping ``lm_head`` keeps the hidden size, its input);
- ``only``: a group may change only if every module it touches matches ``only`` (``only=["*.mlp.*"]`` moves
  the MLPs' inner widths, never the hidden size, which attention shares); the others are frozen;
- ``min_width`` / ``max_width``: pattern -> channels (an ``int``) or a fraction of the group's width (a
  ``float``), on every group touching a matching module (the tightest wins); ``Group.min_units`` /
  ``max_units`` carry them to ``fxadapt.planning.solver.unit_bounds`` and the searches' supernets.

``apply_hold(analysis, hold)`` returns the analysis with those groups replaced (``Analysis.hold`` records the
hold so an analysis made again, a search's supernet, applies it too); every strategy sees the same groups.
A pattern that matches no module is an ``InputError`` listing some names to use (``module_names``).

Example:
    >>> import torch, fxadapt
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 4, 1))
    >>> a = fxadapt.analyze(m, (torch.randn(1, 3, 4, 4),))
    >>> held = apply_hold(a, Hold(keep=("1",), min_width={"2": 0.5}))
    >>> [(g.name, g.prunable, g.reason, g.min_units) for g in held.groups][:2]
    [('0', False, "held: keep '1'", None), ('1', False, "held: keep '1'", None)]
    >>> apply_hold(a, Hold(keep=("head",)))
    Traceback (most recent call last):
    fxadapt.errors.InputError: keep: 'head' matches no module of the model; modules: 0, 1, 2
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from fxadapt.analysis.groups import Group
from fxadapt.errors import InputError

if TYPE_CHECKING:
    from fxadapt.analysis.analyze import Analysis


@dataclass(frozen=True)
class Hold:
    """Patterns of modules held (module docstring); empty: nothing held."""

    keep: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    min_width: dict = field(default_factory=dict)
    max_width: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.keep or self.only or self.min_width or self.max_width)


def aliases(a: Analysis) -> dict[str, tuple[str, ...]]:
    """Every name of each tensor of ``a``'s graph, keyed by the name the analysis reads it under (a tied
    ``lm_head.weight`` is read as ``transformer.wte.weight``)."""
    by_id: dict[int, list[str]] = {}
    for name, t in [*a.gm.named_parameters(remove_duplicate=False),
                    *a.gm.named_buffers(remove_duplicate=False)]:
        by_id.setdefault(id(t), []).append(name)
    return {names[0]: tuple(names) for names in by_id.values()}


def _owner(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


def group_modules(g: Group, names: dict[str, tuple[str, ...]] | None = None) -> tuple[list[str], list[str]]:
    """The modules and parameters ``g`` resizes (every name of a shared tensor, with ``names =
    aliases(a)``)."""
    params = list(dict.fromkeys(n for m in g.members if m.target
                                for n in (names or {}).get(m.target, (m.target,))))
    return list(dict.fromkeys(_owner(p) for p in params)), params


def matches(pattern: str, module: str, param: str | None = None) -> bool:
    """``pattern`` names ``module`` (or a module around it) or ``param``.

    >>> matches("transformer.h.0", "transformer.h.0.mlp.c_fc"), matches("*.mlp.*", "h.1.mlp.c_fc")
    (True, True)
    >>> matches("h.1", "h.10.attn")
    False
    """
    inside = module == pattern or module.startswith(pattern + ".")
    return inside or fnmatchcase(module, pattern) or (param is not None and fnmatchcase(param, pattern))


def _touches(g: Group, pattern: str, names: dict) -> bool:
    return any(matches(pattern, _owner(p), p) for p in group_modules(g, names)[1])


def module_names(a: Analysis) -> list[str]:
    """Every module some group resizes, in graph order (the names ``keep`` / ``only`` / widths take)."""
    seen: dict[str, None] = {}
    names = aliases(a)
    for g in a.groups:
        for mod in group_modules(g, names)[0]:
            seen.setdefault(mod, None)
    return list(seen)


def _check(a: Analysis, hold: Hold, aka: dict) -> None:
    names = module_names(a)
    for option, patterns in (("keep", hold.keep), ("only", hold.only), ("min_width", list(hold.min_width)),
                             ("max_width", list(hold.max_width))):
        for pat in patterns:
            if not any(_touches(g, pat, aka) for g in a.groups):
                shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all: fxadapt inspect lists them)"
                                                 if len(names) > 12 else "")
                raise InputError(f"{option}: {pat!r} matches no module of the model; modules: {shown}")


def _units(g: Group, value, option: str, pattern: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise InputError(f"{option}[{pattern!r}] must be a channel count (int >= 1) or a fraction of the "
                         f"width (float > 0); got {value!r}")
    channels = value * g.width if isinstance(value, float) else value
    return max(1, math.ceil(channels / g.granularity))


def _limited(g: Group, hold: Hold, aka: dict) -> Group:
    lo = [_units(g, v, "min_width", p) for p, v in hold.min_width.items() if _touches(g, p, aka)]
    hi = [_units(g, v, "max_width", p) for p, v in hold.max_width.items() if _touches(g, p, aka)]
    lo_u, hi_u = (max(lo) if lo else None), (min(hi) if hi else None)
    if lo_u is not None and hi_u is not None and lo_u > hi_u:
        raise InputError(f"min_width and max_width leave group {g.name!r} no width: at least "
                         f"{lo_u * g.granularity} and at most {hi_u * g.granularity} channels")
    return dataclasses.replace(g, min_units=lo_u, max_units=hi_u) if lo or hi else g


def apply_hold(a: Analysis, hold: Hold | None):
    """``a`` with the held groups frozen and the width limits on the others (module docstring)."""
    if not hold:
        return a
    aka = aliases(a)
    _check(a, hold, aka)
    groups = []
    for g in a.groups:
        why = next((f"held: keep {p!r}" for p in hold.keep if _touches(g, p, aka)), None)
        inside = all(any(matches(p, _owner(prm), prm) for p in hold.only) for prm in group_modules(g)[1])
        if why is None and hold.only and not inside:
            why = "held: outside only=" + ", ".join(map(repr, hold.only))
        if why is not None and g.prunable:
            g = dataclasses.replace(g, prunable=False, reason=why)
        groups.append(_limited(g, hold, aka) if g.prunable else g)
    return dataclasses.replace(a, groups=groups, hold=hold)


def held_groups(a: Analysis) -> list[dict]:
    """What ``a``'s hold did, for the report: every held group and every width limit (name, width, why)."""
    out = []
    for g in a.groups:
        if g.reason and g.reason.startswith("held:"):
            out.append({"group": g.name, "width": g.width, "held": g.reason.removeprefix("held: ")})
        elif g.min_units is not None or g.max_units is not None:
            lim = {k: v * g.granularity for k, v in (("min", g.min_units), ("max", g.max_units))
                   if v is not None}
            out.append({"group": g.name, "width": g.width,
                        "held": ", ".join(f"{k} {v}" for k, v in lim.items())})
    return out
