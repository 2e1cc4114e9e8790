"""The search's measured non-default modes (issue 15, bench/ablation_dna.py): gates only on frozen weights,
gate steps on a held-out part of the training data, and Adam with one second moment for all gates.
Each is checked against what it promises, by an independent reference: the original's weights, the
indices a dataset was read at, and Adam's update written out by hand."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.errors import SearchConfigError
from fxadapt.search.dna import SearchConfig, dna
from fxadapt.search.loop import SharedAdam, holdout, prepare

X = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(1))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 4)).eval()


@pytest.mark.filterwarnings("ignore::fxadapt.BudgetWarning")
def test_frozen_weights_search_moves_only_the_gates():
    m = _model()
    a = fxadapt.analyze(m, (X[:1],))
    cfg = SearchConfig(steps=6, batch_size=16, progress=False, weights="frozen", a_lr=0.5)
    plain, plan, sn, state = dna(a, 0.5 * a.macs(), (X, Y), None, cfg)
    original = dict(m.named_parameters())
    searched = {n: p for n, p in sn.gm.named_parameters() if not n.startswith("fxadapt_gates")}
    assert len(searched) == len(original)
    for p, q in zip(searched.values(), original.values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)       # not one weight step
    entries = [h for h in state.history if "gate_step" in h]
    assert len(entries) == 6 and not any("step" in h for h in state.history)   # no weight step counted
    moved = [g for g in state.history[-1]["gates"] if g["final"] != g["initial"]]
    assert moved                                                # the gates did move
    assert 0.45 <= sn.analysis.cost.macs(plan.units) / a.macs() <= 0.5     # 16-unit groups: coarse


def test_frozen_weights_refuse_weight_training_options():
    with pytest.raises(SearchConfigError, match=r"weights='frozen'\) takes no weight step"):
        SearchConfig(weights="frozen", harden=0.25)
    with pytest.raises(SearchConfigError, match="holdout must be in"):
        SearchConfig(holdout=1.0)


class Recording(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n, self.read = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.read.append(int(i))
        return X[i % 64], Y[i % 64]


def test_holdout_splits_tensors_and_datasets_disjointly():
    rest, held = holdout((X, Y), 0.25, seed=3)
    assert (len(rest[0]), len(held[0])) == (48, 16)
    rows = {tuple(r.flatten()[:4].tolist()) for r in torch.cat([rest[0], held[0]])}
    assert len(rows) == 64                                      # a partition of the 64 examples
    ds = Recording(40)
    r, h = holdout(ds, 0.25, seed=3)
    assert sorted(r.indices + h.indices) == list(range(40)) and len(h) == 10
    assert holdout((X, Y), 0.0, seed=3) == ((X, Y), None)


def test_gate_steps_read_only_the_held_out_part():
    ds = Recording(64)
    a = fxadapt.analyze(_model(), (X[:1],))
    cfg = SearchConfig(steps=4, warmup=1, batch_size=8, progress=False, holdout=0.25)
    sn, train, val = prepare(a, 0.5 * a.macs(), ds, None, cfg)
    held = set(val.dataset.indices)
    ds.read.clear()
    for s in range(8):
        train.batch(s)
    assert ds.read and not set(ds.read) & held                  # weight batches never touch the held part
    ds.read.clear()
    for s in range(4):
        val.batch(s)
    assert set(ds.read) <= held


def test_shared_adam_is_adam_with_one_second_moment():
    torch.manual_seed(0)
    p, q = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))
    p0, q0 = p.detach().clone(), q.detach().clone()
    opt = SharedAdam([p, q], lr=0.1)
    grads = [(torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.1, 0.0])),
             (torch.tensor([0.5, 1.0, -1.0]), torch.tensor([-0.2, 3.0]))]
    m, v = [torch.zeros(3), torch.zeros(2)], 0.0
    ref = [p0, q0]
    for t, (gp, gq) in enumerate(grads, start=1):
        p.grad, q.grad = gp, gq
        opt.step()
        v = 0.999 * v + 0.001 * float(torch.cat([gp, gq]).pow(2).mean())
        for i, g in enumerate((gp, gq)):
            m[i] = 0.9 * m[i] + 0.1 * g
            ref[i] = ref[i] - 0.1 * (m[i] / (1 - 0.9 ** t)) / (math.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    torch.testing.assert_close(p.detach(), ref[0])
    torch.testing.assert_close(q.detach(), ref[1])
    # per-entry Adam's first step is lr * sign(g) for every entry; the shared one keeps the ratio
    r = nn.Parameter(torch.zeros(2))
    opt = SharedAdam([r], lr=0.1)
    r.grad = torch.tensor([1.0, 0.1])
    opt.step()
    assert float(r[0] / r[1]) == pytest.approx(10.0)


@pytest.mark.filterwarnings("ignore::fxadapt.BudgetWarning")
def test_shared_adam_runs_in_a_search_and_resumes(tmp_path):
    a = fxadapt.analyze(_model(), (X[:1],))
    ck = str(tmp_path / "s.ckpt")
    cfg = SearchConfig(steps=6, warmup=2, batch_size=16, progress=False, a_optimizer="shared", checkpoint=ck,
                       checkpoint_every=2)
    whole = dna(a, 0.5 * a.macs(), (X, Y), None, dataclasses.replace(cfg, checkpoint=None))
    dna(a, 0.5 * a.macs(), (X, Y), None, dataclasses.replace(cfg, stop_after=3))
    resumed = dna(a, 0.5 * a.macs(), (X, Y), None, cfg)
    assert resumed[1].units == whole[1].units
