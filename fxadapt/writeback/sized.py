"""Ints that remember how they were computed from named sizes, and a solver for the sizes they name.

A ``Sized`` is an ``int`` carrying a polynomial over names (``{monomial: coefficient}``, a monomial a sorted
tuple of names): ``Sized(16, {("d",): 1}) * Sized(2, {("h",): 1}) + 1`` is ``33`` with ``d*h + 1``. Sums,
differences, products and exact floor division by a plain int keep the polynomial; anything else gives a
plain ``int`` (the value is always the int's own).

``solve(equations, known)``: equations ``p(names) = v``; repeatedly, one whose unknown part is a single
degree-1 monomial ``c * x`` gives ``x = (v - rest) / c`` when that divides exactly; then every equation
with all names known must hold, else the system is inconsistent (``None``).

    >>> d, h = Sized(16, {("d",): 1}), Sized(2, {("h",): 1})
    >>> k = d * h * 2 + 1
    >>> int(k), k.poly
    (65, {('d', 'h'): 2, (): 1})
    >>> solve([(d.poly, 16), (k.poly, 33)], {})
    {'d': 16, 'h': 1}
    >>> solve([(d.poly, 16), (k.poly, 32)], {}) is None   # 2*16*h = 31 has no integer h
    True
"""

from __future__ import annotations

Poly = dict[tuple, int]  # {monomial (a sorted tuple of names): coefficient}


def poly_of(x) -> Poly:
    """A ``Sized``'s polynomial; a plain int's constant."""
    return dict(x.poly) if isinstance(x, Sized) else {(): int(x)}


def _plain(x) -> bool:
    return type(x) is int or isinstance(x, Sized)


def _add(p: Poly, q: Poly, sign: int = 1) -> Poly:
    out = dict(p)
    for m, c in q.items():
        out[m] = out.get(m, 0) + sign * c
    return {m: c for m, c in out.items() if c}


def _mul(p: Poly, q: Poly) -> Poly:
    out: Poly = {}
    for m1, c1 in p.items():
        for m2, c2 in q.items():
            m = tuple(sorted(m1 + m2, key=repr))
            out[m] = out.get(m, 0) + c1 * c2
    return {m: c for m, c in out.items() if c}


class Sized(int):
    """An int and the polynomial over names it was computed by (``poly``)."""

    poly: Poly

    def __new__(cls, value: int, poly: Poly):
        s = super().__new__(cls, value)
        s.poly = poly
        return s

    def __add__(self, o):
        return Sized(int(self) + int(o), _add(self.poly, poly_of(o))) if _plain(o) else int.__add__(self, o)

    __radd__ = __add__

    def __sub__(self, o):
        return self + (-o) if _plain(o) else int.__sub__(self, o)

    def __rsub__(self, o):
        return (-self) + o if _plain(o) else int.__rsub__(self, o)

    def __mul__(self, o):
        return Sized(int(self) * int(o), _mul(self.poly, poly_of(o))) if _plain(o) else int.__mul__(self, o)

    __rmul__ = __mul__

    def __neg__(self):
        return Sized(-int(self), {m: -c for m, c in self.poly.items()})

    def __floordiv__(self, o):
        if type(o) is int and o and all(c % o == 0 for c in self.poly.values()):
            return Sized(int(self) // o, {m: c // o for m, c in self.poly.items()})
        return int.__floordiv__(self, o)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def names(p: Poly) -> set:
    return {n for m in p for n in m}


def evaluate(p: Poly, known: dict) -> int | None:
    """``p`` at ``known`` (None when a name is unknown)."""
    total = 0
    for m, c in p.items():
        if any(n not in known for n in m):
            return None
        term = c
        for n in m:
            term *= known[n]
        total += term
    return total


def _partial(p: Poly, known: dict) -> tuple[int, Poly]:
    """``p`` with the known names substituted: (constant, the unknown part)."""
    const, rest = 0, Poly()
    for m, c in p.items():
        left = tuple(n for n in m if n not in known)
        for n in m:
            if n in known:
                c *= known[n]
        if left:
            rest[left] = rest.get(left, 0) + c
        else:
            const += c
    return const, {m: c for m, c in rest.items() if c}


def solve(equations: list[tuple[Poly, int]], known: dict) -> dict | None:
    """The names the equations determine (with ``known``), or None when they contradict each other."""
    known = dict(known)
    progress = True
    while progress:
        progress = False
        for p, v in equations:
            const, rest = _partial(p, known)
            if len(rest) == 1:
                (m, c), = rest.items()
                if len(m) == 1 and (v - const) % c:
                    return None         # no integer size gives v
                if len(m) == 1:
                    known[m[0]] = (v - const) // c
                    progress = True
    for p, v in equations:
        got = evaluate(p, known)
        if got is not None and got != v:
            return None
    return known
