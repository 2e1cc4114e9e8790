"""strategy="importance": data-scored units, allocation under one price, distillation (issue 25)."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import fxadapt
from fxadapt.planning.allocate import allocate
from fxadapt.search.importance import ImportanceConfig, Masks, drawn_targets, importance, sample_loss, score
from fxadapt.search.loop import teacher_of
from fxadapt.search.supernet import SupernetConfig, build_supernet
from fxadapt.train.data import Batches

FACTORS = (4.0, 2.0, 1.0, 0.5)   # how much each branch moves the logits: the planted importance order


class Branches(nn.Module):
    """Four branches, each reading its own 6 of the 24 inputs; branch k's logits are scaled by FACTORS[k].
    Its weights are the same up to that scale, so the weights alone (L1) cannot tell them apart."""

    def __init__(self, hidden: int = 16, classes: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.inner = nn.ModuleList(nn.Linear(6, hidden) for _ in FACTORS)
        self.outer = nn.ModuleList(nn.Linear(hidden, classes, bias=False) for _ in FACTORS)
        with torch.no_grad():
            for a, b in zip(self.inner, self.outer):
                a.weight.copy_(torch.randn(hidden, 6, generator=g) / 6 ** 0.5)
                a.bias.zero_()
                b.weight.copy_(torch.randn(classes, hidden, generator=g) / hidden ** 0.5)
        self.register_buffer("scale", torch.tensor(FACTORS))

    def forward(self, x):
        parts = x.split(6, dim=1)
        return sum(self.scale[k] * self.outer[k](torch.relu(self.inner[k](p))) for k, p in enumerate(parts))


def _flops(model, x):
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.eval()(x)
    return fc.get_total_flops()


def _branch_widths(model):
    return [lin.out_features for lin in model.inner]


@pytest.mark.filterwarnings("ignore::fxadapt.BudgetWarning")    # 4 x 16 units: too coarse for a 1% window
def test_planted_branches_keep_widths_in_order_of_importance():
    torch.manual_seed(0)
    model, x = Branches(), torch.randn(512, 24)
    cfg = ImportanceConfig(steps=0, iterations=2, batch_size=128, calib_batches=4)
    small = fxadapt.transform(model, 0.4, (x[:1],), data=(x,), strategy="importance", importance=cfg, solve=
                              fxadapt.SolveConfig(align=1))
    widths = _branch_widths(small)
    rho = spearmanr(widths, FACTORS)[0]
    assert rho >= 0.8, widths
    free = _branch_widths(fxadapt.transform(model, 0.4, (x[:1],), strategy="datafree"))
    assert max(free) - min(free) <= 1     # data-free: one global scale, blind to which branch matters
    assert widths[0] > widths[-1] + 4


def _convnet():
    torch.manual_seed(1)

    class Res(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                   nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))

        def forward(self, x):
            return torch.relu(x + self.f(x))

    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), Res(16), Res(16),
                         nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)).eval()


@pytest.mark.parametrize("budget, depth", [(0.5, False), (0.25, True)])
def test_budget_met_by_independent_count(budget, depth):
    model, x = _convnet(), torch.randn(192, 3, 12, 12)
    cfg = ImportanceConfig(steps=6, iterations=2, batch_size=64, calib_batches=2, depth=depth)
    small = fxadapt.transform(model, budget, (x[:1],), data=(x,), strategy="importance", importance=cfg)
    ratio = _flops(small, x[:2]) / _flops(model, x[:2])
    assert 0.85 * budget <= ratio <= budget * (1 + 1e-6), ratio
    hist = fxadapt.report(small).history
    assert sum("step" in h for h in hist) == 6                   # every weight step counted


def test_kept_units_are_the_top_scored_ones():
    """The scores through the gates equal an independent autograd computation on the plain model (per-sample
    masks after each BatchNorm), and the pruned model keeps exactly the top-scored channels."""
    model, x = _convnet(), torch.randn(128, 3, 12, 12)
    cfg = ImportanceConfig(steps=0, iterations=1, batch_size=64, calib_batches=2, depth=False, kind="fisher")
    calib = [Batches((x,), cfg.batch_size, cfg.seed + 7919).batch(k)[0] for k in range(cfg.calib_batches)]
    a = fxadapt.analyze(model, (x[:1],))
    sn = build_supernet(a, None, SupernetConfig(expand=1.0, depth_slots=0))
    masks = Masks({g: np.ones(w.units, dtype=bool) for g, w in sn.spec.widths.items()}, {})
    got, _ = score(sn, masks, teacher_of(a, fxadapt.dist.DistContext()), calib, cfg, 0)

    # independent: d(loss_i)/d(mask[i, c]) with a per-sample mask after the stem's BatchNorm (group of 16
    # channels coupled through the residual adds) and after the last BatchNorm (24 channels)
    bns = {16: [model[1], model[3].f[4], model[4].f[4]], 24: [model[6]]}
    ref = {}
    for width, mods in bns.items():
        total = torch.zeros(width, dtype=torch.float64)
        for k, xb in enumerate(calib):
            mask = torch.ones(len(xb), width, 1, 1, requires_grad=True)
            hs = [m.register_forward_hook(lambda _m, _i, o, mask=mask: o * mask) for m in mods]
            out = model(xb)
            for h in hs:
                h.remove()
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k)
            y = drawn_targets(model(xb).detach(), "kl", gen)
            (g,) = torch.autograd.grad(sample_loss(out, y, "kl"), mask)
            total += g.view(len(xb), width).double().pow(2).sum(0)
        ref[width] = (0.5 * total / len(x)).numpy()
    coupled = max((g for g in a.prunable if g.units == 16), key=lambda g: len(g.members))   # stem + residuals
    mine = {16: got[coupled.id], 24: next(got[g.id] for g in a.prunable if g.units == 24)}
    for width in ref:
        np.testing.assert_allclose(mine[width], ref[width], rtol=1e-3, atol=1e-9)

    small = fxadapt.transform(model, 0.5, (x[:1],), data=(x,), strategy="importance", importance=cfg,
                              recalibrate_bn=0)
    kept_stem = [int(torch.nonzero((model[0].weight == w).flatten(1).all(1))[0]) for w in small[0].weight]
    top = np.argsort(-ref[16], kind="stable")[:len(kept_stem)]
    assert sorted(kept_stem) == sorted(top.tolist())


def test_label_free_calibration_data_works():
    model, x = _convnet(), torch.randn(128, 3, 12, 12)
    cfg = ImportanceConfig(steps=4, iterations=2, batch_size=32, calib_batches=1)
    loader = DataLoader(TensorDataset(x), batch_size=32)          # inputs only, no labels anywhere
    for data in ((x,), loader):
        small = fxadapt.transform(model, 0.5, (x[:1],), data=data, strategy="importance", importance=cfg)
        assert small(x[:2]).shape == (2, 10)


def test_allocation_prices_depth_and_width_together():
    model, x = _convnet(), torch.randn(2, 3, 12, 12)
    a = fxadapt.analyze(model, (x[:1],))
    scores = {g.id: np.ones(g.units) for g in a.prunable}
    blocks = {b.id: 1e-9 for b in a.blocks if b.removable}          # worthless blocks go first
    bounds = {g.id: (1, g.units) for g in a.prunable}
    units, present = allocate(a, 0.7 * a.macs(), scores, blocks, bounds)
    assert blocks and all(v == 0.0 for v in present.values())
    assert a.cost.macs(units, present) <= 0.7 * a.macs()


def test_importance_refuses_growth_and_missing_data():
    model, x = _convnet(), torch.randn(8, 3, 12, 12)
    a = fxadapt.analyze(model, (x[:1],))
    with pytest.raises(fxadapt.SearchConfigError, match="shrinks"):
        importance(a, 1.5 * a.macs(), (x,))
    with pytest.raises(fxadapt.InputError, match="searches on data"):
        fxadapt.transform(model, 0.5, (x[:1],), strategy="importance")
    with pytest.raises(fxadapt.SearchConfigError, match="iterations"):
        ImportanceConfig(iterations=0)


@pytest.mark.filterwarnings("ignore::fxadapt.BudgetWarning")
def test_floor_holds_every_group_at_its_uniform_share():
    model, x = Branches(), torch.randn(256, 24)
    cfg = ImportanceConfig(steps=0, iterations=1, batch_size=128, calib_batches=1, floor=1.0)
    small = fxadapt.transform(model, 0.4, (x[:1],), data=(x,), strategy="importance", importance=cfg,
                              solve=fxadapt.SolveConfig(align=1))
    widths = _branch_widths(small)
    assert max(widths) - min(widths) <= 1, widths     # floor 1: nothing left to move between the branches


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind, labels", [("fisher", False), ("hybrid", True)])
def test_hugging_face_dict_batches(kind, labels):
    """A causal LM on ``{"input_ids", "attention_mask"}`` batches (no labels: the original's predictions are
    the targets; with ``labels``, half the weight-step loss is next-token cross-entropy) meets the budget by
    an independent count and still generates."""
    from fxadapt.analysis.count import count_macs

    model = _tiny_gpt2()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (32, 16), generator=g)
    data = [{"input_ids": ids[k:k + 8], "attention_mask": torch.ones_like(ids[k:k + 8])}
            for k in range(0, 32, 8)]
    if labels:
        data = [{**b, "labels": b["input_ids"].clone()} for b in data]
    example = {"input_ids": ids[:2], "attention_mask": torch.ones_like(ids[:2])}
    cfg = ImportanceConfig(steps=4, iterations=2, batch_size=8, calib_batches=2, kind=kind,
                           kd=0.5 if labels else 1.0)
    small = fxadapt.transform(model, 0.5, example, data=data, strategy="importance", importance=cfg)
    ratio = count_macs(small, example) / count_macs(model, example)
    assert 0.4 <= ratio <= 0.5 * (1 + 1e-3), ratio
    assert sum("step" in h for h in fxadapt.report(small).history) == 4
    out = small.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


@pytest.mark.filterwarnings("ignore::fxadapt.BudgetWarning")
def test_min_and_max_width_hold():
    model, x = _convnet(), torch.randn(128, 3, 12, 12)
    cfg = ImportanceConfig(steps=2, iterations=2, batch_size=64, calib_batches=1)
    small = fxadapt.transform(model, 0.3, (x[:1],), data=(x,), strategy="importance", importance=cfg,
                              min_width={"5": 20})
    assert small[5].out_channels >= 20
    assert _flops(small, x[:2]) <= 0.3 * _flops(model, x[:2]) * (1 + 1e-3)
    wide = fxadapt.transform(model, 0.6, (x[:1],), data=(x,), strategy="importance", importance=cfg,
                             max_width={"5": 6})
    assert wide[5].out_channels <= 6


def test_hybrid_scores_narrow_groups_of_blocks_exactly():
    """kind="hybrid": groups of at most EXACT_UNITS units that are blocks of channels (a GPT-2's heads) get
    the exact ablation scores, every other group fisher's (single channels, however narrow: the convnet's
    16- and 24-channel groups, the GPT-2's hidden size and MLP); both estimate the same KL increase (on a
    wide group fisher and ablation agree in scale)."""
    from fxadapt.search.importance import EXACT_UNITS

    model, x = _convnet(), torch.randn(128, 3, 12, 12)
    a = fxadapt.analyze(model, (x[:1],))
    sn = build_supernet(a, None, SupernetConfig(expand=1.0, depth_slots=0))
    masks = Masks({g: np.ones(w.units, dtype=bool) for g, w in sn.spec.widths.items()}, {})
    teacher = teacher_of(a, fxadapt.dist.DistContext())
    calib = [x[:64], x[64:]]
    got = {k: score(sn, masks, teacher, calib, ImportanceConfig(kind=k), 0)[0]
           for k in ("fisher", "ablation", "hybrid")}
    assert any(k.sum() <= EXACT_UNITS for k in masks.units.values())    # narrow, but single channels
    for g in masks.units:
        np.testing.assert_allclose(got["hybrid"][g], got["fisher"][g], rtol=1e-6)
    wide = next(g for g, k in masks.units.items() if k.sum() > EXACT_UNITS)
    ratio = got["fisher"][wide].sum() / got["ablation"][wide].sum()
    assert 0.2 <= ratio <= 5, ratio

    sn, masks, teacher = _gpt2_supernet(_tiny_gpt2(), 16)
    ids = torch.randint(0, 500, (4, 16), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    got = {k: score(sn, masks, teacher, [batch], ImportanceConfig(kind=k), 0)[0]
           for k in ("fisher", "ablation", "hybrid")}
    heads = [g for g in masks.units if sn.analysis.groups[g].granularity > 1]
    assert heads and all(len(masks.units[g]) <= EXACT_UNITS for g in heads)
    for g in masks.units:
        want = got["ablation"] if g in heads else got["fisher"]
        np.testing.assert_allclose(got["hybrid"][g], want[g], rtol=1e-6, err_msg=str(g))


def _gpt2_supernet(model, length):
    ids = torch.zeros(1, length, dtype=torch.long)
    a = fxadapt.analyze(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    sn = build_supernet(a, None, SupernetConfig(expand=1.0, depth_slots=0))
    masks = Masks({g: np.ones(w.units, dtype=bool) for g, w in sn.spec.widths.items()}, {})
    return sn, masks, teacher_of(a, fxadapt.dist.DistContext())


@pytest.mark.filterwarnings("ignore")
def test_padded_positions_do_not_count(monkeypatch):
    """A batch of a 16-token and a 10-token sequence (right-padded, attention_mask 0 on the padding) scores
    as the mean of the two sequences scored alone, unpadded (the 10-token one through its own capture):
    padded positions count in no score (fisher, activation, ablation) and in no distillation loss."""
    import fxadapt.search.scores as scores_module
    from fxadapt.search.positions import distill
    from fxadapt.train.data import Batch, Inputs

    model = _tiny_gpt2()
    monkeypatch.setattr(scores_module, "drawn_targets", lambda t, loss, gen: t.argmax(-1))  # no draw
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    ids[1, 10:] = 0
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0

    def batch(i, m):
        return Batch(Inputs((), {"input_ids": i, "attention_mask": m}))

    sn16, masks16, t16 = _gpt2_supernet(model, 16)
    sn10, masks10, t10 = _gpt2_supernet(model, 10)
    assert {g: len(k) for g, k in masks16.units.items()} == {g: len(k) for g, k in masks10.units.items()}
    hidden = max(masks16.units, key=lambda g: len(sn16.analysis.groups[g].members))
    for kind in ("fisher", "activation", "ablation"):
        cfg = ImportanceConfig(kind=kind)
        padded = score(sn16, masks16, t16, [batch(ids, mask)], cfg, 0)[0]
        first = score(sn16, masks16, t16, [batch(ids[:1], mask[:1])], cfg, 0)[0]
        second = score(sn10, masks10, t10, [batch(ids[1:, :10], mask[1:, :10])], cfg, 0)[0]
        scale = max(float(v.max()) for v in padded.values())
        # the hidden size's sites include the position embeddings, which have no batch axis: a per-sample
        # gradient or activation is not defined there (ablation, exact, covers that group)
        for g in padded if kind == "ablation" else set(padded) - {hidden}:
            want = 0.5 * (first[g] + second[g])
            np.testing.assert_allclose(padded[g], want, rtol=2e-2, atol=1e-3 * scale, err_msg=f"{kind} {g}")

    s, t = torch.randn(2, 16, 50), torch.randn(2, 16, 50)
    rows = torch.cat([s[0], s[1, :10]]), torch.cat([t[0], t[1, :10]])
    torch.testing.assert_close(distill(s, t, "kl", 4.0, mask.float()), distill(*rows, "kl", 4.0))


def test_data_errors_before_any_work():
    """Fewer samples than one batch, a batch the model cannot take, labels that do not fit the output:
    one-line errors from transform, before any search."""
    model, x = _convnet(), torch.randn(100, 3, 12, 12)
    cfg = ImportanceConfig(steps=2, iterations=1, batch_size=128, calib_batches=4)
    with pytest.raises(fxadapt.InputError, match="data has 100 samples.*batch_size = 128") as e:
        fxadapt.transform(model, 0.5, (x[:1],), data=(x,), strategy="importance", importance=cfg)
    assert "\n" not in str(e.value)
    with pytest.raises(fxadapt.InputError, match="shape"):
        fxadapt.transform(model, 0.5, (x[:1],), data=(torch.randn(128, 3, 10, 10),), strategy="importance")
    with pytest.raises(fxadapt.InputError, match="classes"):
        fxadapt.transform(model, 0.5, (x[:1],), data=(torch.randn(128, 3, 12, 12), torch.full((128,), 50)),
                          strategy="importance")


def test_scores_all_reduced_over_a_gloo_group():
    """Under a process group the sums over samples are all-reduced before any division: on a gloo group of
    one process (every rank alone) the scores equal the one-process ones, through the same code path."""
    import socket

    import torch.distributed as tdist

    from fxadapt.search.scores import all_sum

    model, x = _convnet(), torch.randn(128, 3, 12, 12)
    a = fxadapt.analyze(model, (x[:1],))
    sn = build_supernet(a, None, SupernetConfig(expand=1.0, depth_slots=0))
    masks = Masks({g: np.ones(w.units, dtype=bool) for g, w in sn.spec.widths.items()},
                  {b: True for b in sn.spec.depths})
    teacher = teacher_of(a, fxadapt.dist.DistContext())
    cfg = ImportanceConfig(kind="hybrid", depth=True)
    alone = score(sn, masks, teacher, [x[:64], x[64:]], cfg, 0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        ctx = fxadapt.dist.DistContext(0, 2, "cpu")       # active: takes the all-reduce path
        assert all_sum([torch.tensor([1.0, 2.0])], ctx)[0].tolist() == [1.0, 2.0]
        reduced = score(sn, masks, teacher, [x[:64], x[64:]], cfg, 0, "cpu", ctx)
    finally:
        tdist.destroy_process_group()
    for g in alone[0]:
        np.testing.assert_allclose(reduced[0][g], alone[0][g], rtol=1e-6)
    assert alone[1] and reduced[1] == pytest.approx(alone[1], rel=1e-9)


@pytest.mark.filterwarnings("ignore::fxadapt.BudgetWarning")
def test_params_budget_met_by_counting_parameters():
    """A params budget: units priced by their parameters; the result meets it by sum(p.numel())."""
    model, x = _convnet(), torch.randn(192, 3, 12, 12)
    cfg = ImportanceConfig(steps=4, iterations=2, batch_size=64, calib_batches=2)
    small = fxadapt.transform(model, fxadapt.Budget(params=0.4), (x[:1],), data=(x,), strategy="importance",
                              importance=cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())      # noqa: E731
    ratio = count(small) / count(model)
    assert 0.3 <= ratio <= 0.4 * (1 + 1e-6), ratio
    assert small(x[:2]).shape == (2, 10)
    with pytest.raises(fxadapt.BudgetError, match="latency"):
        fxadapt.transform(model, fxadapt.Budget(macs=0.5, params=0.5), (x[:1],), data=(x,),
                          strategy="importance", importance=cfg)
