"""Checks of one ``fxadapt.transform`` result, shared by ``tests/test_zoo_transform.py`` and
``bench/zoo_transform.py``.

``check_transform(model, x, budget, onnx=...)`` adapts ``model`` (data-free) and records, without raising:
whether ``transform`` succeeded (else the error type and the first line of its message); whether the
adapted model's outputs have the original's structure and shapes; its MACs measured independently with
``FlopCounterMode`` (``zoo_harness.reference_macs``) against ``budget`` x the original's measured MACs, on
the right side and within 1% (<= target when shrinking, >= when growing); whether the caller's model is
untouched (state_dict values and every module's training flag); and optionally whether
``fxadapt.export_onnx`` (export + onnxsim + checker + onnxruntime comparison) succeeds.

``hand_macs(model, x)`` is a third, hand-written MAC count for CNNs of lifted modules (no FlopCounterMode, no
cost model): every output element of a conv costs ``(C_in / groups) * prod(kernel)`` MACs, of a linear
``in_features``; read from the weight shapes seen by forward hooks.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import zoo_harness as zh
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

import fxadapt
from fxadapt.pipeline.transform import TransformConfig

TOL = 0.01
_UNSEEN = ("conv", "linear", "mm", "matmul", "einsum", "scaled_dot_product")  # ops hooks would not see


def hand_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of ``model(x)`` from conv/linear weight shapes (see module docstring); refuses what it cannot see.

    Example:
        >>> hand_macs(nn.Conv2d(3, 8, 3, padding=1), torch.randn(2, 3, 5, 5)) == 2 * 8 * 25 * 3 * 9
        True
    """
    for m in model.modules():
        assert isinstance(m, (nn.Conv2d, nn.Linear)) or not isinstance(
            m, (nn.modules.conv._ConvNd, nn.MultiheadAttention, nn.Bilinear)), f"hand_macs cannot count {m}"
        for n in m.graph.nodes if isinstance(m, GraphModule) else ():
            assert n.op != "call_function" or not any(k in str(n.target) for k in _UNSEEN), n.format_node()
    total = 0

    def hook(m, _, out):
        nonlocal total
        w = m.weight
        total += out.numel() * (w.shape[1] * math.prod(w.shape[2:]) if isinstance(m, nn.Conv2d)
                                else w.shape[1])

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return total


@dataclass
class TransformResult:
    model: str
    budget: float
    transformed: bool = False
    error: str = ""               # "ErrorType: first line" of transform's exception, or of a failed check
    fxadapt_error: bool = False   # transform raised an FxAdaptError (a clear, deliberate refusal)
    shapes_ok: bool = False
    macs_before: float = 0.0      # FlopCounterMode, original
    macs_after: float = 0.0       # FlopCounterMode, adapted
    target: float = 0.0           # budget * macs_before
    rel_err: float = 0.0          # (macs_after - target) / target
    budget_ok: bool = False
    untouched: bool = False
    onnx: str = ""                # "" not tried, "ok", or the ExportError's first line
    onnx_diff: float = float("nan")
    seconds: float = 0.0
    onnx_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.transformed and self.shapes_ok and self.budget_ok and self.untouched
                and self.onnx in ("", "ok"))

    def row(self) -> dict:
        return asdict(self) | {"ok": self.ok}


def first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:240] if msg else ''}"


def _shapes(out) -> tuple:
    leaves, spec = pytree.tree_flatten(out)
    return str(spec), tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in leaves)


def _run(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return model(x)


def budget_within(macs: float, target: float, grow: bool, tol: float = TOL) -> bool:
    """The transform contract: within ``tol`` of ``target``, never below it when growing, never above when
    shrinking."""
    return target <= macs <= target * (1 + tol) if grow else target * (1 - tol) <= macs <= target


def check_transform(model: nn.Module, x: torch.Tensor, budget: float, *, onnx: bool = False,
                    name: str = "", macs_before: float | None = None, ref_shapes: tuple | None = None,
                    progress=None) -> TransformResult:
    """Adapt ``model`` to ``budget`` and check the result (see module docstring); never raises."""
    r = TransformResult(name or type(model).__name__, budget)
    snap = zh._snapshot(model)
    r.macs_before = macs_before if macs_before is not None else zh.reference_macs(model, x)
    ref_shapes = ref_shapes if ref_shapes is not None else _shapes(_run(model, x))
    r.target = budget * r.macs_before
    t0 = time.perf_counter()
    cfg = TransformConfig(progress=progress)
    try:
        out = fxadapt.transform(model, budget, (x,), config=cfg)
        r.transformed = True
    except Exception as e:  # noqa: BLE001 - recorded as the failure reason
        r.error, r.fxadapt_error = first_line(e), isinstance(e, fxadapt.FxAdaptError)
        out = None
    r.seconds = time.perf_counter() - t0
    r.untouched = zh._same(model, snap)
    if out is not None:
        _check_adapted(r, out, x, ref_shapes)
        if onnx and r.error == "":
            _check_onnx(r, out, x)
        del out
    if not r.untouched:
        r.error = (r.error + "; " if r.error else "") + "input model was mutated"
    return r


def _check_adapted(r: TransformResult, out: nn.Module, x: torch.Tensor, ref_shapes: tuple) -> None:
    try:
        r.shapes_ok = _shapes(_run(out.eval(), x)) == ref_shapes
        r.macs_after = zh.reference_macs(out, x)
    except Exception as e:  # noqa: BLE001
        r.error = "check: adapted model does not run: " + first_line(e)
        return
    r.rel_err = (r.macs_after - r.target) / r.target
    r.budget_ok = budget_within(r.macs_after, r.target, r.budget > 1.0)
    if not r.shapes_ok:
        r.error = "check: output structure/shapes differ from the original's"
    elif not r.budget_ok:
        r.error = f"check: MACs {r.macs_after:.4g} vs target {r.target:.4g} (rel {r.rel_err:+.4f})"


def _check_onnx(r: TransformResult, out: nn.Module, x: torch.Tensor) -> None:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        try:
            res = fxadapt.export_onnx(out, (x,), os.path.join(d, "m.onnx"))
            r.onnx, r.onnx_diff = "ok", res.max_abs_diff
        except Exception as e:  # noqa: BLE001
            r.onnx = first_line(e)
    r.onnx_seconds = time.perf_counter() - t0
