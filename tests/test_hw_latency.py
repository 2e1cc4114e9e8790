"""Hardware-aware adaptation (issue 9): targets, lookup-table keys and cache, the latency solver and its
repair loop against injected deterministic timings, alignment, bad input, and one real-measurement smoke
test (no timing thresholds anywhere)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.errors import BudgetError, FxAdaptError
from fxadapt.hw.latency import FakeMeasure, LatencyModel, fake_lut, solve_latency, step_timer
from fxadapt.hw.lut import LUT, layer_onnx
from fxadapt.hw.target import Target, TargetError
from fxadapt.planning.budget import Budget, BudgetWarning, parse_budget
from fxadapt.planning.solver import SolveConfig, in_window, solve_widths


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FXADAPT_CACHE_DIR", str(tmp_path / "cache"))


class Net(nn.Module):
    """Three conv stages with a residual join and a linear head: several groups, some wide."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(96, 160, 3, padding=1), nn.ReLU(), nn.Conv2d(160, 96, 1))
        self.dw = nn.Conv2d(96, 96, 3, padding=1, groups=96)
        self.b = nn.Sequential(nn.Conv2d(96, 200, 1), nn.ReLU(), nn.Conv2d(200, 6, 1))
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.a(x)
        return self.head(self.b(self.dw(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    m = Net().eval()
    x = torch.randn(1, 3, 16, 16)
    return m, x, fxadapt.analyze(m, (x,))


def conv_widths(model):
    return [(m.in_channels, m.out_channels) for m in model.modules() if isinstance(m, nn.Conv2d)]


# ---- targets -----------------------------------------------------------------------------------------


def test_target_defaults_and_alignment():
    t = Target()
    assert (t.runtime, t.device, t.threads, t.batch) == ("onnxruntime", "cpu", 1, None)
    assert t.align() in (4, 8, 16)
    assert Target(runtime="torch").align() == t.align()


def test_unknown_runtime_and_device_are_clear_errors():
    with pytest.raises(TargetError, match="unknown runtime 'tensorrt'; use one of: onnxruntime, torch"):
        Target(runtime="tensorrt")
    with pytest.raises(TargetError, match="unknown device 'tpu'"):
        Target(device="tpu")
    with pytest.raises(TargetError, match="threads must be a positive int"):
        Target(threads=0)
    assert issubclass(TargetError, FxAdaptError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_target_without_gpu_is_a_clear_error():
    for runtime in ("torch", "onnxruntime"):
        with pytest.raises(TargetError, match="a CUDA target needs a GPU"):
            Target(runtime=runtime, device="cuda")


def test_target_batch_repeats_the_example():
    x = torch.randn(2, 3, 4, 4)
    assert Target(batch=5).inputs((x,)).args[0].shape == (5, 3, 4, 4)
    assert Target().inputs((x,)).args[0].shape == (2, 3, 4, 4)


# ---- budgets -----------------------------------------------------------------------------------------


def test_budget_latency_forms():
    assert Budget(latency=0.5).latency == 0.5
    b = parse_budget(Budget(macs=0.5, latency="3.2ms", target=Target()), 1e9, 1e6)
    assert b.macs == 5e8 and b.latency == "3.2ms" and b.target == Target()
    with pytest.raises(BudgetError, match="cannot read latency budget"):
        Budget(latency="fast")
    with pytest.raises(BudgetError, match="duration string"):
        Budget(latency=32.0)
    with pytest.raises(BudgetError, match="macs=, params= or latency="):
        parse_budget(Budget(), 1e9, 1e6)


# ---- lookup-table keys and cache -----------------------------------------------------------------------


def test_lut_keys_stable_and_follow_widths(net):
    _, _, a = net
    lm = LatencyModel(a, fake_lut(), 1.0)
    k1, k2 = lm.keys({}), LatencyModel(a, fake_lut(), 1.0).keys({})
    assert k1 == k2                       # same shapes, same keys (a fresh analysis-side rebuild)
    assert len(k1) == 7 and [k[0] for k in k1] == ["conv"] * 6 + ["linear"]
    assert k1[0][2:4] == (3, 96)          # stem: C_in 3, C_out 96
    dw = next(k for k in k1 if k[4] != 1)
    assert dw[2] == dw[3] == dw[4] == 96  # depthwise: groups follows C_in
    g = a.groups[[gg.name for gg in a.groups].index("stem.0")].id
    k3 = lm.keys({g: 48})
    dw3 = next(k for k in k3 if k[4] != 1)
    assert k3[0][3] == 48 and dw3[2] == dw3[3] == dw3[4] == 48
    assert lm.keys({g: 48}) == k3


def test_lut_cached_second_lookup_does_not_measure(tmp_path):
    calls = []
    timer = lambda k: calls.append(k) or step_timer(k)
    key = ("conv", 1, 16, 32, 1, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1), False, (0, 0), True, "float32")
    lut = LUT(timer=timer, progress=False)
    lut.get([key, key])
    lut.get([key])
    assert len(calls) == 1 and lut.measured == 1
    again = LUT(timer=timer, progress=False)          # a new process: read from disk
    assert again.get([key]).tolist() == [step_timer(key)] and len(calls) == 1
    assert again.path.exists() and str(again.path).startswith(str(tmp_path / "cache"))


def test_layer_onnx_builds_every_kind():
    conv = ("conv", 1, 8, 16, 1, (6, 6), (3, 3), (2, 2), (1, 1), (1, 1), False, (0, 0), True, "float32")
    dw = ("conv", 1, 8, 8, 8, (6, 6), (3, 3), (1, 1), ("same",), (1, 1), False, (0, 0), False, "float32")
    tr = ("conv", 1, 8, 4, 1, (6, 6), (2, 2), (2, 2), (0, 0), (1, 1), True, (0, 0), True, "float32")
    for key, op in ((conv, "Conv"), (dw, "Conv"), (tr, "ConvTranspose"), (("linear", 2, 8, 4, True, "float32"), "Gemm")):
        proto, feed = layer_onnx(key)
        assert [n.op_type for n in proto.graph.node] == [op]


# ---- alignment ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_auto_alignment_end_to_end_in_every_group_and_window(net, budget):
    model, x, a = net
    align = Target().align()
    small = fxadapt.transform(model, budget, (x,), solve=SolveConfig(align="auto"))
    r = fxadapt.report(small)
    assert in_window(r.macs_after, budget * r.macs_before, False)
    widths = {g.name: g.width for g in a.groups}
    for (cin, cout), (cin0, cout0) in zip(conv_widths(small), conv_widths(model)):
        for w, w0 in ((cin, cin0), (cout, cout0)):
            assert w == w0 or w % align == 0, (w, w0)
    assert widths["stem.0"] == 96


def test_groups_narrower_than_the_alignment_are_left_alone():
    m = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 64, 1), nn.ReLU(), nn.Conv2d(64, 4, 1))
    a = fxadapt.analyze(m, (torch.randn(1, 3, 4, 4),))
    n = solve_widths(a, 0.6 * a.macs(), SolveConfig(align=16, strict=False))
    narrow = next(g for g in a.prunable if g.units == 6)
    assert n.get(narrow.id, 6) == 6
    assert all(v % 16 == 0 or v == a.groups[g].units for g, v in n.items())


# ---- latency solver and repair against injected timings ---------------------------------------------------


@pytest.mark.parametrize("frac", [0.4, 0.55, 0.7, 0.85])
def test_latency_solver_lands_in_window_with_aligned_widths(net, frac):
    _, _, a = net
    lut = fake_lut()
    fake = FakeMeasure(a, lut, gain=1.15, overhead=3e-6)
    sol = solve_latency(a, Budget(latency=frac), lut=lut, measure=fake, cfg=SolveConfig(align=8))
    assert (1 - 0.05) * sol.budget <= sol.latency <= sol.budget
    assert sol.latency == pytest.approx(fake(sol.units))
    assert all(v % 8 == 0 or v == a.groups[g].units for g, v in sol.units.items())
    assert len(sol.history) <= 5


def test_repair_corrects_a_biased_prediction(net):
    """The end-to-end 'measurement' departs from the table affinely (1.4 L - 0.4 L0: smaller models run
    faster than predicted): the first attempt misses the window, the recalibration brings it in."""
    _, _, a = net
    lut = fake_lut()
    biased = FakeMeasure(a, lut, gain=1.0, overhead=0.0)
    calls = []

    def measure(units):
        calls.append(units)
        full = biased(units)
        return full if not units else 1.4 * full - 0.4 * biased({})

    sol = solve_latency(a, Budget(latency=0.6), lut=lut, measure=measure, cfg=SolveConfig(align=8))
    assert len(sol.history) >= 2 and sol.history[0]["measured"] < 0.95 * sol.budget
    assert 0.95 * sol.budget <= sol.latency <= sol.budget


def test_alignment_step_timings_prefer_aligned_widths(net):
    """With a step at non-multiples of 8 in the timings, aligned widths win at equal budget."""
    _, _, a = net
    lut = fake_lut(lambda k: step_timer(k, block=8))
    fake = FakeMeasure(a, lut)
    sol = solve_latency(a, Budget(latency=0.6), lut=lut, measure=fake, cfg=SolveConfig(align=8))
    lm = LatencyModel(a, lut, 1.0)
    unaligned = {g: v - 1 if v % 8 == 0 and v > 8 else v for g, v in sol.units.items()}
    assert lm.lut_sum(unaligned) > lm.lut_sum(sol.units)


def test_latency_and_macs_budgets_both_hold(net):
    _, _, a = net
    lut = fake_lut()
    fake = FakeMeasure(a, lut)
    sol = solve_latency(a, Budget(latency=0.9, macs=0.5), lut=lut, measure=fake, cfg=SolveConfig(align=8))
    assert sol.binding == "macs" and sol.latency <= sol.budget
    assert in_window(a.cost.macs(sol.units), 0.5 * a.macs(), False)
    sol = solve_latency(a, Budget(latency=0.5, macs=0.9), lut=lut, measure=fake, cfg=SolveConfig(align=8))
    assert sol.binding == "latency" and a.cost.macs(sol.units) <= 0.9 * a.macs()


def test_absolute_latency_budget(net):
    _, _, a = net
    lut = fake_lut()
    fake = FakeMeasure(a, lut)
    base = fake({})
    sol = solve_latency(a, Budget(latency=f"{0.6 * base * 1e6:.3f}us"), lut=lut, measure=fake,
                        cfg=SolveConfig(align=8))
    assert sol.budget == pytest.approx(0.6 * base, rel=1e-6) and sol.latency <= sol.budget


def test_latency_below_fastest_reachable_states_the_range(net):
    _, _, a = net
    lut = fake_lut()
    with pytest.raises(BudgetError, match=r"outside the reachable range \[[0-9.]+, [0-9.]+\] ms = \[0\.[0-9]+x, 1\.000x\]"):
        solve_latency(a, Budget(latency=0.001), lut=lut, measure=FakeMeasure(a, lut), cfg=SolveConfig(align=8))
    with pytest.raises(BudgetError, match="do not grow models"):
        solve_latency(a, Budget(latency=1.5), lut=lut, measure=FakeMeasure(a, lut), cfg=SolveConfig(align=8))


def test_unreachable_window_warns_with_the_closest(net):
    """Coarse alignment (64) cannot land within 5% of 0.8: the closest below the budget, with a warning."""
    _, _, a = net
    lut = fake_lut()
    with pytest.warns(BudgetWarning, match="outside the 5% window"):
        sol = solve_latency(a, Budget(latency=0.8), lut=lut, measure=FakeMeasure(a, lut), cfg=SolveConfig(align=64))
    assert sol.latency <= sol.budget


# ---- predictor ---------------------------------------------------------------------------------------


def test_predictor_learns_injected_latencies(net):
    from fxadapt.hw import predictor as P

    _, _, a = net
    lut = fake_lut()
    fake = FakeMeasure(a, lut)
    units = P.sample_units(a, 40, align=8, seed=0)
    assert all(v % 8 == 0 or v == a.groups[g].units for u in units for g, v in u.items())
    X, lm = P.encode(a, units)
    y = P.collect(a, units, fake, progress=False)
    err = P.cross_validate(X, lm, y, folds=5, steps=400)
    s = P.summary(err)
    assert s["n"] == 40 and 0 <= s["mean"] and math.isfinite(s["p95"])
    ratios = torch.tensor(X[:2], dtype=torch.float32, requires_grad=True)
    pred = P.LatencyPredictor(steps=50).fit(X, lm, y)
    pred.torch_predict(ratios, torch.tensor(lm[:2], dtype=torch.float32)).sum().backward()
    assert ratios.grad is not None and ratios.grad.abs().sum() > 0


# ---- real measurement (no thresholds) ---------------------------------------------------------------------


def test_real_measurement_smoke(net, tmp_path):
    model, x, a = net
    target = Target()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = solve_latency(a, Budget(latency=0.7), target, progress=False, max_repairs=1)
    assert sol.units and sol.base > 0 and sol.latency > 0 and len(sol.history) >= 1
    lut = LUT(target, progress=False)
    assert lut.path.exists() and len(lut.table) > 0
    t = Target(runtime="torch").compile(model, (x,))
    assert t().shape == (1, 10)


def test_benchmark_and_cli(tmp_path, monkeypatch):
    from fxadapt.cli import main
    from fxadapt.hw.bench import benchmark

    monkeypatch.chdir(tmp_path)
    m = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(),
                      nn.LazyLinear(5))
    x = torch.randn(1, 3, 12, 12)
    m(x)
    res = benchmark(m.eval(), (x,), [0.5], targets=[Target(), Target(runtime="torch")], runs=2, progress=False)
    assert [r["budget"] for r in res.rows] == ["original", "0.5"]
    assert set(res.rows[1]["latency"]) == {"onnxruntime-cpu-1t", "torch-cpu-1t"}
    assert "onnxruntime-cpu-1t ms" in res.table()
    assert res.plot(str(tmp_path / "p.png")) and (tmp_path / "p.png").stat().st_size > 0
    assert main(["bench", "--example", "--budgets", "0.75", "--targets", "torch-cpu", "--runs", "2", "--quiet",
                 "--json", "b.json", "--plot", "b.png"]) == 0
    assert (tmp_path / "b.json").exists() and (tmp_path / "b.png").exists()
    assert main(["bench", "--example", "--targets", "tvm-cpu", "--quiet"]) == 2
