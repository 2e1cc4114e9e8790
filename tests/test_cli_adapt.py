"""``fxadapt adapt``: the README's example command and its errors."""

from __future__ import annotations

import torch

from fxadapt.cli import main
from fxadapt.examples import EXAMPLE_INPUT_SHAPE, example_model


def test_adapt_example_writes_all_outputs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["adapt", "--example"]) == 0
    out = capsys.readouterr().out
    assert "MACs" in out and "ONNX" in out
    files = sorted(p.name for p in (tmp_path / "fxadapt-example").iterdir())
    assert files == ["adapted.onnx", "adapted.pt", "widths.png"]
    model = torch.load(tmp_path / "fxadapt-example" / "adapted.pt", weights_only=False)
    x = torch.randn(EXAMPLE_INPUT_SHAPE)
    assert model(x).shape == example_model()(x).shape


def test_adapt_grow_with_explicit_paths(tmp_path):
    pt = tmp_path / "big.pt"
    assert main(["adapt", "--example", "--budget", "150%", "-o", str(pt), "--quiet"]) == 0
    big = torch.load(pt, weights_only=False)
    x = torch.randn(EXAMPLE_INPUT_SHAPE)
    torch.testing.assert_close(big(x), example_model().eval()(x), rtol=1e-4, atol=1e-5)


def test_adapt_errors_exit_2(tmp_path, capsys):
    assert main(["adapt", "--example", "--budget", "-3", "--out-dir", str(tmp_path)]) == 2
    assert "budget" in capsys.readouterr().err
    assert main(["adapt", "--example", "--budget", "1000", "--out-dir", str(tmp_path)]) == 2
    assert "reachable range" in capsys.readouterr().err
