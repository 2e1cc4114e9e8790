"""The vectorised expected-cost expression (``CostModel.compiled``) against the per-term loop: exactly
equal on hard 0/1 gates and integer widths, equal to rounding on fractional ones, differentiable, and the
gradient equal to the loop's ``macs_grad``."""

from __future__ import annotations

import pytest
import torch
from models import ResNetTiny

import fxadapt
from fxadapt.examples import EXAMPLE_INPUT_SHAPE, example_model
from fxadapt.search.supernet import build_supernet


@pytest.fixture(scope="module", params=["example", "resnet_tiny"])
def supernet(request):
    if request.param == "example":
        model, x = example_model(), torch.randn(EXAMPLE_INPUT_SHAPE)
    else:
        model, x = ResNetTiny().eval(), torch.randn(1, 3, 8, 8)
    return build_supernet(fxadapt.analyze(model, (x,)))


def _random_hard(sn, seed: int):
    g = torch.Generator().manual_seed(seed)
    units = {gid: int(torch.randint(lo, hi + 1, (1,), generator=g)) for gid, (lo, hi) in sn.bounds().items()}
    present = {b: float(torch.randint(0, 2, (1,), generator=g)) for b in sn.spec.depths}
    return units, present


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_equals_loop_exactly_on_hard_gates(supernet, seed):
    cost = supernet.analysis.cost
    units, present = _random_hard(supernet, seed)
    loop = cost.macs(units, present)
    vec = cost.macs({g: torch.tensor(float(n)) for g, n in units.items()},
                    {b: torch.tensor(d) for b, d in present.items()})
    assert vec.dtype == torch.float64 and float(vec) == loop
    assert float(cost.params({g: torch.tensor(float(n)) for g, n in units.items()}, present)) \
            == cost.params(units, present)


def test_vectorised_matches_loop_on_soft_values_and_gradient(supernet):
    cost = supernet.analysis.cost
    g = torch.Generator().manual_seed(3)
    soft = {gid: lo + (hi - lo) * float(torch.rand(1, generator=g))
            for gid, (lo, hi) in supernet.bounds().items()}
    n = {gid: torch.tensor(v, dtype=torch.float64, requires_grad=True) for gid, v in soft.items()}
    vec = cost.macs(n)
    torch.testing.assert_close(float(vec.detach()), cost.macs(soft), rtol=1e-12, atol=0)
    vec.backward()
    for gid, t in n.items():
        torch.testing.assert_close(float(t.grad), cost.macs_grad(gid, soft), rtol=1e-9, atol=1e-6)


def test_supernet_expected_macs_is_the_compiled_expression(supernet):
    e = supernet.expected_macs()
    assert e.requires_grad and e.dtype == torch.float64
    units, present = supernet.hard()
    assert float(e.detach()) == supernet.analysis.cost.macs(units, present)   # initial gates are 0/1
