"""fxadapt.export_onnx: exported, simplified, checked, and matching onnxruntime at 1e-4."""

from __future__ import annotations

import onnx
import pytest
import torch
from models import ResNetTiny

import fxadapt
from fxadapt.examples import EXAMPLE_INPUT_SHAPE, example_model


@pytest.mark.parametrize("budget", [0.5, 1.5])
def test_export_adapted(tmp_path, budget):
    x = torch.randn(1, 3, 16, 16)
    out = fxadapt.transform(ResNetTiny().eval(), budget, (x,))
    res = fxadapt.export_onnx(out, (x,), str(tmp_path / "m.onnx"))
    assert res.simplified and res.max_abs_diff <= 1e-4
    proto = onnx.load(res.path)
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 8


def test_export_example_model(tmp_path):
    x = torch.randn(EXAMPLE_INPUT_SHAPE)
    res = fxadapt.export_onnx(example_model(), (x,), str(tmp_path / "e.onnx"))
    assert res.max_abs_diff <= 1e-4
