"""Readable tables: the analysis summary (groups and blocks)."""

from __future__ import annotations


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
