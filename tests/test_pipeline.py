"""The pass pipeline: named steps in order, lint + shape check after each, ExportedProgram in and out,
the registry-driven cost cross-check, and HF EfficientNet's ``conv2d.padding`` convolutions."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fxadapt.passes.shape_check import ShapeCheckError
from torch import nn

import fxadapt
from fxadapt import meta
from fxadapt.examples import EXAMPLE_INPUT_SHAPE, example_model
from fxadapt.pipeline import transform as tr
from fxadapt.pipeline.runner import Step, run_steps

X = torch.randn(EXAMPLE_INPUT_SHAPE, generator=torch.Generator().manual_seed(0))


def test_pipeline_reads_as_documented():
    assert [s.name for s in tr.PIPELINE] == ["capture", "analyze", "plan", "materialize", "rewire_blocks",
                                              "recalibrate_bn", "recover", "fold_bn", "verify", "write_back",
                                              "dynamic_graph", "export"]
    rep = fxadapt.report(fxadapt.transform(example_model(), 0.5, (X,)))
    assert [n for n, _ in rep.timings] \
            == ["capture", "analyze", "plan", "materialize", "rewire_blocks", "verify",
                                           "write_back"]


def test_progress_reaches_its_total():
    seen = []
    fxadapt.transform(example_model(), 0.5, (X,), progress=lambda *a: seen.append(a))
    assert [d for _, d, _ in seen] == list(range(1, 8)) and {t for *_, t in seen} == {7}


def test_runner_shape_checks_the_graph_a_step_broke():
    gm = fxadapt.capture(example_model(), (X,))

    @dataclasses.dataclass(frozen=True)
    class J:
        gm: object
        inputs: object
        timings: tuple = ()

    def breaks(job):
        bad = torch.fx.GraphModule(job.gm, job.gm.graph)
        bad.get_submodule("stem.0").weight = nn.Parameter(torch.zeros(16, 4, 3, 3))
        return dataclasses.replace(job, gm=bad)

    with pytest.raises(ShapeCheckError, match="stem"):
        run_steps((Step("breaks", breaks),), J(gm, gm.meta[meta.INPUTS]))


def test_exported_program_in_without_a_second_capture(monkeypatch):
    ep = torch.export.export(example_model(), (X,))
    import fxadapt.ir.capture as cap

    monkeypatch.setattr(cap, "export", lambda *a, **k: pytest.fail("captured a second time"))
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: pytest.fail("captured a second time"))
    out = fxadapt.transform(ep, 0.5, (X,))
    r = fxadapt.report(out)
    assert 0.49 <= r.macs_after / r.macs_before <= 0.5
    assert out(X).shape == (1, 10)


def test_exported_program_out():
    ep = fxadapt.transform(example_model(), 0.5, (X,), output="exported_program")
    assert isinstance(ep, torch.export.ExportedProgram)
    small = fxadapt.transform(example_model(), 0.5, (X,))
    torch.testing.assert_close(ep.module()(X), small.eval()(X), rtol=1e-5, atol=1e-5)


def test_missing_overload_is_named_and_uncosted_op_reported(monkeypatch):
    from fxadapt.ops.registry import OPS

    monkeypatch.delitem(OPS, torch.ops.aten.conv2d.padding)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding="same"), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with pytest.warns(UserWarning, match="cost model misses 1 op"):
        a = fxadapt.analyze(m, (torch.randn(1, 3, 8, 8),))
    assert [u.op for u in a.uncosted] == ["aten.conv2d.padding"]
    assert a.uncosted[0].torch_macs == 3 * 8 * 9 * 64 and a.uncosted[0].model_macs == 0
    blocked = [n.meta[meta.RULE].blocked for n in a.gm.graph.nodes if meta.RULE in n.meta
               and n.meta[meta.RULE].blocked]
    assert blocked == ["no channel rule for aten.conv2d.padding: this overload has no registry entry "
                       "(registered: default)"]


def test_hf_efficientnet_padding_same_convs_transform():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.EfficientNetConfig(width_coefficient=0.25, depth_coefficient=0.25, image_size=64,
                                          hidden_dim=320, num_labels=10)
    torch.manual_seed(0)
    m = transformers.EfficientNetForImageClassification(cfg).eval()
    x = torch.randn(1, 3, 64, 64)
    a = fxadapt.analyze(m, (x,))
    assert a.uncosted == () and a.fired["conv"] > 10 and a.fired["blocked"] == 0
    assert a.macs() == fxadapt.analysis.count.count_macs(m, (x,))
    for budget in (0.5, 1.5):
        r = fxadapt.report(fxadapt.transform(m, budget, (x,)))
        assert abs(r.macs_after / r.macs_before - budget) <= 0.01 * budget


def test_default_alignment_falls_back_to_reach_the_budget():
    """``align="auto"`` (the default): the CPU's NCHWc block, or the largest power-of-two fraction of it
    with which the 1% window is reachable; every adapted width is a multiple of what was used."""
    from fxadapt.planning.align import auto_align

    out = fxadapt.transform(example_model(), 0.5, (X,))
    r = fxadapt.report(out)
    align = r.history[0]["align"]
    assert align in {auto_align() // 2 ** k for k in range(5)} \
            and 0.495 <= r.macs_after / r.macs_before <= 0.5
    assert all(c.after % align == 0 for c in r.groups if c.after != c.before)


def test_latency_budget_through_transform():
    """A latency budget is solved on its target (a simulated processor, ``fxadapt.hw.sim``) and verified like
    any result: MACs by an independent count below the original's, the simulator's own latency of the result
    within the window."""
    from fxadapt.analysis.count import count_macs
    from fxadapt.hw.sim import SimulatedTarget

    t, model = SimulatedTarget(seed=3), example_model()
    out = fxadapt.transform(model, fxadapt.Budget(latency=0.6, target=t), (X,))
    r = fxadapt.report(out)
    assert count_macs(out, (X,)) < count_macs(model, (X,)) and "latency (measured on the target)" in r.table()
    assert 0.9 * 0.6 * 0.98 <= t.seconds(out, (X,)) / t.seconds(model, (X,)) <= 0.6 * 1.02


class _LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def test_lstm_transforms_and_is_counted_independently():
    """CPU LSTM runs a fused kernel FlopCounterMode misses; the independent count covers it, so the cost
    model (4H(I+H) per step and row, every layer and direction) and the count agree and transform works."""
    torch.manual_seed(0)
    m, x = _LSTMNet().eval(), torch.randn(1, 5, 8)
    weights = sum(p.numel() for n, p in m.lstm.named_parameters() if "weight" in n)
    assert fxadapt.analysis.count.count_macs(m, (x,)) == 5 * weights + 32 * 4
    for budget in (0.5, 1.5):
        out = fxadapt.transform(m, budget, (x,), solve=fxadapt.planning.solver.SolveConfig(align=1))
        r = fxadapt.report(out)
        assert abs(r.macs_after / r.macs_before - budget) <= 0.02 * budget
    torch.testing.assert_close(out(x), m(x), rtol=1e-4, atol=1e-5)  # growth preserved the function


def test_attention_mode_option_reaches_the_analysis():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    m = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (1, 8))
    heads = fxadapt.transform(m, 0.5, {"input_ids": ids}, attention="heads",
                              solve=fxadapt.planning.solver.SolveConfig(align=1))
    dims = fxadapt.transform(m, 0.5, {"input_ids": ids}, attention="head_dim",
                             solve=fxadapt.planning.solver.SolveConfig(align=1))
    q = "encoder.layer.0.attention.self.query"
    gran = {mode: next(g.granularity for g in fxadapt.analyze(m, {"input_ids": ids}, attention=mode).groups
                       if g.name == q) for mode in ("heads", "head_dim")}
    # a unit: one head / one position x 4 heads
    assert gran == {"heads": 8, "head_dim": 4}
    assert heads.get_submodule(q).out_features % 8 == 0 and dims.get_submodule(q).out_features % 4 == 0
    with pytest.raises(fxadapt.FxAdaptError, match="attention must be one of"):
        fxadapt.transform(m, 0.5, {"input_ids": ids}, attention="rows")


def test_removing_any_blocks_of_a_deepened_graph_costs_what_the_model_predicts():
    """Regression: removing a block and the repeated copy right after it chained ``exit -> entry`` and
    resurrected the first block. Every subset of removable blocks (real and inserted) now runs exactly the
    MACs the cost model predicts, counted independently."""
    import itertools

    from fxadapt.passes.materialize import apply_plan

    from fxadapt.planning.plan import make_plan

    a = fxadapt.analyze(example_model(), (X,))
    deep = apply_plan(a.gm, make_plan(a, {}, repeat={b.id: 1 for b in a.blocks if b.repeatable})).graph_module
    a2 = fxadapt.analyze(deep)
    removable = [b.id for b in a2.blocks if b.removable]
    assert len(removable) == 6
    for k in range(1, len(removable) + 1):
        for remove in itertools.combinations(removable, k):
            out = apply_plan(a2.gm, make_plan(a2, {}, remove=set(remove))).graph_module
            assert fxadapt.analysis.count.count_macs(out, (X,)) \
                    == a2.cost.macs(None, {b: 0.0 for b in remove}), remove
