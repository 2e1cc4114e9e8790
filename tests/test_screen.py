"""Axis screening for strategy="importance" (fxadapt.search.screen; issue 25 item 5)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.analysis.hold import group_modules
from fxadapt.errors import SearchConfigError
from fxadapt.planning.plan import make_plan
from fxadapt.search.importance import ImportanceConfig, importance
from fxadapt.search.screen import axes_of, candidates, held, holdout, kept_units, screen

T = pytest.importorskip("transformers")
SEQ, V = 16, 64


def tiny_gpt2() -> nn.Module:
    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=V, n_embd=32, n_head=4, n_layer=2, n_positions=SEQ, resid_pdrop=0.0,
                       embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    return T.GPT2LMHeadModel(cfg).eval()


def by_names(a) -> dict[int, str]:
    """The axes from parameter names (independent of the structural rule): the group resizing the token
    embedding is the hidden size, groups only inside ``.attn.`` are heads, only inside ``.mlp.`` MLP."""
    out = {}
    for g in a.prunable:
        params = group_modules(g)[1]
        out[g.id] = ("hidden" if "transformer.wte.weight" in params else
                     "heads" if all(".attn." in p for p in params) else
                     "mlp" if all(".mlp." in p for p in params) else "other")
    return out


@pytest.fixture(scope="module")
def gpt2():
    m = tiny_gpt2()
    ex = {"input_ids": torch.randint(0, V, (1, SEQ))}
    return m, ex, fxadapt.analyze(m, ex)


def test_transformer_axes_match_parameter_names(gpt2):
    _, _, a = gpt2
    axes = axes_of(a)
    assert axes == by_names(a)
    assert sorted(set(axes.values())) == ["heads", "hidden", "mlp"]
    assert candidates(axes) == [("all", ()), ("heads+mlp", ("hidden",)), ("mlp", ("hidden", "heads")),
                                ("hidden+mlp", ("heads",))]


def test_cnn_stages_by_resolution():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4, 3))
    a = fxadapt.analyze(m, (torch.randn(1, 3, 8, 8),))
    by_conv = {group_modules(g)[0][0]: ax for g in a.prunable for gid, ax in axes_of(a).items()
               if gid == g.id}
    # by hand: conv 0 and 2 at 8x8, conv 5 at 4x4, conv 8 at 2x2
    assert by_conv == {"0": "stage0", "2": "stage0", "5": "stage1", "8": "stage2"}
    assert candidates(axes_of(a)) == [("all", ()), ("deep", ("stage0",)), ("shallow", ("stage1", "stage2"))]


def test_held_axis_stays_at_full_width(gpt2):
    _, _, a = gpt2
    axes = axes_of(a)
    hidden = next(g for g, ax in axes.items() if ax == "hidden")
    target = 0.5 * a.macs()
    _, plan, sn, _ = importance(held(a, axes, ("hidden",)), target, torch.randint(0, V, (64, SEQ)),
                                cfg=ImportanceConfig(steps=0, batch_size=16, calib_batches=1, kind="taylor"))
    width = {g.producer: plan.units[g.id] for g in sn.analysis.groups}
    assert width[a.groups[hidden].producer] == a.groups[hidden].units
    assert sn.analysis.cost.macs(plan.units) <= target * 1.01
    assert any(plan.units[g.id] < g.units for g in sn.analysis.prunable)


def test_kept_units_reads_the_plan(gpt2):
    _, _, a = gpt2
    rng = np.random.default_rng(0)
    scores = {g.id: rng.random(g.units) for g in a.prunable}
    units = {g.id: max(1, g.units // 3) for g in a.prunable}
    keep = kept_units(a, make_plan(a, units, scores=scores))
    for g in a.prunable:    # by hand: the units of highest score
        want = np.zeros(g.units, dtype=bool)
        want[np.argsort(-scores[g.id])[:units[g.id]]] = True
        assert (keep[g.id] == want).all(), g.name


def test_holdout_splits_tensors_and_dicts():
    x, y = torch.arange(100), torch.arange(100) * 2
    (xt, yt), (xv, yv) = holdout((x, y), 10)
    assert xt.tolist() == list(range(90)) and xv.tolist() == list(range(90, 100)) and (yv == 2 * xv).all()
    tr, va = holdout({"input_ids": x[:, None]}, 10)
    assert tr["input_ids"].shape == (90, 1) and va["input_ids"][0, 0] == 90
    small = (x[:40], y[:40])
    kept, none = holdout(small, 10)
    assert kept is small and none is None


def test_screen_config_is_checked():
    with pytest.raises(SearchConfigError, match="screen"):
        ImportanceConfig(screen=-1)


def test_screen_off_is_importance(gpt2):
    _, _, a = gpt2
    x = torch.randint(0, V, (64, SEQ))
    cfg = ImportanceConfig(steps=2, batch_size=16, calib_batches=1, kind="taylor")
    widths = [run(a, 0.5 * a.macs(), x, cfg=cfg)[3][-1]["widths"] for run in (importance, screen)]
    assert widths[0] == widths[1]


def test_transform_screens_and_reports(gpt2):
    m, ex, a = gpt2
    x = torch.randint(0, V, (128, SEQ))
    cfg = ImportanceConfig(steps=16, batch_size=16, calib_batches=1, kind="taylor", screen=3)
    out = fxadapt.transform(m, 0.5, ex, data={"input_ids": x}, strategy="importance", importance=cfg)
    rep = fxadapt.report(out)
    last = rep.history[-1]
    rows = last["screen"]
    assert [r["candidate"] for r in rows] == ["all", "heads+mlp", "mlp"]
    assert all(math.isfinite(r["val_kl"]) and r["val_kl"] >= 0 for r in rows)
    assert last["chosen"] == min(rows, key=lambda r: r["val_kl"])["candidate"]
    assert sum(isinstance(h, dict) and "step" in h for h in rep.history) == 16   # the budget, all of it
    assert "axis screen" in str(rep)
    chosen = next(r for r in rows if r["candidate"] == last["chosen"])
    if "hidden" in chosen["held"]:      # read from the user's module, not the report
        assert out.transformer.wte.weight.shape[1] == m.transformer.wte.weight.shape[1]
    assert fxadapt.analysis.count.count_macs(out, ex) <= 0.5 * a.macs() * 1.01
