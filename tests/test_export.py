"""fxadapt.export_onnx on adapted models, checked outside fxadapt: the written file is run with our own
onnxruntime session on a fresh input (not the export's example) and compared with the torch module that
was exported, the grown model also with the original; its Conv weights have the adapted shapes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from models import ResNetTiny
from torch import nn

import fxadapt
from fxadapt.examples import EXAMPLE_INPUT_SHAPE, example_model


def run_onnx(path: str, x: torch.Tensor) -> torch.Tensor:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(np.asarray(y))


def close(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-4) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=atol * max(1.0, float(want.abs().max())))


@pytest.mark.parametrize("budget", [0.5, 1.5])
def test_export_adapted(tmp_path, budget):
    torch.manual_seed(0)
    model = ResNetTiny().eval()
    x = torch.randn(1, 3, 16, 16)
    out = fxadapt.transform(model, budget, (x,)).eval()
    res = fxadapt.export_onnx(out, (x,), str(tmp_path / "m.onnx"))
    assert res.simplified
    proto = onnx.load(res.path)
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops    # folded before export
    weights = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    onnx_convs = sorted(weights[n.input[1]] for n in proto.graph.node if n.op_type == "Conv")
    torch_convs = sorted(tuple(m.weight.shape) for m in out.modules() if isinstance(m, nn.Conv2d))
    assert onnx_convs == torch_convs and len(onnx_convs) == 8
    orig = sorted(tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Conv2d))
    assert torch_convs != orig   # the adapted widths, not the original's

    x2 = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = out(x2)
        close(run_onnx(res.path, x2), y)
        if budget > 1:   # growth keeps the function: the ONNX file computes what the original computes
            close(run_onnx(res.path, x2), model(x2))


def test_export_example_model(tmp_path):
    model = example_model().eval()
    x = torch.randn(EXAMPLE_INPUT_SHAPE)
    res = fxadapt.export_onnx(model, (x,), str(tmp_path / "e.onnx"))
    x2 = torch.randn(EXAMPLE_INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        close(run_onnx(res.path, x2), model(x2))
