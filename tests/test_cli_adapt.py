"""``fxadapt adapt``: the README's example command, its outputs, progress, defaults and errors."""

from __future__ import annotations

import contextlib
import io
import re

import onnx
import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.cli import main
from fxadapt.cli.adapt import Progress
from fxadapt.examples import EXAMPLE_INPUT_SHAPE, example_model
from fxadapt.export.save import load

TOKENS = """
import torch
from torch import nn

class TinyText(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids)))).mean(dim=1)

def build():
    torch.manual_seed(0)
    return TinyText()

def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1))
"""


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """``fxadapt adapt --example`` in an empty folder, as the README runs it."""
    cwd = tmp_path_factory.mktemp("adapt")
    mp = pytest.MonkeyPatch()
    mp.chdir(cwd)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["adapt", "--example"])
    mp.undo()
    return rc, out.getvalue(), err.getvalue(), cwd / "fxadapt-example"


def test_adapt_example_writes_loadable_outputs(example_run):
    rc, out, err, folder = example_run
    assert rc == 0, err
    assert sorted(p.name for p in folder.iterdir()) == ["adapted.onnx", "adapted.pt", "widths.png"]
    model = load(folder / "adapted.pt")
    assert torch.load(folder / "adapted.pt")["format"].startswith("fxadapt")   # torch defaults work too
    x = torch.randn(EXAMPLE_INPUT_SHAPE)
    assert model(x).shape == example_model()(x).shape
    rep = fxadapt.report(model)
    assert 0.99 * rep.macs_target <= rep.macs_after <= rep.macs_target
    onnx.checker.check_model(onnx.load(folder / "adapted.onnx"))
    assert (folder / "widths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("adapted.pt", "adapted.onnx", "widths.png"):
        assert f"fxadapt-example/{name}" in out, name


def test_adapt_example_prints_macs_ratio_in_window(example_run):
    _, out, _, _ = example_run
    m = re.search(r"MACs ratio (\d\.\d+) \(target (\d\.\d+)\)", out)
    assert m, out
    ratio, target = float(m.group(1)), float(m.group(2))
    assert target == 0.5 and 0.99 * target <= ratio <= target


def test_adapt_progress_bar_reaches_its_total(example_run):
    _, _, err, _ = example_run
    counts = re.findall(r"(\d+)/(\d+) \[", err)
    assert counts, err
    done, total = map(int, counts[-1])
    assert done == total and total >= 3 + 3   # pipeline passes + save, ONNX, plot
    assert "100%" in err.split("\r")[-1]


@pytest.mark.parametrize("calls", [
    [("capture",), ("solve",), ("verify",)],                      # TransformConfig.progress(name)
    [("capture", 1, 3), ("solve", 2, 3), ("verify", 3, 3)],       # progress(name, done, total)
])
def test_progress_ends_at_total_with_either_callback(calls):
    p = Progress("t", extra_steps=2, enabled=False)
    for c in calls:
        p(*c)
    p.pipeline_done()
    p.step("save"), p.step("plot")
    assert (p.done, p.total) == (5, 5)


def test_adapt_grow_with_explicit_paths(tmp_path):
    pt = tmp_path / "big.pt"
    assert main(["adapt", "--example", "--budget", "150%", "-o", str(pt), "--quiet",
                 "--out-dir", str(tmp_path / "rest")]) == 0
    big = load(pt).eval()
    x = torch.randn(EXAMPLE_INPUT_SHAPE)
    torch.testing.assert_close(big(x), example_model().eval()(x), rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in big.modules())   # BN kept by default


def test_adapt_model_without_output_writes_default_name(tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny.py").write_text(TOKENS)
    monkeypatch.chdir(tmp_path)
    assert main(["adapt", "tiny.py:cnn", "--input-shape", "1,3,12,12", "--fold-bn"]) == 0
    out = capsys.readouterr().out
    assert "saved cnn-adapted.pt" in out
    model = load(tmp_path / "cnn-adapted.pt")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())   # --fold-bn folded it
    assert model(torch.randn(2, 3, 12, 12)).shape == (2, 4, 10, 10)


def test_adapt_and_inspect_integer_inputs(tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny.py").write_text(TOKENS)
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "tiny.py:build", "--input-shape", "2,8:int64:0-100"]) == 0
    out = capsys.readouterr().out
    assert "input 2x8:int64" in out and "fc1" in out
    assert main(["adapt", "tiny.py:build", "--input-shape", "2,8:int64:0-100", "--budget", "0.5",
                 "-o", "t.pt", "--quiet"]) == 0
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_again", tmp_path / "tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    with pytest.raises(fxadapt.FxAdaptError, match="pass model="):   # a class from a file: not importable
        load(tmp_path / "t.pt")
    model = load(tmp_path / "t.pt", model=tiny.build())
    ids = torch.randint(0, 100, (3, 8))
    assert model(ids).shape == (3, 4)
    rep = fxadapt.report(model)
    assert rep.macs_after <= rep.macs_target and rep.macs_after < rep.macs_before


@pytest.mark.parametrize("spec, message", [
    ("2,8:int64", "an integer input needs a value range"),
    ("2,8:int77:0-5", "unknown dtype 'int77'"),
    ("2,8:int64:5-1", "LOW < HIGH"),
])
def test_bad_input_specs_exit_2(spec, message, capsys):
    assert main(["adapt", "--example", "--input-shape", spec]) == 2
    assert message in capsys.readouterr().err


def test_bad_budget_fails_before_loading_or_capturing(tmp_path, monkeypatch, capsys):
    def boom(*_, **__):
        raise AssertionError("the model must not be built, captured or transformed for a bad budget")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fxadapt, "capture", boom)
    monkeypatch.setattr(fxadapt, "transform", boom)
    monkeypatch.setattr("fxadapt.examples.example_model", boom)
    assert main(["adapt", "--example", "--budget", "abc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxadapt adapt: error: cannot read budget 'abc'") and err.count("\n") == 1
    assert not (tmp_path / "fxadapt-example").exists()


def test_failed_example_leaves_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["adapt", "--example", "--budget", "1000"]) == 2
    assert "reachable range" in capsys.readouterr().err
    assert not (tmp_path / "fxadapt-example").exists()

    def refuse(*_, **__):
        raise fxadapt.FxAdaptError("disk says no")

    monkeypatch.setattr("fxadapt.cli.adapt.save", refuse)
    assert main(["adapt", "--example", "--quiet", "-o", "deep/er/m.pt"]) == 2
    assert "disk says no" in capsys.readouterr().err
    assert not (tmp_path / "deep").exists() and not (tmp_path / "fxadapt-example").exists()


def test_adapt_errors_exit_2(tmp_path, capsys):
    assert main(["adapt", "--example", "--budget", "-3", "--out-dir", str(tmp_path)]) == 2
    assert "budget" in capsys.readouterr().err
    assert main(["adapt", "--example", "--budget", "1000", "--out-dir", str(tmp_path)]) == 2
    assert "reachable range" in capsys.readouterr().err
