"""Norm weights read through element-wise arithmetic (``fxadapt.ops.norm_params``): ``layer_norm(x, s,
weight + 1, bias)`` (Nemotron's LayerNorm1P) slices ``weight`` with the channels; a weight computed from
activations freezes them before any rewrite. Issue 27: this used to end in ``ShapeCheckError``."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from ruletools import analyze, check_slicing, group_with, half_flops, param_members, seeded, x4
from torch import nn

import fxadapt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


class LayerNorm1P(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight + 1.0, self.bias, self.eps)


class OnePlusNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(6, 8), LayerNorm1P(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.norm(self.inp(x)))


def test_one_plus_weight_norm_is_sliced():
    m, x = seeded(OnePlusNorm), x4(1, 5, 6)
    a = analyze(m, x)
    g = group_with(a, "inp.weight", 0)
    assert g.prunable and {("norm.weight", 0, "norm"), ("norm.bias", 0, "norm")} <= param_members(g)
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 5, 6),), exact=False)   # a layer norm's statistics change with its width


def test_one_plus_weight_norm_writes_back():
    m, x = seeded(OnePlusNorm), x4(2, 5, 6)
    small = fxadapt.transform(m, 0.5, (x,))
    assert type(small) is OnePlusNorm and small.norm.normalized_shape == (small.norm.weight.shape[0],) != (8,)
    assert small(x).shape == m(x).shape


class ActivationWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.scale, self.out = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        w = self.scale(x).mean((0, 1))          # a weight made from activations
        return self.out(F.layer_norm(self.inp(x), (8,), w))


def test_weight_from_activations_freezes_with_a_reason():
    a = analyze(seeded(ActivationWeight), x4(1, 5, 6))
    g = group_with(a, "inp.weight", 0)
    assert not g.prunable and "computed at run time" in g.reason


def test_nemotron_adapts_without_shape_check_error():
    from hf_families import FAMILIES

    fam = FAMILIES["nemotron"]
    model = fam.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = fxadapt.transform(model, 0.5, fam.example())
    assert type(small) is type(model)
    norm = small.model.layers[0].input_layernorm
    assert norm.normalized_shape == tuple(norm.weight.shape) != (64,)
    small.generate(**fam.gen(), max_new_tokens=3, do_sample=False)


class ZeroCentredRMSNorm(nn.Module):
    """Gemma / Qwen3-Next style: ``x * rsqrt(mean(x^2)) * (1.0 + weight.float())`` (element-wise, no norm
    op)."""

    def __init__(self):
        super().__init__()
        self.inp, self.weight, self.out = nn.Linear(6, 8), nn.Parameter(torch.zeros(8)), nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.out(h * (1.0 + self.weight.float()))


def test_one_plus_weight_read_element_wise_is_sliced():
    m, x = seeded(ZeroCentredRMSNorm), x4(1, 5, 6)
    a = analyze(m, x)
    g = group_with(a, "inp.weight", 0)
    assert g.prunable and ("weight", 0, "const") in param_members(g)
    check_slicing(a, (x4(2, 5, 6),), exact=False)   # the mean over channels changes with the width


def test_gemma_hidden_width_moves_through_its_one_plus_weight_norms():
    """Gemma's ``(1 + weight)`` RMSNorms used to pin the hidden width; now it shrinks, and the rebuilt
    embedding keeps its ``embed_scale`` buffer (``lift_modules.relift``)."""
    from hf_families import FAMILIES

    fam = FAMILIES["gemma"]
    model = fam.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = fxadapt.analyze(model, fam.example())
        assert group_with(a, "model.embed_tokens.weight", 1).prunable
        small = fxadapt.transform(model, 0.5, fam.example())
    assert type(small) is type(model)
    small.generate(**fam.gen(), max_new_tokens=3, do_sample=False)
