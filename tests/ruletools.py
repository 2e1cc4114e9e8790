"""Helpers shared by the ``test_rules_*`` files: analyse a toy model, find groups by parameter, count FLOPs,
and check a random reference slicing (``refslicer``) against the masked original."""

from __future__ import annotations

import numpy as np
import refslicer
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

import fxadapt


def analyze(model, *inputs):
    model.eval()
    return fxadapt.analyze(model, tuple(inputs))


def half_flops(model, *inputs) -> float:
    """FlopCounterMode / 2, with attention on the math backend (the CPU flash kernel is not counted)."""
    with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(*inputs)
    return fc.get_total_flops() / 2


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def groups_with(a, target: str, axis: int | None = None) -> list:
    """Groups holding at least one position of the parameter site ``target`` (along ``axis``)."""
    return [g for g in a.groups if any(m.target == target and (axis is None or m.axis == axis)
                                       and (m.index >= 0).any() for m in g.members)]


def group_with(a, target: str, axis: int | None = None):
    found = groups_with(a, target, axis)
    assert len(found) == 1, f"{target}[{axis}] is in {len(found)} groups: {found}"
    return found[0]


def member(g, target: str, axis: int | None = None):
    found = [m for m in g.members if m.target == target and (axis is None or m.axis == axis)]
    assert len(found) == 1, (g, target, axis, found)
    return found[0]


def param_members(g) -> set[tuple[str, int, str]]:
    """``{(target, axis, role)}`` of a group's parameter members."""
    return {(m.target, m.axis, m.site.role) for m in g.members if m.site.kind == "param"}


def kinds(g) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in g.members:
        out[m.site.kind] = out.get(m.site.kind, 0) + 1
    return out


def random_keep(a, rng, fixed: dict | None = None) -> dict[int, set[int]]:
    keep = {g.id: set(rng.choice(g.units, size=int(rng.integers(1, g.units + 1)), replace=False).tolist())
            for g in a.prunable}
    keep.update(fixed or {})
    return keep


def check_slicing(a, inputs: tuple, trials: int = 4, exact: bool = True, fixed=None, seed: int = 0) -> None:
    """Slice with random keep-sets: the module runs, keeps its output shape, costs what ``a.macs``
    predicts and (``exact``) computes what the original computes with dropped inputs zeroed."""
    rng = np.random.default_rng(seed)
    first = pytree.tree_map(lambda v: v[:1] if isinstance(v, torch.Tensor) else v, inputs)
    with torch.no_grad():
        ref_shape = a.gm(*inputs).shape
        for _ in range(trials):
            keep = random_keep(a, rng, fixed(a) if callable(fixed) else fixed)
            sliced = refslicer.slice_module(a, keep)
            y = sliced(*inputs)
            assert y.shape == ref_shape
            if exact:
                torch.testing.assert_close(y, refslicer.masked(a, keep)(*inputs), rtol=0, atol=1e-10)
            w = refslicer.widths(a, keep)
            # the cost model counts the analysed batch (1)
            assert a.macs(channels=w) == half_flops(sliced, *first)
            assert a.params(channels=w) == n_params(sliced)


D = torch.float64


def x4(*shape, seed=0):
    """A float64 random input, seeded."""
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))


def seeded(cls, *args):
    """``cls(*args)`` built under seed 0, in float64 eval mode."""
    torch.manual_seed(0)
    return cls(*args).to(D).eval()

