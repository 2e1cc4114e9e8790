"""RecurrentGemma's RG-LRU gates: ``baddbmm(b[:, None, :], x, W)`` with one ``[k, k]`` weight per head
(``W: [H, k, k]``, ``b: [H, k]``), a block-diagonal linear layer. Slicing ``W``'s columns must slice the
bias, which the product meets through an ``unsqueeze``: the ``addmm``/``baddbmm`` rule gave the bias no
site, so the rewrite sliced ``W`` alone and the shape check failed at ``baddbmm`` ("expanded size (8) must
match the existing size (16)"). A bias of fixed size (an input) freezes the columns instead, and the refusal
names ``baddbmm``.

References are independent of fxadapt: FlopCounterMode MACs, the tensors' shapes, the transformed model run
on inputs of another size.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from ruletools import half_flops
from torch import nn

import fxadapt
from fxadapt.analysis.count import count_macs
from fxadapt.ir.capture import as_called

H, K, D = 4, 16, 64


class BlockGate(nn.Module):
    """``out(a * sigmoid(baddbmm(b, a per head, W)))`` with ``a = inp(x)``: the RG-LRU input gate."""

    def __init__(self, fixed_bias: bool = False):
        super().__init__()
        self.inp, self.out = nn.Linear(D, H * K), nn.Linear(H * K, D)
        self.weight = nn.Parameter(torch.randn(H, K, K) / K ** 0.5)
        self.bias = nn.Parameter(torch.randn(H, K))
        self.fixed_bias = fixed_bias

    def forward(self, x, bias=None):
        b, s, _ = x.shape
        a = self.inp(x)
        r = a.reshape(b * s, H, -1).permute(1, 0, 2)
        g = torch.baddbmm(bias if self.fixed_bias else self.bias[:, None, :], r, self.weight)
        return self.out(a * torch.sigmoid(g.transpose(0, 1).reshape(b, s, -1)))


def _gate_params(g) -> tuple[torch.Tensor, torch.Tensor]:
    params = dict(g.named_parameters())
    w = next(p for n, p in params.items() if p.dim() == 3)
    return w, next(p for n, p in params.items() if n.endswith("bias") and p.dim() == 2)


def test_block_diagonal_gate_slices_its_bias_with_the_weight():
    torch.manual_seed(0)
    m, x = BlockGate().eval(), torch.randn(2, 5, D)
    g = fxadapt.transform(m, 0.5, (x,), output="graph")
    w, b = _gate_params(g)
    assert w.shape[2] < K, "the gate's columns are prunable"
    assert b.shape == (H, w.shape[2])
    k, n = w.shape[2], x.shape[0] * x.shape[1]   # one group of H x 16 units: coarse, lands below the budget
    assert half_flops(g, x) == n * (2 * D * H * k + H * k * k) <= 0.5 * half_flops(m, x)
    y = g(torch.randn(3, 7, D))   # another batch and length: the rewrite is consistent, not shape-tuned
    assert y.shape == (3, 7, D)


def test_fixed_size_bias_freezes_the_gate_columns():
    torch.manual_seed(0)
    m, x, bias = BlockGate(fixed_bias=True).eval(), torch.randn(2, 5, D), torch.randn(H, 1, K)
    with pytest.raises(fxadapt.BudgetError, match=r"baddbmm: matrix product added to bias, of fixed size 16"):
        fxadapt.transform(m, 0.5, (x, bias), output="graph")   # its one group of channels is frozen


transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from hf_families_new import NEW_FAMILIES  # noqa: E402


@pytest.fixture(scope="module")
def adapted():
    fam = NEW_FAMILIES["recurrent_gemma"]
    model, x = fam.build(), fam.example()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fxadapt.transform(model, 0.5, x)
    wb = [str(w.message) for w in caught if issubclass(w.category, fxadapt.WriteBackWarning)]
    return fam, model, out, x, wb


def test_recurrent_gemma_adapts_within_the_budget(adapted):
    fam, model, out, x, _ = adapted
    assert type(out) is type(model)
    base = count_macs(model, as_called(model, x))
    got = count_macs(out, as_called(out, x))
    assert abs(got / (0.5 * base) - 1) <= 0.01, got / base
    lru = out.model.layers[0].temporal_block.rg_lru
    for w, b in ((lru.input_gate_weight, lru.input_gate_bias), (lru.recurrent_gate_weight,
                                                                lru.recurrent_gate_bias)):
        assert b.shape == (w.shape[0], w.shape[2])
    with torch.no_grad():
        got = out.generate(**fam.gen(), max_new_tokens=3, do_sample=False, use_cache=False)
    assert got.shape[1] == fam.gen()["input_ids"].shape[1] + 3


@pytest.mark.xfail(strict=True, reason="write-back leaves RecurrentGemmaRecurrentBlock.lru_width (read only "
                   "by the cached path, for its zero recurrent state) at the old width")
def test_recurrent_gemma_generates_with_its_cache(adapted):
    fam, _, out, _, wb = adapted
    assert not wb, wb[0][:400]
    with torch.no_grad():
        out.generate(**fam.gen(), max_new_tokens=3, do_sample=False)
