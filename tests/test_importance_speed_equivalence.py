"""The fast exact scores (``fxadapt.search.replay``'s compiled slices, and its runs of the removals of one
group as copies of the batch) equal a straightforward reference: one full forward of the masked supernet per
removed unit (or bypassed block), written here without the replay, on a small CNN and a tiny GPT-2; and the
importance strategy's plan is the same with the replay off."""

import numpy as np
import pytest
import torch
from torch import nn

import fxadapt
import fxadapt.search.replay as replay
import fxadapt.search.scores as scores
from fxadapt.search.importance import ImportanceConfig, Masks, importance, score
from fxadapt.search.loop import teacher_of
from fxadapt.search.positions import divergence, position_mask
from fxadapt.search.scores import GATE_ROOT, Hooks, as_batch
from fxadapt.search.supernet import SupernetConfig, build_supernet
from fxadapt.train.data import prediction


def _convnet():
    torch.manual_seed(1)

    class Res(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                   nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))

        def forward(self, x):
            return torch.relu(x + self.f(x))

    model = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), Res(12), Res(12),
                          nn.Conv2d(12, 10, 3, stride=2, padding=1), nn.BatchNorm2d(10), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 10))
    with torch.no_grad():      # BatchNorm statistics away from the identity, so every channel matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_inner=16, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg).eval()


@torch.no_grad()
def _reference(sn, masks, teacher, calib, loss="kl"):
    """Per unit: (sum over samples of the divergence with that unit removed, by a full forward) minus the
    same with nothing removed, over the samples, floored at 0; per surviving block the same with it
    bypassed. No replay, no shared code path with the scorer beyond the hooks that apply masks."""
    sn.gm.eval()
    batches = [as_batch(b) for b in calib]
    t_outs = [prediction(b.call(teacher)).float() for b in batches]
    n = sum(b.size for b in batches)

    def total(m):
        with Hooks(sn, m):
            return sum(divergence(prediction(b.call(sn.gm)).float(), t, loss, position_mask(b))
                       for b, t in zip(batches, t_outs))

    base = total(masks)
    units = {}
    for g, keep in masks.units.items():
        units[g] = np.zeros(len(keep))
        for j in np.flatnonzero(keep):
            k = keep.copy()
            k[j] = False
            units[g][j] = max(total(Masks({**masks.units, g: k}, masks.blocks)) / n - base / n, 0.0)
    blocks = {b: max(total(Masks(masks.units, {**masks.blocks, b: False})) / n - base / n, 0.0)
              for b, on in masks.blocks.items() if on}
    return units, blocks


def _partly_pruned(sn, depth):
    """Masks with a few units of every group removed (an iterative prune's second round)."""
    rng = np.random.default_rng(0)
    units = {}
    for g, w in sn.spec.widths.items():
        keep = rng.random(w.units) < 0.7
        keep[0] = True
        units[g] = keep
    return Masks(units, {b: True for b in sn.spec.depths} if depth else {})


def _check(got, want, rtol=1e-6):
    for g in want:
        scale = max(float(np.max(want[g])), 1e-30)
        np.testing.assert_allclose(got[g], want[g], rtol=rtol, atol=1e-9 * scale, err_msg=f"group {g}")


@pytest.mark.parametrize("pruned", [False, True])
def test_cnn_ablation_scores_equal_full_forwards(pruned):
    model, x = _convnet(), torch.randn(96, 3, 10, 10)
    a = fxadapt.analyze(model, (x[:1],))
    sn = build_supernet(a, None, SupernetConfig(expand=1.0, depth_slots=0))
    masks = (_partly_pruned(sn, True) if pruned else
             Masks({g: np.ones(w.units, dtype=bool) for g, w in sn.spec.widths.items()},
                   {b: True for b in sn.spec.depths}))
    assert masks.blocks, "the CNN's residual blocks are removable"
    teacher = teacher_of(a, fxadapt.dist.DistContext())
    calib = [x[:48], x[48:]]
    want_u, want_b = _reference(sn, masks, teacher, calib)
    assert sum(float(v.sum()) for v in want_u.values()) > 0
    got_u, got_b = score(sn, masks, teacher, calib, ImportanceConfig(kind="ablation", depth=True), 0)
    _check(got_u, want_u)
    assert set(got_b) == set(want_b)
    np.testing.assert_allclose([got_b[b] for b in want_b], [want_b[b] for b in want_b], rtol=1e-6)


@pytest.mark.filterwarnings("ignore")
def test_gpt2_ablation_scores_equal_full_forwards():
    from fxadapt.train.data import Batch, Inputs

    model = _tiny_gpt2()
    ids = torch.randint(0, 64, (6, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0        # a padded position: counts in neither
    a = fxadapt.analyze(model, {"input_ids": ids[:1], "attention_mask": mask[:1]})
    sn = build_supernet(a, None, SupernetConfig(expand=1.0, depth_slots=0))
    teacher = teacher_of(a, fxadapt.dist.DistContext())
    calib = [Batch(Inputs((), {"input_ids": ids[k:k + 3], "attention_mask": mask[k:k + 3]})) for k in (0, 3)]
    for masks in (Masks({g: np.ones(w.units, dtype=bool) for g, w in sn.spec.widths.items()}, {}),
                  _partly_pruned(sn, False)):
        want, _ = _reference(sn, masks, teacher, calib)
        got, _ = score(sn, masks, teacher, calib, ImportanceConfig(kind="ablation"), 0)
        _check(got, want)


def _gpt2_case():
    from fxadapt.train.data import Batch, Inputs

    model = _tiny_gpt2()
    ids = torch.randint(0, 64, (6, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    a = fxadapt.analyze(model, {"input_ids": ids[:1], "attention_mask": mask[:1]})
    return a, Batch(Inputs((), {"input_ids": ids[:3], "attention_mask": mask[:3]}))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", ["cnn", "gpt2"])
def test_copies_equal_one_full_forward_per_removed_unit(case):
    """``Replay.run_copies``: copy ``c`` of the batch holds what a plain forward of the supernet with unit
    ``c`` removed returns (every group batched: no fallback)."""
    if case == "cnn":
        x = torch.randn(5, 3, 10, 10)
        a, batch = fxadapt.analyze(_convnet(), (x[:1],)), as_batch(x)
    else:
        a, batch = _gpt2_case()
    sn = build_supernet(a, None, SupernetConfig(expand=1.0, depth_slots=0))
    sn.gm.eval()
    masks = _partly_pruned(sn, False)
    with torch.no_grad():
        with Hooks(sn, masks):
            play = replay.Replay(sn.gm, (batch.inputs.args, batch.inputs.kwargs))
        for g, keep in masks.units.items():
            target = f"{GATE_ROOT}.w{g}"
            assert play.copies([target]) > 0, f"group {g} not batched"
            units = np.flatnonzero(keep)
            raw = sn.gm.get_submodule(target)()
            removed = [Masks({**masks.units, g: keep & (np.arange(len(keep)) != j)}, {}) for j in units]
            values = [raw * torch.as_tensor(m.units[g], dtype=torch.float32) for m in removed]
            got = prediction(play.run_copies([target], values))
            for c, m in enumerate(removed):
                with Hooks(sn, m):
                    want = prediction(batch.call(sn.gm))
                rows = got[c * batch.size:(c + 1) * batch.size]
                torch.testing.assert_close(rows, want, rtol=1e-5, atol=1e-6)


def test_scores_equal_in_runs_of_two_copies(monkeypatch):
    """The removals split into runs of at most two copies (``COPIES_CAP``) score what full forwards do."""
    monkeypatch.setattr(replay.Replay, "copies", lambda self, targets: 2)

    def no_single_runs(*_):
        raise AssertionError("a group's removals fell back to one run each")
    monkeypatch.setattr(scores.Ablation, "changed", no_single_runs)
    model, x = _convnet(), torch.randn(64, 3, 10, 10)
    a = fxadapt.analyze(model, (x[:1],))
    sn = build_supernet(a, None, SupernetConfig(expand=1.0, depth_slots=0))
    masks = _partly_pruned(sn, False)
    teacher = teacher_of(a, fxadapt.dist.DistContext())
    want, _ = _reference(sn, masks, teacher, [x[:32], x[32:]])
    got, _ = score(sn, masks, teacher, [x[:32], x[32:]], ImportanceConfig(kind="ablation"), 0)
    _check(got, want)


class _BatchCentred(nn.Module):
    """Centres its features over the batch (not per sample, even in eval mode)."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.head(h - h.mean(0, keepdim=True))


def test_batch_mixing_graph_is_not_run_as_copies():
    """A graph that reads other samples (a mean over the batch) is not batched into copies, and its scores
    are still the full forwards'."""
    x = torch.randn(16, 3, 6, 6)
    a = fxadapt.analyze(_BatchCentred().eval(), (x[:2],))
    sn = build_supernet(a, None, SupernetConfig(expand=1.0, depth_slots=0))
    masks = Masks({g: np.ones(w.units, dtype=bool) for g, w in sn.spec.widths.items()}, {})
    with torch.no_grad(), Hooks(sn, masks):
        play = replay.Replay(sn.gm, ((x,), {}))
    assert masks.units and all(play.copies([f"{GATE_ROOT}.w{g}"]) == 0 for g in masks.units)
    teacher = teacher_of(a, fxadapt.dist.DistContext())
    want, _ = _reference(sn, masks, teacher, [x[:8], x[8:]])
    got, _ = score(sn, masks, teacher, [x[:8], x[8:]], ImportanceConfig(kind="ablation"), 0)
    _check(got, want)


def test_plan_unchanged_without_the_replay(monkeypatch):
    """The whole strategy (hybrid scores, three prunes, distillation steps in between) keeps the same units
    with the replay as with plain full forwards (no batch recorded)."""
    model, x = _convnet(), torch.randn(128, 3, 10, 10)
    a = fxadapt.analyze(model, (x[:1],))
    cfg = ImportanceConfig(steps=6, iterations=3, batch_size=32, calib_batches=2)

    def run():
        _, plan, sn, hist = importance(a, 0.3 * a.macs(), (x,), cfg=cfg)
        return plan, hist[-1]["widths"]

    fast = run()
    monkeypatch.setattr(replay, "CAP", -1)
    monkeypatch.setattr(replay.Replay.__init__, "__defaults__", (-1, None))
    slow = run()
    assert fast[1] == slow[1]
    assert fast[0].units == slow[0].units
    assert fast[0].remove == slow[0].remove
    assert [e.index.tolist() for e in fast[0].edits] == [e.index.tolist() for e in slow[0].edits]
