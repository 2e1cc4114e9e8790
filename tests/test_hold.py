"""User control (``fxadapt.analysis.hold``): ``keep=`` modules never change size, ``min_width=`` /
``max_width=`` bound a module's width, ``only=`` scopes what may change; the data-free solver, DNA and FUR
honour them; the report lists what was held; a pattern naming nothing is a one-line error listing names."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.analysis.hold import Hold, apply_hold, module_names
from fxadapt.errors import InputError

transformers = pytest.importorskip("transformers")

G = torch.Generator().manual_seed(0)
X = torch.randn(32, 3, 8, 8, generator=G)
Y = torch.randint(0, 5, (32,), generator=G)
IDS = torch.randint(3, 96, (2, 8), generator=G)
DNA = fxadapt.SearchConfig(steps=4, warmup=1, batch_size=8, progress=False)
IMP = fxadapt.ImportanceConfig(steps=2, iterations=2, batch_size=8, calib_batches=1)
FUR = fxadapt.FurConfig(iterations=1, train_steps=2, batch_size=8, val_samples=16, draws=1, progress=False)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv3(torch.relu(self.conv2(x))))
        return self.head(x.mean((2, 3)))


def _net():
    torch.manual_seed(0)
    return Net().eval()


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=32,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _shapes(model, prefix=""):
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefix)}


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def test_keep_lm_head_and_first_block_leaves_them_untouched():
    model, example = _gpt2(), {"input_ids": IDS}
    out = _quiet(fxadapt.transform, model, 0.7, example, keep=["lm_head", "transformer.h.0"])
    assert _shapes(out, "lm_head") == _shapes(model, "lm_head")
    assert _shapes(out, "transformer.h.0.") == _shapes(model, "transformer.h.0.")
    assert _shapes(out, "transformer.h.1.mlp") != _shapes(model, "transformer.h.1.mlp")   # the rest moved
    rep = fxadapt.report(out)
    assert rep.macs_after <= 0.7 * rep.macs_before and rep.held
    assert any("keep 'lm_head'" in h["held"] for h in rep.held) and "held (" in rep.table()


def test_only_mlps_keeps_hidden_size_and_attention():
    model, example = _gpt2(), {"input_ids": IDS}
    out = _quiet(fxadapt.transform, model, 0.8, example, only=["*.mlp.*"])
    changed = {k for k, s in _shapes(out).items() if s != _shapes(model)[k]}
    assert changed and all(".mlp." in k for k in changed)


@pytest.mark.parametrize("strategy", ["datafree", "dna", "fur", "importance"])
def test_every_strategy_honours_keep_and_min_width(strategy):
    model = _net()
    opts = {"data": (X, Y), "search": DNA, "fur": FUR, "importance": IMP} if strategy != "datafree" else {}
    out = _quiet(fxadapt.transform, model, 0.4, X[:1], strategy=strategy, keep=["conv1"],
                 min_width={"conv3": 12}, **opts)
    assert out.conv1.out_channels == 16 and out.conv3.out_channels >= 12
    assert out.conv2.out_channels < 32
    rep = fxadapt.report(out)
    assert rep.macs_after <= 0.4 * rep.macs_before * 1.001


def test_min_width_as_a_fraction_and_max_width_under_growth():
    model = _net()
    small = _quiet(fxadapt.transform, model, 0.45, X[:1], min_width={"conv2": 0.75})
    assert small.conv2.out_channels >= 24
    big = _quiet(fxadapt.transform, model, 1.5, X[:1], max_width={"conv2": 36})
    assert 32 <= big.conv2.out_channels <= 36


def test_patterns_that_name_nothing_are_one_line_errors_listing_names():
    with pytest.raises(InputError,
                       match=r"keep: 'head2' matches no module of the model; modules: conv1") as e:
        _quiet(fxadapt.transform, _net(), 0.5, X[:1], keep=["head2"])
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="min_width"):
        fxadapt.TransformConfig(min_width={"conv1": -1})
    with pytest.raises(InputError, match="no width"):
        _quiet(fxadapt.transform, _net(), 0.5, X[:1], min_width={"conv2": 20}, max_width={"conv2": 10})


def test_names_are_the_modules_groups_resize():
    a = fxadapt.analyze(_net(), (X[:1],))
    assert module_names(a) == ["conv1", "bn", "conv2", "conv3", "head"]
    held = apply_hold(a, Hold(only=("conv2", "conv3")))
    assert [g.prunable for g in held.prunable] == [True] and held.hold.only == ("conv2", "conv3")
