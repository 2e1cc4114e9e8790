"""Property tests on random DAG CNNs: the analysis never crashes, its groups partition every site, and a
reference slicer (``tests/refslicer.py``, not fxadapt's materializer) that prunes every prunable group to a
random keep-set yields a module that runs, keeps the output shape, computes exactly what the original
computes with the dropped channels' reader weights zeroed, and costs exactly what ``Analysis.macs`` /
``Analysis.params`` predict for those widths. Then fxadapt's own materializer (``make_plan`` +
``passes.materialize``) shrinks, keeps or grows every prunable group at random and must equal the reference
slicer in float64, cost what the cost model says, and survive ``fold_bn`` unchanged
(``tests/test_ref_materialize.py::check_materialize``). 200 examples per run.
"""

from __future__ import annotations

import numpy as np
import pytest
import refslicer
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ref_materialize import check_materialize, random_units
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

import fxadapt

MAX_C = 16
OPS = ("conv", "dw", "gconv", "res", "add", "cat", "chunk", "split", "se", "shuffle", "slice", "bn", "relu",
       "affine", "nhwc", "pixel")


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n) if n % d == 0]


@st.composite
def programs(draw):
    """A list of steps over a growing list of values (value 0 is the 3-channel input), plus a head kind."""
    chans = [3]
    prog = []
    n_steps = draw(st.integers(1, 8))
    for _ in range(n_steps):
        op = draw(st.sampled_from(OPS))
        recent = list(range(max(0, len(chans) - 4), len(chans)))
        src = draw(st.sampled_from(recent))
        c = chans[src]
        if op not in ("conv", "add", "cat") and src == 0:
            op = "conv"  # the input has fixed channels: start from a producer
        if op == "conv":
            cout = draw(st.sampled_from([2, 4, 6, 8, 12, 16]))
            prog.append(("conv", src, cout, draw(st.sampled_from([1, 3])), draw(st.booleans()),
                         draw(st.booleans())))
            chans.append(cout)
        elif op == "dw":
            mult = draw(st.sampled_from([1, 2])) if 2 * c <= MAX_C else 1
            prog.append(("dw", src, mult, draw(st.booleans())))
            chans.append(c * mult)
        elif op == "gconv" and _divisors(c):
            g = draw(st.sampled_from(_divisors(c)))
            cout = g * draw(st.integers(1, MAX_C // g))
            prog.append(("gconv", src, g, cout))
            chans.append(cout)
        elif op == "res":
            prog.append(("res", src))
            chans.append(c)
        elif op == "add":
            same = [i for i in recent if chans[i] == c and i != src]
            if same:
                prog.append(("add", src, draw(st.sampled_from(same))))
                chans.append(c)
        elif op == "cat":
            other = draw(st.sampled_from(recent))
            if chans[other] + c <= 2 * MAX_C:
                prog.append(("cat", src, other))
                chans.append(c + chans[other])
        elif op == "chunk" and c % 2 == 0:
            prog.append(("chunk", src))
            chans += [c // 2, c // 2]
        elif op == "split" and c >= 2:
            k = draw(st.integers(1, c - 1))
            prog.append(("split", src, k))
            chans += [k, c - k]
        elif op == "se":
            prog.append(("se", src, max(1, c // 4)))
            chans.append(c)
        elif op == "shuffle" and [g for g in _divisors(c)]:
            prog.append(("shuffle", src, draw(st.sampled_from(_divisors(c)))))
            chans.append(c)
        elif op == "slice" and c >= 2:
            lo = draw(st.integers(0, c - 1))
            hi = draw(st.integers(lo + 1, c))
            prog.append(("slice", src, lo, hi))
            chans.append(hi - lo)
        elif op in ("bn", "relu", "affine"):
            prog.append((op, src))
            chans.append(c)
        elif op == "nhwc":  # permute to channels-last, linear over channels, permute back
            cout = draw(st.sampled_from([2, 4, 8]))
            prog.append(("nhwc", src, cout))
            chans.append(cout)
        elif op == "pixel" and c % 4 == 0:  # pixel_shuffle, a conv at 2x resolution, pixel_unshuffle
            cmid = draw(st.sampled_from([1, 2, 3]))
            prog.append(("pixel", src, cmid))
            chans.append(4 * cmid)
    head = draw(st.sampled_from(["pool", "flatten"]))
    return prog, head


class Affine(nn.Module):
    """Per-channel scale (a parameter) and shift (a buffer): ``const`` sites sliced with the channels."""

    def __init__(self, c):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)
        self.register_buffer("shift", torch.randn(c, 1, 1))

    def forward(self, x):
        return x * self.scale + self.shift


class Net(nn.Module):
    """Runs a program from ``programs``; every value nobody reads feeds the head (no dead code)."""

    def __init__(self, prog, head):
        super().__init__()
        self.prog, self.head_kind = prog, head
        chans = [3]
        self.mods = nn.ModuleDict()
        used: set[int] = set()
        for i, step in enumerate(prog):
            op, src = step[0], step[1]
            c = chans[src]
            used.add(src)
            key = f"s{i}"
            if op == "conv":
                _, _, cout, k, bn, relu = step
                layers = [nn.Conv2d(c, cout, k, padding=k // 2)]
                layers += [nn.BatchNorm2d(cout)] if bn else []
                layers += [nn.ReLU()] if relu else []
                self.mods[key] = nn.Sequential(*layers)
                chans.append(cout)
            elif op == "dw":
                _, _, mult, bn = step
                layers = [nn.Conv2d(c, c * mult, 3, padding=1, groups=c, bias=not bn)]
                self.mods[key] = nn.Sequential(*layers, *([nn.BatchNorm2d(c * mult)] if bn else []))
                chans.append(c * mult)
            elif op == "gconv":
                _, _, g, cout = step
                self.mods[key] = nn.Conv2d(c, cout, 1, groups=g)
                chans.append(cout)
            elif op == "res":
                self.mods[key] = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                               nn.Conv2d(c, c, 1))
                chans.append(c)
            elif op == "se":
                self.mods[key] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, step[2], 1), nn.ReLU(),
                                               nn.Conv2d(step[2], c, 1), nn.Sigmoid())
                chans.append(c)
            elif op == "bn":
                self.mods[key] = nn.BatchNorm2d(c)
                chans.append(c)
            elif op == "affine":
                self.mods[key] = Affine(c)
                chans.append(c)
            elif op == "nhwc":
                self.mods[key] = nn.Linear(c, step[2])
                chans.append(step[2])
            elif op == "pixel":
                self.mods[key] = nn.Conv2d(c // 4, step[2], 3, padding=1)
                chans.append(4 * step[2])
            elif op in ("add", "cat"):
                used.add(step[2])
                chans.append(c if op == "add" else c + chans[step[2]])
            elif op in ("chunk", "split"):
                k = c // 2 if op == "chunk" else step[2]
                chans += [k, c - k]
            elif op == "slice":
                chans.append(step[3] - step[2])
            else:
                chans.append(c)
        self.leaves = [i for i in range(1, len(chans)) if i not in used] or [0]
        feats = sum(chans[i] for i in self.leaves) * (4 if head == "flatten" else 1)
        self.fc = nn.Linear(feats, 5)

    def forward(self, x):
        vals = [x]
        for i, step in enumerate(self.prog):
            op, v = step[0], vals[step[1]]
            if op in ("conv", "dw", "gconv", "bn", "affine"):
                vals.append(self.mods[f"s{i}"](v))
            elif op == "nhwc":
                vals.append(self.mods[f"s{i}"](v.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
            elif op == "pixel":
                vals.append(F.pixel_unshuffle(self.mods[f"s{i}"](F.pixel_shuffle(v, 2)), 2))
            elif op == "res":
                vals.append(v + self.mods[f"s{i}"](v))
            elif op == "se":
                vals.append(v * self.mods[f"s{i}"](v))
            elif op == "relu":
                vals.append(F.relu(v))
            elif op == "add":
                vals.append(v + vals[step[2]])
            elif op == "cat":
                vals.append(torch.cat([v, vals[step[2]]], 1))
            elif op == "chunk":
                vals.extend(v.chunk(2, 1))
            elif op == "split":
                vals.extend(torch.split(v, [step[2], v.shape[1] - step[2]], 1))
            elif op == "shuffle":
                n, c, h, w = v.shape
                vals.append(v.view(n, step[2], c // step[2], h, w).transpose(1, 2).reshape(n, c, h, w))
            elif op == "slice":
                vals.append(v[:, step[2]:step[3]])
        if self.head_kind == "pool":
            feats = [F.adaptive_avg_pool2d(vals[i], 1).flatten(1) for i in self.leaves]
        else:
            feats = [torch.flatten(F.avg_pool2d(vals[i], 4), 1) for i in self.leaves]
        return self.fc(torch.cat(feats, 1) if len(feats) > 1 else feats[0])


def build(prog, head, seed: int) -> Net:
    torch.manual_seed(seed)
    net = Net(prog, head)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
    return net.double().eval()


def half_flops(model, x) -> float:
    with FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / 2


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(programs(), st.integers(0, 2**31 - 1))
def test_random_dag_analysis_and_reference_slicing(spec, seed):
    prog, head = spec
    net = build(prog, head, seed % 1000)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    a = fxadapt.analyze(net, (x,))

    # property 1: every group is prunable or says why not; sizes are consistent
    assert a.groups
    for g in a.groups:
        assert g.prunable == (g.reason is None), g
        assert g.prunable or (isinstance(g.reason, str) and g.reason.strip()), g
        assert g.units >= 1, g
        if g.prunable:  # every unit has the same number of positions in the producer
            assert g.width == g.granularity * g.units, g
        for m in g.members:
            assert set(np.unique(m.index[m.index >= 0]).tolist()) <= set(range(g.units)), (g, m)
    head_groups = [g for g in a.groups
                   if any(m.target == "fc.weight" and m.site.role == "out" for m in g.members)]
    assert len(head_groups) == 1 and not head_groups[0].prunable  # the logits reach the output
    refslicer.owners(a)  # every position of every site belongs to exactly one group

    # the cost model counts what FlopCounterMode counts
    assert a.macs() == half_flops(net, x)
    assert a.params() == n_params(net)

    # property 2: the reference slicer with random keep-sets
    rng = np.random.default_rng(seed)
    keep = {g.id: set(rng.choice(g.units, size=int(rng.integers(1, g.units + 1)), replace=False).tolist())
            for g in a.prunable}
    sliced = refslicer.slice_module(a, keep)
    xb = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = sliced(xb)
        ref = refslicer.masked(a, keep)(xb)
    assert y.shape == net(xb).shape == (3, 5)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)
    w = refslicer.widths(a, keep)
    assert a.macs(channels=w) == half_flops(sliced, xb[:1])
    assert a.params(channels=w) == n_params(sliced)

    # property 3: fxadapt's materializer (shrink, grow, fold_bn) equals the reference slicer
    units = random_units(a, rng)
    scores = {g.id: rng.permutation(g.units).astype(float) for g in a.prunable}
    check_materialize(a, xb, units, scores if rng.random() < 0.5 else None)


@pytest.mark.parametrize("prog, head", [
    # residual + SE + depthwise + shuffle + cat + chunk + slice + grouped: one of each, fixed
    ([("conv", 0, 8, 3, True, True), ("res", 1), ("se", 2, 2), ("dw", 3, 2, True), ("shuffle", 4, 4),
      ("chunk", 5), ("cat", 6, 3), ("slice", 8, 2, 14), ("gconv", 9, 4, 8)], "flatten"),
    ([("conv", 0, 12, 1, False, False), ("split", 1, 5), ("add", 1, 1), ("gconv", 4, 3, 6), ("bn", 5),
      ("relu", 6)], "pool"),
])
def test_fixed_programs_slice_exactly(prog, head):
    net = build(prog, head, 0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    a = fxadapt.analyze(net, (x[:1],))
    assert a.macs() == half_flops(net, x[:1])
    rng = np.random.default_rng(0)
    for _ in range(3):
        keep = {g.id: set(rng.choice(g.units, size=int(rng.integers(1, g.units + 1)), replace=False).tolist())
                for g in a.prunable}
        sliced = refslicer.slice_module(a, keep)
        with torch.no_grad():
            torch.testing.assert_close(sliced(x), refslicer.masked(a, keep)(x), rtol=0, atol=1e-10)
        assert a.macs(channels=refslicer.widths(a, keep)) == half_flops(sliced, x[:1])
    full = {g.id: set(range(g.units)) for g in a.prunable}
    with torch.no_grad():
        torch.testing.assert_close(refslicer.slice_module(a, full)(x), net(x), rtol=0, atol=0)
