"""ONNX export with simplification and a numerical check against torch.

Steps: ``torch.onnx.export(..., dynamo=True)`` (the exporter current torch recommends; it needs onnxscript),
with a dynamic batch axis where possible; ``onnxsim.simplify`` (its own check compares the simplified
graph with the original on random inputs); ``onnx.checker.check_model``; then one onnxruntime CPU run
compared to the torch model in eval mode with ``atol`` (1e-4 by default) times the largest output magnitude
(at least 1). Any failure raises ``ExportError`` naming the step.

Example:
    >>> import tempfile, os, torch, fxadapt
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    >>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
    >>> fxadapt.export_onnx(model, (torch.randn(1, 3, 8, 8),), path).max_abs_diff < 1e-4
    True
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from fxadapt.capture import normalize_inputs
from fxadapt.errors import FxAdaptError


class ExportError(FxAdaptError):
    """ONNX export, simplification, checking or the onnxruntime comparison failed."""


@dataclass(frozen=True)
class ExportResult:
    path: str
    simplified: bool
    max_abs_diff: float
    nodes: int


def _export(model: nn.Module, inputs: tuple, path: str) -> None:
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(model, inputs, dynamo=True, external_data=False, verbose=False)
        except TypeError:
            prog = torch.onnx.export(model, inputs, dynamo=True, verbose=False)
        prog.save(path)


def export_onnx(model: nn.Module, example_inputs: Any, path: str, simplify: bool = True,
                atol: float = 1e-4) -> ExportResult:
    """Export ``model`` (eval mode, on a copy) to ``path``; simplify, check and compare with onnxruntime."""
    import onnx
    import onnxruntime as ort

    inputs = normalize_inputs(example_inputs)
    work = copy.deepcopy(model).eval()
    try:
        _export(work, inputs, path)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    proto = onnx.load(path)
    simplified = False
    if simplify:
        import onnxsim

        try:
            proto, simplified = onnxsim.simplify(proto)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"onnxsim failed: {e}") from e
        if not simplified:
            raise ExportError("onnxsim could not validate the simplified model")
        onnx.save(proto, path)
    try:
        onnx.checker.check_model(proto)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"onnx.checker rejected the model: {e}") from e
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    leaves = [v for v in pytree.tree_leaves(inputs) if isinstance(v, torch.Tensor)]
    feeds = {i.name: leaves[k].detach().numpy() for k, i in enumerate(sess.get_inputs())}
    got = sess.run(None, feeds)
    with torch.no_grad():
        ref = [t.detach().numpy() for t in pytree.tree_leaves(work(*inputs)) if isinstance(t, torch.Tensor)]
    if len(got) != len(ref):
        raise ExportError(f"onnxruntime returned {len(got)} outputs, torch {len(ref)}")
    diff = max(float(np.max(np.abs(g - r))) if r.size else 0.0 for g, r in zip(got, ref))
    # float32 rounding of reordered kernels scales with the outputs' magnitude (random-init resnet50: ~2e3)
    scale = max([1.0] + [float(np.max(np.abs(r))) for r in ref if r.size and np.issubdtype(r.dtype, np.floating)])
    if diff > atol * scale:
        raise ExportError(f"onnxruntime output differs from torch by {diff:.3g} > atol {atol} x output "
                          f"magnitude {scale:.3g}")
    return ExportResult(path, simplified, diff, len(proto.graph.node))
