"""A graph result budgeted on the captured original, where the model runs other MACs eagerly (its forward
takes another path when traced): the miss against the eager model is a ``BudgetWarning``, never silent
(``fxadapt.pipeline.eager_check``; issue 27, Qwen3-Next at 1.5)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.pipeline.eager_check import eager_gap

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


class TracedPath(nn.Module):
    """Eagerly an extra matrix product that the traced path skips."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        if not torch.compiler.is_exporting():
            h = h + (h @ torch.ones(8, 8)) * 0
        return self.b(h)


def test_eager_gap_names_both_counts_and_ratios():
    m, x = TracedPath().eval(), torch.randn(2, 6)
    captured = fxadapt.analyze(m, (x,)).macs()
    assert captured == 2 * (6 * 8 + 8 * 3)
    msg = eager_gap(m, (x,), captured, captured / 2)
    assert "runs 272 MACs eagerly but 144 as captured" in msg and "0.500x of the captured original" in msg
    assert eager_gap(nn.Linear(6, 3), (x,), 36.0, 18.0) == ""


@pytest.mark.slow
def test_qwen3_next_graph_fallback_warns_about_the_eager_model():
    from hf_families import FAMILIES

    fam = FAMILIES["qwen3_next"]
    model = fam.build()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fxadapt.transform(model, 1.5, fam.example())
    if isinstance(out, torch.fx.GraphModule):
        assert any(issubclass(x.category, fxadapt.BudgetWarning) and "eagerly" in str(x.message) for x in w)
