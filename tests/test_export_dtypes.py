"""export_onnx across float dtypes, the atomic write, and BatchNorm folding at export.

Each dtype either gives a valid ONNX that matches torch at that dtype's tolerance, or an ExportError naming
the dtype and op, with nothing left in the folder. What onnxruntime's CPU provider runs is measured too, so
a new onnxruntime that adds kernels shows up here first.
"""

from __future__ import annotations

import os

import onnx
import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.examples import EXAMPLE_INPUT_SHAPE, example_model
from fxadapt.export.onnx import ATOL, ExportError, export_onnx

SUPPORTED = {torch.float32, torch.float16}            # onnxruntime CPU runs Conv, BN, Relu, Gemm in these
UNSUPPORTED = {torch.float64: "Conv", torch.bfloat16: "Conv"}


class ConvBnReluLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def net(dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = ConvBnReluLinear()
    with torch.no_grad():   # non-trivial BN statistics, so folding and BN kernels matter
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
    return model.eval().to(dtype), torch.randn(2, 3, 8, 8).to(dtype)


def leftovers(folder) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("dtype", sorted(SUPPORTED, key=str))
def test_supported_dtype_exports_and_matches(tmp_path, dtype):
    model, x = net(dtype)
    res = export_onnx(model, (x,), str(tmp_path / "m.onnx"))
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())   # folded in every model now
    assert res.dtype == str(dtype).removeprefix("torch.") and res.folded_bn == bns
    proto = onnx.load(res.path)
    onnx.checker.check_model(proto)
    assert proto.graph.input[0].type.tensor_type.elem_type == {torch.float32: 1, torch.float16: 10}[dtype]
    scale = float(model(x).detach().abs().max())
    assert res.max_abs_diff <= ATOL[dtype] * max(1.0, scale)
    assert leftovers(tmp_path) == ["m.onnx"]


@pytest.mark.parametrize("dtype", sorted(UNSUPPORTED, key=str))
def test_unsupported_dtype_says_why_and_leaves_nothing(tmp_path, dtype):
    model, x = net(dtype)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ExportError) as err:
        export_onnx(model, (x,), str(tmp_path / "m.onnx"))
    msg = str(err.value)
    assert "\n" not in msg
    assert f"no {name} kernel for {UNSUPPORTED[dtype]}" in msg and "dtype=torch.float32" in msg
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("dtype", sorted(UNSUPPORTED, key=str))
def test_dtype_option_exports_a_float32_copy(tmp_path, dtype):
    model, x = net(dtype)
    res = export_onnx(model, (x,), str(tmp_path / "m.onnx"), dtype=torch.float32)
    assert res.dtype == "float32" and leftovers(tmp_path) == ["m.onnx"]
    assert next(model.parameters()).dtype == dtype                       # the caller's model is not cast
    ref = model.float()(x.float()).detach()
    got = _run(res.path, x.float())
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max())))


def test_float64_mlp_exports_as_is(tmp_path):
    """onnxruntime CPU has float64 Gemm/Relu: no Conv, no reason to refuse."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    res = export_onnx(model, (x,), str(tmp_path / "m.onnx"))
    assert res.dtype == "float64" and res.max_abs_diff <= 1e-12


def test_failure_keeps_an_existing_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous export")
    model, x = net(torch.float64)
    with pytest.raises(ExportError):
        export_onnx(model, (x,), str(path))
    assert path.read_bytes() == b"previous export" and leftovers(tmp_path) == ["m.onnx"]


def test_bad_dtype_and_missing_folder(tmp_path):
    model, x = net(torch.float32)
    with pytest.raises(ExportError, match="floating torch.dtype"):
        export_onnx(model, (x,), str(tmp_path / "m.onnx"), dtype=torch.int8)
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(model, (x,), str(tmp_path / "nope" / "m.onnx"))
    assert leftovers(tmp_path) == []


def _run(path: str, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


# --- BatchNorm folding at export ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapted():
    torch.manual_seed(0)
    x = torch.randn(EXAMPLE_INPUT_SHAPE)
    return fxadapt.transform(example_model().eval(), 0.5, (x,), fold_bn=False), x


def bns(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_export_folds_bn_of_a_transform_result(tmp_path, adapted):
    gm, x = adapted
    before = bns(gm)
    assert before > 0
    res = export_onnx(gm, (x,), str(tmp_path / "m.onnx"))
    assert res.folded_bn == before and bns(gm) == before                   # folded on a copy
    torch.testing.assert_close(_run(res.path, x), gm.eval()(x).detach(), rtol=1e-4, atol=1e-5)
    assert export_onnx(gm, (x,), str(tmp_path / "k.onnx"), fold_bn=False).folded_bn == 0


def test_export_folds_bn_in_float32_before_a_float16_cast(tmp_path, adapted):
    gm, x = adapted
    res = export_onnx(gm, (x,), str(tmp_path / "m.onnx"), dtype=torch.float16)
    assert res.folded_bn == bns(gm) and res.dtype == "float16"
    got = _run(res.path, x.half()).float()
    torch.testing.assert_close(got, gm.eval()(x).detach(), rtol=0, atol=ATOL[torch.float16] * 10)


def test_plain_module_is_folded_through_its_capture(tmp_path):
    model, x = net(torch.float32)
    assert export_onnx(model, (x,), str(tmp_path / "m.onnx")).folded_bn == 1
    assert export_onnx(model, (x,), str(tmp_path / "m.onnx"), fold_bn=False).folded_bn == 0


def test_wrong_fold_is_refused(tmp_path, adapted, monkeypatch):
    """A fold that changes the function is caught before anything is written."""
    import fxadapt.passes.fold_bn as fold_module

    real = fold_module.fold_bn

    def broken(gm, *args, **kwargs):
        res = real(gm, *args, **kwargs)
        conv = next(m for m in res.graph_module.modules() if isinstance(m, nn.Conv2d))
        with torch.no_grad():
            conv.bias.add_(1.0)
        return res

    monkeypatch.setattr(fold_module, "fold_bn", broken)
    gm, x = adapted
    with pytest.raises(ExportError, match="fold_bn=False"):
        export_onnx(gm, (x,), str(tmp_path / "m.onnx"))
    assert leftovers(tmp_path) == []
