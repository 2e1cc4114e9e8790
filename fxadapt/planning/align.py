"""Width alignment: which kept-unit counts a group may take so its width is a multiple of an alignment.

A group ``g`` of ``N_g`` units, each ``q_g`` channels wide (its granularity), has width ``w = n * q_g`` at
``n`` kept units. With alignment ``A`` the width must be a multiple of ``L_g = lcm(A, q_g)``, so ``n`` must
be a multiple of the unit step ``k_g = L_g / q_g``. Within bounds ``[lo, hi]`` the group's *ladder* is

    ladder_g = {j * k_g : lo <= j * k_g <= hi}  ∪  {N_g}        (N_g only when lo <= N_g <= hi)

(the original width stays allowed: an untouched group is not an adapted one). A group narrower than the
alignment (``N_g * q_g < A``), or whose lattice part is empty, keeps only ``N_g``. ``A = 1`` gives every
integer in ``[lo, hi]``: no alignment. ``Ladders`` packs the ladders of several groups into one sorted array
so the rung nearest to ``s * ref_g`` is found for every group at once (one ``searchsorted``).

``"auto"`` alignment is the hardware's (``fxadapt.hw.align.auto_align``).
"""

from __future__ import annotations

import math

import numpy as np

from fxadapt.errors import BudgetError
from fxadapt.hw.align import auto_align


def resolve_align(align: int | str, device: str = "cpu") -> int:
    """An alignment as a positive int: ``"auto"`` becomes ``auto_align(device)``.

    >>> resolve_align(8), resolve_align("auto", "cuda")
    (8, 8)
    """
    if align == "auto":
        return auto_align(device)
    if isinstance(align, bool) or not isinstance(align, (int, np.integer)) or align < 1:
        raise BudgetError(f"align must be a positive int or 'auto', got {align!r}")
    return int(align)


def unit_step(align: int, granularity: int) -> int:
    """Kept units per aligned step: ``lcm(align, granularity) / granularity``.

    >>> unit_step(8, 1), unit_step(8, 4), unit_step(8, 3), unit_step(1, 5)
    (8, 2, 8, 1)
    """
    return math.lcm(align, granularity) // granularity


def ladder(units: int, granularity: int, lo: int, hi: int, align: int = 1) -> np.ndarray:
    """Sorted unit counts a group may take within ``[lo, hi]`` (see the module docstring).

    >>> ladder(20, 1, 2, 20, 8).tolist(), ladder(6, 1, 1, 6, 8).tolist(), ladder(10, 4, 1, 20, 8).tolist()
    ([8, 16, 20], [6], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20])
    """
    keep = min(max(units, lo), hi)
    if units * granularity < align:
        return np.array([keep], dtype=np.int64)
    k = unit_step(align, granularity)
    lattice = np.arange(-(-lo // k) * k, hi + 1, k, dtype=np.int64)
    if lattice.size == 0:
        return np.array([keep], dtype=np.int64)
    at = int(np.searchsorted(lattice, units))
    if lo <= units <= hi and (at == lattice.size or lattice[at] != units):
        lattice = np.insert(lattice, at, units)
    return lattice


class Ladders:
    """The ladders of several groups in one flat array, with the rung nearest to a global scale.

    ``at_scale(s)`` gives, per group ``k``, the index of the rung nearest to ``s * ref[k]`` (ties go to the
    lower rung), so the widths ``values(at_scale(s))`` never decrease as ``s`` grows.

    >>> lad = Ladders([3, 5], [ladder(32, 1, 4, 32, 8), ladder(12, 1, 2, 12, 8)], np.array([32.0, 12.0]))
    >>> lad.units(lad.at_scale(0.5)), lad.units(lad.at_scale(1.0))
    ({3: 16, 5: 8}, {3: 32, 5: 12})
    """

    def __init__(self, gids: list, rungs: list, ref: np.ndarray):
        self.gids, self.rungs, self.ref = gids, rungs, ref
        self.size = np.array([len(r) for r in rungs], dtype=np.int64)
        self.off = np.concatenate([[0], np.cumsum(self.size)[:-1]]).astype(np.int64)
        self.flat = np.concatenate(rungs).astype(float) if rungs else np.zeros(0)
        self.top = max([1.0] + [r[-1] / b for r, b in zip(rungs, ref)])  # the scale where all are widest
        # one sorted key array: group k's rungs shifted by k * stride (> any rung and any s * ref, s <= top)
        stride = 2.0 * max([1.0] + [r[-1] for r in rungs] + [self.top * b for b in ref]) + 2.0
        self.shift = np.arange(len(rungs)) * stride
        self.keys = self.flat + np.repeat(self.shift, self.size)

    def values(self, idx: np.ndarray) -> np.ndarray:
        return self.flat[self.off + idx]

    def at_scale(self, s: float) -> np.ndarray:
        want = s * self.ref
        j = np.clip(np.searchsorted(self.keys, want + self.shift) - self.off, 1, np.maximum(self.size - 1, 1))
        lower, upper = self.flat[self.off + j - 1], \
                self.flat[np.minimum(self.off + j, self.off + self.size - 1)]
        return np.where((self.size == 1) | (want - lower <= upper - want), j - 1, j)

    def units(self, idx: np.ndarray) -> dict[int, int]:
        return {g: int(v) for g, v in zip(self.gids, self.values(idx))}
