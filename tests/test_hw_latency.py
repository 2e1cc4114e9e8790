"""Hardware-aware adaptation: targets, lookup-table keys and cache, alignment, bad input and ``fxadapt bench``
(the latency solver is tested against a simulated processor in ``test_latency_solver.py``)."""

from __future__ import annotations

import pytest
import torch
from models import LatencyNet
from torch import nn

import fxadapt
from fxadapt.errors import BudgetError, FxAdaptError
from fxadapt.hw.layers import layer_onnx
from fxadapt.hw.lut import LUT
from fxadapt.hw.sim import fake_lut, step_timer
from fxadapt.hw.target import Target, TargetError
from fxadapt.planning.budget import Budget, parse_budget
from fxadapt.planning.latency import LatencyModel
from fxadapt.planning.solver import SolveConfig, in_window, solve_widths


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FXADAPT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    m = LatencyNet().eval()
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
    for key, op in ((conv, "Conv"), (dw, "Conv"), (tr, "ConvTranspose"),
                    (("linear", 2, 8, 4, True, "float32"), "Gemm")):
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


# ---- fxadapt bench ---------------------------------------------------------------------------------


def test_benchmark_and_cli(tmp_path, monkeypatch):
    from fxadapt.cli import main
    from fxadapt.export.bench import benchmark

    monkeypatch.chdir(tmp_path)
    m = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(),
                      nn.LazyLinear(5))
    x = torch.randn(1, 3, 12, 12)
    m(x)
    res = benchmark(m.eval(), (x,), [0.5], targets=[Target(), Target(runtime="torch")], runs=2,
                    progress=False)
    assert [r["budget"] for r in res.rows] == ["original", "0.5"]
    assert set(res.rows[1]["latency"]) == {"onnxruntime-cpu-1t", "torch-cpu-1t"}
    assert "onnxruntime-cpu-1t ms" in res.table()
    assert res.plot(str(tmp_path / "p.png")) and (tmp_path / "p.png").stat().st_size > 0
    assert main(["bench", "--example", "--budgets", "0.75", "--targets", "torch-cpu", "--runs", "2",
                 "--quiet", "--json", "b.json", "--plot", "b.png"]) == 0
    assert (tmp_path / "b.json").exists() and (tmp_path / "b.png").exists()
    assert main(["bench", "--example", "--targets", "tvm-cpu", "--quiet"]) == 2
