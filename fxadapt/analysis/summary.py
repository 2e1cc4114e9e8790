"""Readable tables: the analysis summary (groups and blocks; ``Analysis.summary``) and the plain-text table
the reports use.

The analysis table's "MACs elasticity" column is ``e_g = n_g * dMACs/dn_g / MACs`` for a group of width
``n_g``: widening the group by 1% raises the model's MACs by ``e_g`` %. It is not a share of a whole: a
group that scales two factors of one cost term (a depthwise conv's input and output channels, both
operands of a matmul) counts in both, so ``e_g`` can exceed 1 (quadratic in ``n_g``) and the column does
not sum to 1. A footnote under the table says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fxadapt.analysis.analyze import Analysis


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
        lines.append("  ".join(c.rjust(w) if _num(c) and k else c.ljust(w)
                               for c, w in zip(r, widths)).rstrip())
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


ELASTICITY_NOTE = ("MACs elasticity: % change of the model's MACs per 1% change of the group's width "
                   "(n * dMACs/dn / MACs); a group on both sides of an op (depthwise conv in+out, both "
                   "matmul operands) counts twice, so values can exceed 1 and do not sum to 1.")


def analysis_table(a: Analysis) -> str:
    """Groups (width, granularity, members, MACs elasticity, state) and blocks of an ``Analysis``.

    >>> import torch, fxadapt
    >>> dw = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 3, groups=8),
    ...                          torch.nn.Conv2d(8, 4, 1))
    >>> print(analysis_table(fxadapt.analyze(dw, (torch.randn(1, 3, 8, 8),))))  # doctest: +ELLIPSIS
    MACs ...
    id  group  width  gran  members  MACs elasticity  state
    --  -----  -----  ----  -------  ---------------  ...
     0  0          8     1  ...
    <BLANKLINE>
    MACs elasticity: % change of the model's MACs per 1% change ...
    """
    rows = [[g.id, g.name[:48], g.width, g.granularity, len(g.members), f"{g.macs_share:.3f}",
             "prunable" if g.prunable else f"frozen: {g.reason}"] for g in a.groups]
    out = [f"MACs {human(a.macs())}  params {human(a.params())}  groups {len(a.groups)} "
           f"({len(a.prunable)} prunable)  blocks {len(a.blocks)} "
           f"({sum(b.removable for b in a.blocks)} removable)", "",
           table(["id", "group", "width", "gran", "members", "MACs elasticity", "state"], rows), "",
           ELASTICITY_NOTE]
    if a.blocks:
        brows = [[b.id, b.entry, b.exit, len(b.body), "yes" if b.removable else "no",
                  "yes" if b.repeatable else "no", b.reason or ""] for b in a.blocks]
        out += ["", table(["id", "entry", "exit", "body ops", "removable", "repeatable", "note"], brows)]
    return "\n".join(out)
