"""The floor candidates of the importance strategy's screen (ImportanceConfig.floors, fxadapt.search.screen):
ranked by validation KL, every weight step counted once, the budget held by an independent count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.errors import SearchConfigError
from fxadapt.search.importance import ImportanceConfig
from fxadapt.search.screen import screen


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def test_floors_are_checked():
    with pytest.raises(SearchConfigError, match="floors"):
        ImportanceConfig(floors=(1.5,))


def test_screen_ranks_the_floor_candidates():
    model = _model()
    x = torch.randn(256, 3, 8, 8)
    a = fxadapt.analyze(model, (x[:1],))
    cfg = ImportanceConfig(steps=6, batch_size=32, calib_batches=1, kind="taylor", screen=3,
                           floors=(0.5, 1.0))
    _, plan, _, hist = screen(a, 0.3 * a.macs(), (x,), cfg=cfg)
    rows = hist[-1]["screen"]
    assert [r["candidate"] for r in rows] == ["all", "floor 0.5", "floor 1"]
    assert hist[-1]["chosen"] == min(rows, key=lambda r: r["val_kl"])["candidate"]
    assert sum("step" in h for h in hist) == 6                     # every weight step counted once
    assert a.cost.macs(plan.units) <= 0.3 * a.macs() * 1.01
