"""Issue 7's user-facing contract: documented API holds, budgets a model cannot hit exactly, every float
dtype, at most 6 parameters, and no dispatch on module types outside lifting."""

from __future__ import annotations

import inspect
import pathlib
import re
import warnings

import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.analysis.count import count_macs
from fxadapt.planning.budget import BudgetWarning
from fxadapt.planning.solver import SolveConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


class ESPCN(nn.Module):
    """One coarse group (5 units of 12 MACs per pixel each): 0.5 lies between 0.4 (2 units) and 0.6 (3)."""

    def __init__(self, r: int = 2):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 5, 3, padding=1, bias=False), nn.Conv2d(5, r * r, 1, bias=False)
        self.up = nn.PixelShuffle(r)

    def forward(self, x):
        return self.up(self.c2(torch.tanh(self.c1(x))))


def test_finetune_is_the_documented_function():
    m = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    assert fxadapt.finetune(m, (x, y), epochs=1) is m and not m.training


def test_coarse_budget_returns_closest_below_with_a_warning():
    x = torch.randn(1, 1, 12, 12)
    with pytest.warns(BudgetWarning, match="below"):
        out = fxadapt.transform(ESPCN().eval(), 0.5, (x,))
    r = fxadapt.report(out)
    assert count_macs(out, (x,)) == 0.4 * r.macs_before   # the closest at or below (independent count)
    assert out.c1.out_channels == 2
    with pytest.raises(fxadapt.BudgetError):
        fxadapt.transform(ESPCN().eval(), 0.5, (x,), solve=SolveConfig(strict=True))


def test_strict_tolerance_is_honoured_by_verification():
    x = torch.randn(1, 1, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetWarning)  # 0.4 lies within 25%: nothing to warn about
        out = fxadapt.transform(ESPCN().eval(), 0.5, (x,), solve=SolveConfig(strict=True, tol=0.25))
    assert count_macs(out, (x,)) / fxadapt.report(out).macs_before == 0.4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("budget", [0.5, 1.5])
def test_every_float_dtype_transforms(dtype, budget):
    from fxadapt.examples import example_model

    m = example_model().to(dtype)
    x = torch.randn(1, 3, 32, 32, dtype=dtype)
    out = fxadapt.transform(m, budget, (x,))
    assert out(x).dtype == dtype and out(x).shape == (1, 10)
    assert next(out.parameters()).dtype == dtype
    if budget > 1:  # growth is function-preserving at the dtype's resolution
        tol = 8 * torch.finfo(dtype).eps
        torch.testing.assert_close(out(x), m(x), rtol=max(tol, 1e-4),
                                   atol=max(tol, 1e-5) * float(m(x).abs().max().clamp_min(1)))


def test_transform_takes_at_most_six_parameters():
    params = [p for p in inspect.signature(fxadapt.transform).parameters.values() if p.kind != p.VAR_KEYWORD]
    assert len(params) <= 6


def test_no_dispatch_on_module_types_outside_lifting():
    """Passes look ops up in the registry from the node; only lifting (and the lift builders) name nn
    classes."""
    allowed = {"passes/lift_modules.py", "fxadapt/ops/lifts.py", "fxadapt/train/recalibrate.py",
               # containers of the user's tree
               "fxadapt/dist.py", "fxadapt/writeback/recipe.py", "fxadapt/writeback/depth.py",
               "fxadapt/export/stream_score.py"}
    pattern = re.compile(r"isinstance\([^)]*,\s*\(?\s*nn\.(?!Module\b|Parameter\b)")
    offenders = [str(p.relative_to(ROOT)) for p in [*ROOT.glob("fxadapt/**/*.py"), *ROOT.glob("passes/*.py")]
                 if str(p.relative_to(ROOT)) not in allowed and pattern.search(p.read_text())]
    assert offenders == []
