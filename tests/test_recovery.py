"""``transform(..., data=..., recovery=W)``: W weight steps in all (the search's own included), the rest a
fine-tune distilled from the original, one learning-rate schedule; DNA's weight steps distil by default.

Independent references: optimizer steps counted by a global hook (not the report), learning rates against the
cosine computed by hand, MACs by ``FlopCounterMode``, accuracy on held-out digits, the original's weights
before and after.
"""

import copy
import dataclasses
import math
import warnings

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.flop_counter import FlopCounterMode

import fxadapt
from fxadapt import SearchConfig, SupernetConfig
from fxadapt.pipeline.recovery import RecoveryConfig
from fxadapt.search.loop import distil_step
from fxadapt.search.supernet import build_supernet
from fxadapt.train.finetune import FinetuneConfig, accuracy, finetune


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def task():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    torch.manual_seed(0)
    base = TinyCNN()
    finetune(base, (x[:1200], y[:1200]), epochs=6, cfg=FinetuneConfig(lr=0.1, kd=0.0))
    return base.eval(), (x[:1200], y[:1200]), (x[1200:], y[1200:])


def _macs(model, x):
    with FlopCounterMode(display=False) as fc:
        model.eval()(x)
    return fc.get_total_flops() / 2


class _Count:
    """Optimizer steps (of ``kinds``) and each one's learning rate, from a global post-step hook."""

    def __init__(self, kinds=(torch.optim.SGD, torch.optim.AdamW)):
        self.kinds, self.lrs = kinds, []

    def __enter__(self):
        self.handle = register_optimizer_step_post_hook(self._hook)
        return self

    def _hook(self, opt, args, kwargs):
        if isinstance(opt, self.kinds):
            self.lrs.append(opt.param_groups[0]["lr"])

    def __exit__(self, *exc):
        self.handle.remove()


def test_importance_recovery_takes_exactly_w_steps_and_keeps_class_budget_and_original(task):
    base, train, _ = task
    x = train[0][:1]
    before = {k: v.clone() for k, v in base.state_dict().items()}
    imp = fxadapt.ImportanceConfig(steps=8, iterations=2, batch_size=32)
    with _Count() as count:
        out = fxadapt.transform(base, 0.5, (x,), data=train, strategy="importance", importance=imp,
                                recovery=RecoveryConfig(steps=20, batch_size=32))
    assert len(count.lrs) == 20                                  # 8 search + 12 fine-tune, by the hook
    rec = fxadapt.report(out).recovery
    assert (rec["search_steps"], rec["recovery_steps"], rec["total"]) == (8, 12, 20)
    assert type(out) is TinyCNN
    assert _macs(out, x) <= 0.5 * 1.01 * _macs(base, x)
    for k, v in base.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # the search at its constant lr (0.02), then the fine-tune's cosine from 0.05 over its 12 steps
    assert count.lrs[:8] == [imp.lr] * 8
    want = [0.05 * 0.5 * (1 + math.cos(math.pi * s / 12)) for s in range(12)]
    assert count.lrs[8:] == pytest.approx(want, rel=1e-6)


def test_dna_recovery_is_one_cosine_over_w(task):
    base, train, _ = task
    x = train[0][:1]
    search = SearchConfig(steps=6, warmup=2, batch_size=32, progress=False)
    with _Count(kinds=(torch.optim.SGD,)) as count:   # the weight steps (the gates step with Adam)
        out = fxadapt.transform(base, 0.5, (x,), data=train, strategy="dna", search=search,
                                recovery=RecoveryConfig(steps=10, batch_size=32))
    want = [search.w_lr * 0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(10)]
    assert count.lrs == pytest.approx(want, rel=1e-6)
    assert fxadapt.report(out).recovery["total"] == 10
    assert type(out) is TinyCNN


def test_recovery_raises_accuracy_at_a_quarter_of_the_macs(task):
    base, train, test = task
    x = train[0][:1]
    plain = fxadapt.transform(base, 0.25, (x,), data=train, strategy="datafree")   # BN re-estimated
    recovered = fxadapt.transform(base, 0.25, (x,), data=train, strategy="datafree", recovery=100)
    assert accuracy(recovered, test) > accuracy(plain, test) + 0.05
    assert _macs(recovered, x) <= 0.25 * 1.01 * _macs(base, x)


def test_recovery_without_data_or_below_the_search_is_a_one_line_error(task):
    base, train, _ = task
    x = train[0][:1]
    with pytest.raises(fxadapt.InputError, match="recovery=10 fine-tunes on data") as e:
        fxadapt.transform(base, 0.5, (x,), recovery=10)
    assert "\n" not in str(e.value)
    with pytest.raises(fxadapt.InputError, match=r"fewer weight steps than the importance search.*\(60\)"):
        fxadapt.transform(base, 0.5, (x,), data=train, strategy="importance", recovery=30)


def test_finetune_of_a_transform_result_without_teacher_warns(task):
    base, train, _ = task
    out = fxadapt.transform(base, 0.5, (train[0][:1],))
    with pytest.warns(UserWarning, match="no teacher was given"):
        finetune(out, (train[0][:64], train[1][:64]), epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        finetune(out, (train[0][:64], train[1][:64]), epochs=1, teacher=base)


def test_dna_weight_step_distils_from_the_original_by_default(task):
    """At the original itself (Markov gates start at the max net) the KL term is 0: the default step's loss
    is (1 - 0.5) CE; without labels it is 0; with kd=0 (the old default) CE."""
    base, train, _ = task
    x, y = train[0][:64], train[1][:64]
    a = fxadapt.analyze(copy.deepcopy(base), (x[:1],))
    ce = float(F.cross_entropy(copy.deepcopy(base).train()(x), y))    # batch statistics, as the steps train
    got = {}
    for name, cfg, batch in (("default", SearchConfig(), (x, y)), ("old", SearchConfig(kd=0.0), (x, y)),
                             ("unlabelled", SearchConfig(), (x, None))):
        sn = build_supernet(a, None, SupernetConfig(expand=1.0, depth_slots=0, gates="markov"))
        sn.gm.train()                     # as the search trains it (batch statistics), the teacher too
        teacher = build_supernet(a, None, SupernetConfig(expand=1.0, depth_slots=0, gates="markov")).gm
        opt = torch.optim.SGD(sn.weight_parameters(), lr=0.0)
        cfg = dataclasses.replace(cfg, supernet=SupernetConfig(gates="markov"))
        b = (x, y) if batch[1] is not None else (x,)
        got[name] = distil_step(sn, b, opt, cfg, fxadapt.dist.DistContext(), teacher.train())
    assert got["default"] == pytest.approx(0.5 * ce, rel=1e-4)
    assert got["old"] == pytest.approx(ce, rel=1e-4)
    assert got["unlabelled"] == pytest.approx(0.0, abs=1e-5)


def test_recovery_without_labels_distils_from_the_original(task):
    base, train, test = task
    x = train[0][:1]
    plain = fxadapt.transform(base, 0.25, (x,), data=(train[0],), strategy="datafree")
    with _Count() as count:
        out = fxadapt.transform(base, 0.25, (x,), data=(train[0],), strategy="datafree", recovery=60)
    assert len(count.lrs) == 60 and fxadapt.report(out).recovery["recovery_steps"] == 60
    assert accuracy(out, test) > accuracy(plain, test)    # no label read: the original's outputs taught it
