"""ONNX export with BatchNorm folding, simplification and a numerical check against torch
(``fxadapt.export_onnx``; it lives with the measurement because the onnxruntime targets compile through
it, ``fxadapt.hw.target``).

Steps, on a copy of the model in eval mode:

1. ``dtype=`` given: cast the copy's floating parameters/buffers and the floating example inputs to it.
2. ``fold_bn`` and the model has BatchNorm (``fxadapt.transform`` keeps it so the result fine-tunes well; a
   model in its own class is captured first): fold eval-mode BN into the conv/linear before it with
   ``passes/fold_bn`` (``W'_o = s_o W_o``, ``b'_o = s_o (b_o - mu_o) + beta_o``, ``s_o = gamma_o /
   sqrt(var_o + eps)``) and check the folded copy against the unfolded one (below). Folding runs in the
   more precise of the model's dtype and ``dtype``.
3. ``torch.onnx.export(..., dynamo=True)`` with the example inputs' shapes; ``onnxsim.simplify`` (which
   checks the simplified graph on random inputs); ``onnx.checker.check_model``; one onnxruntime CPU run
   compared with the torch copy.

Checks compare ``|got - ref| <= atol * max(1, max|ref|) + 2 * noise``, where ``noise`` is torch's own error
in the export dtype against a float64 run of the same model (ill-conditioned models amplify rounding) and
``atol`` defaults to ``ATOL[dtype]`` (1e-8 float64, 1e-4 float32, 1e-2 float16, 5e-2 bfloat16).

dtypes, as onnxruntime 1.31's CPU provider runs them (measured): float32 and float16 export as is
(Conv, Gemm, BatchNormalization, Relu all have kernels); float64 has no Conv kernel and bfloat16 none for
Conv, Gemm, BatchNormalization or Relu, so such models raise ``ExportError`` naming the dtype and op and
suggesting ``dtype=torch.float32`` (a float64 MLP, which onnxruntime can run, exports as is).

The file is written to a hidden temporary file in the same folder and moved onto ``path`` with
``os.replace`` only after every check passed; on any failure the temporary file is deleted and an existing
file at ``path`` is left untouched. Any failure raises ``ExportError`` with a one-line message.

Example:
    >>> import tempfile, os, torch, fxadapt
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    >>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
    >>> fxadapt.export_onnx(model, (torch.randn(1, 3, 8, 8),), path).max_abs_diff < 1e-4
    True
    >>> fxadapt.export_onnx(model.double(), (torch.randn(1, 3, 8, 8, dtype=torch.float64),), path)
    Traceback (most recent call last):
    fxadapt.errors.ExportError: onnxruntime CPU has no float64 kernel for Conv; pass dtype=torch.float32 to
    export a float32 copy
    >>> res = fxadapt.export_onnx(model, (torch.randn(1, 3, 8, 8, dtype=torch.float64),), path,
    ...                           dtype=torch.float32)
    >>> res.dtype, sorted(os.listdir(os.path.dirname(path)))
    ('float32', ['m.onnx'])
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from fxadapt import meta
from fxadapt.errors import (
    ExportError,  # noqa: F401  (defined in fxadapt.errors)
)
from fxadapt.ir.capture import free_axes, normalize_inputs
from fxadapt.passes import fold_bn as fold_bn_pass  # the module: its fold_bn is looked up per call
from fxadapt.passes.capture import capture

ATOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class ExportResult:
    path: str
    simplified: bool
    max_abs_diff: float
    nodes: int
    folded_bn: int = 0          # BatchNorms folded into the conv/linear before them
    dtype: str = "float32"      # floating dtype of the exported model
    dynamic: tuple = ()         # per input, the axes the file leaves free (batch, sequence, image size)


def export_onnx(model: nn.Module, example_inputs: Any, path: str, *, fold_bn: bool = True,
                dtype: torch.dtype | None = None, simplify: bool = True,
                atol: float | None = None) -> ExportResult:
    """Export ``model`` (a copy, eval mode) to ``path``; fold BN, simplify, check, compare with onnxruntime.

    ``dtype`` casts the copy (and floating inputs) first, e.g. ``torch.float32`` for a float64 or bfloat16
    model; ``atol`` defaults to ``ATOL`` of the exported dtype (see the module docstring).
    """
    inputs = normalize_inputs(example_inputs)
    work, inputs, folded = prepare(model, inputs, fold_bn=fold_bn, dtype=dtype)
    dt = float_dtype(work, inputs)
    tol = ATOL.get(dt, 1e-4) if atol is None else atol
    with _staged(path) as tmp:
        try:   # free batch and sequence / image axes where the model allows, checked at two shapes
            _export(work, _doubled(inputs), tmp, dt, dynamic=True)
            proto, simplified = _simplify_and_check(tmp, simplify, dt)
            free = _free_axes(proto)
            diff = max(_run_and_compare(tmp, work, x, tol, dt) for x in _shapes_to_check(inputs, free))
        except ExportError:   # a fixed-shape file, as the example inputs are
            _export(work, inputs, tmp, dt)
            proto, simplified = _simplify_and_check(tmp, simplify, dt)
            free, diff = (), _run_and_compare(tmp, work, inputs, tol, dt)
    return ExportResult(path, simplified, diff, len(proto.graph.node), folded, _name(dt), free)


def _doubled(inputs: tuple) -> tuple:
    """Size-1 batches doubled, so export does not fix the batch at 1."""
    return pytree.tree_map(lambda v: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim()
                           and v.shape[0] == 1
                           else v, inputs)


def _dynamic_shapes(inputs: tuple) -> tuple:
    """``Dim.AUTO`` on the batch axis of every tensor input, the sequence axis of token / feature inputs and
    the spatial axes of images: export keeps them free where the model allows and fixes the others itself."""
    auto = torch.export.Dim.AUTO
    return tuple({d: auto for d in free_axes(v)} if isinstance(v, torch.Tensor) and v.dim() else None
                 for v in inputs)


def _free_axes(proto) -> tuple:
    return tuple(tuple(k for k, d in enumerate(i.type.tensor_type.shape.dim) if d.dim_param)
                 for i in proto.graph.input)


def _shapes_to_check(inputs: tuple, free: tuple) -> list[tuple]:
    """The example inputs, and (when the file has free axes) one more row in the batch and, for free
    sequence axes, three more positions."""
    out = [inputs]
    if not any(free):
        return out
    def grow(v, axes):
        if not isinstance(v, torch.Tensor):
            return v
        if 0 in axes:
            v = torch.cat([v, v[:1]])
        if 1 in axes and v.dim() in (2, 3):
            v = torch.cat([v, v[:, :3]], 1)
        return v
    tensors = [v for v in inputs if isinstance(v, torch.Tensor)]
    if len(tensors) != len(free):
        return out
    it = iter(free)
    out.append(tuple(grow(v, next(it)) if isinstance(v, torch.Tensor) else v for v in inputs))
    return out


def prepare(model: nn.Module, inputs: tuple, *, fold_bn: bool = True,
            dtype: torch.dtype | None = None) -> tuple[nn.Module, tuple, int]:
    """An eval-mode copy of ``model`` cast to ``dtype`` with BN folded, the cast inputs, and the fold count.

    >>> import torch
    >>> from fxadapt import capture
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    >>> x = torch.randn(1, 3, 8, 8)
    >>> work, ins, folded = prepare(capture(m, (x,)), (x,), dtype=torch.float16)
    >>> folded, ins[0].dtype, [type(c).__name__ for c in work.children()]
    (1, torch.float16, ['Conv2d'])
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ExportError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    work = copy.deepcopy(model).eval()
    wider = dtype is not None and torch.finfo(dtype).eps < torch.finfo(float_dtype(work, inputs)).eps
    if wider and dtype is not None:   # (wider implies a dtype)
        work, inputs = _cast(work, inputs, dtype)
    folded = 0
    if fold_bn and not isinstance(work, GraphModule) \
            and any("BatchNorm" in type(m).__name__ for m in work.modules()):
        work = capture(work, inputs).eval()  # a model in its own class: fold on its captured graph
    if fold_bn and isinstance(work, GraphModule):
        work, folded = _fold(work, inputs)
    if dtype is not None and not wider:
        work, inputs = _cast(work, inputs, dtype)
    return work, inputs, folded


def float_dtype(model: nn.Module, inputs: tuple) -> torch.dtype:
    """The model's floating dtype: its first floating parameter or buffer, else its first floating input."""
    tensors = [*model.parameters(), *model.buffers(), *pytree.tree_leaves(inputs)]
    return next((t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()),
                torch.float32)


def _name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _cast(work: nn.Module, inputs: tuple, dtype: torch.dtype) -> tuple[nn.Module, tuple]:
    """Floating parameters, buffers and inputs to ``dtype``; the cast model must still run."""
    work = work.to(dtype)
    inputs = pytree.tree_map(
        lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v, inputs)
    try:
        _outputs(work, inputs)
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        raise ExportError(f"the model does not run once cast to {_name(dtype)} ({type(e).__name__}: "
                          f"{_first(e)}); cast it yourself before capture/transform, or pick another "
                          "dtype") from e
    return work, inputs


def _fold(gm: GraphModule, inputs: tuple) -> tuple[GraphModule, int]:
    """Fold BN with ``passes/fold_bn`` and check the folded copy against ``gm`` (retried in float64)."""
    folded = fold_bn_pass.fold_bn(gm).graph_module
    count = folded.meta.get(meta.FOLDED_BN, 0)
    if not count:
        return gm, 0
    ref, got = _outputs(gm, inputs), _outputs(folded, inputs)
    dt = float_dtype(gm, inputs)
    diff, bound = _excess(got, ref, ATOL.get(dt, 1e-4))
    if diff > bound:
        g64, i64 = copy.deepcopy(gm).double(), _to64(inputs)
        folded64 = fold_bn_pass.fold_bn(g64).graph_module
        diff64, bound64 = _excess(_outputs(folded64, i64), _outputs(g64, i64), ATOL[torch.float64])
        if diff64 > bound64:
            raise ExportError(f"folding {count} BatchNorm(s) changed the outputs by {diff:.3g} (> "
                              f"{bound:.3g}); export with fold_bn=False")
    return folded, int(count)


def _excess(got: Any, ref: Any, atol: float) -> tuple[float, float]:
    """Largest |got - ref| and the allowed ``atol * max(1, max|ref|)``."""
    a, b = _numpy_leaves(got), _numpy_leaves(ref)
    if len(a) != len(b):
        return float("inf"), 0.0
    return _maxdiff(a, b), atol * _scale(b)


def _outputs(model: nn.Module, inputs: tuple) -> Any:
    with torch.no_grad():
        return model(*inputs)


def _to64(inputs: Any) -> Any:
    return pytree.tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point()
                           else t, inputs)


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _staged(path: str) -> Iterator[str]:
    """A hidden temporary path beside ``path``, moved onto it only if the block succeeds (deleted
    otherwise)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ExportError(f"folder {folder} does not exist; create it or pass a path in an existing folder")
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _export(model: nn.Module, inputs: tuple, path: str, dt: torch.dtype, dynamic: bool = False) -> None:
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    extra: dict[str, Any] = {"dynamic_shapes": _dynamic_shapes(inputs)} if dynamic else {}
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                prog = torch.onnx.export(model, inputs, dynamo=True, external_data=False, verbose=False,
                                         **extra)
            except TypeError:
                prog = torch.onnx.export(model, inputs, dynamo=True, verbose=False, **extra)
            assert prog is not None, "torch.onnx.export(dynamo=True) returns the program"
            prog.save(path)
    except Exception as e:  # noqa: BLE001
        hint = "" if dt == torch.float32 else "; pass dtype=torch.float32 to export a float32 copy"
        raise ExportError(f"torch.onnx.export failed on the {_name(dt)} model: {type(e).__name__}: "
                          f"{_first(e)}{hint}") from e


def _simplify_and_check(path: str, simplify: bool, dt: torch.dtype) -> tuple[Any, bool]:
    """Simplify ``path`` in place with onnxsim (if asked) and run onnx's checker; the proto and whether
    simplified."""
    import onnx  # deferred: optional dependency, loaded on export only

    proto = onnx.load(path)
    _session(path, dt)   # an op onnxruntime cannot run is reported as such, not as an onnxsim failure
    simplified = False
    if simplify:
        import onnxsim  # deferred: optional dependency, loaded on export only

        try:
            proto, simplified = onnxsim.simplify(proto)
        except Exception as e:  # noqa: BLE001
            raise _runtime_error(e, dt, "onnxsim failed") from e
        if not simplified:
            raise ExportError("onnxsim could not validate the simplified model; export with simplify=False")
        onnx.save(proto, path)
    try:
        onnx.checker.check_model(proto)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"onnx.checker rejected the model: {_first(e)}") from e
    return proto, simplified


def _session(path: str, dt: torch.dtype) -> Any:
    import onnxruntime as ort  # deferred: optional dependency, loaded on export only

    try:
        return ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise _runtime_error(e, dt, "onnxruntime could not load the model") from e


def _runtime_error(e: BaseException, dt: torch.dtype, step: str) -> ExportError:
    """One line naming the dtype and op onnxruntime has no kernel for (and what to do), else the step's
    error."""
    text = str(e)
    op = re.search(r"implementation for (\w+)\(", text) or re.search(r"of operator \((\w+)\)", text)
    if not op:
        return ExportError(f"{step}: {type(e).__name__}: {_first(e)}")
    hint = ("pass dtype=torch.float32 to export a float32 copy" if dt != torch.float32
            else "replace that op, or export with simplify=False and run it on another runtime")
    return ExportError(f"onnxruntime CPU has no {_name(dt)} kernel for {op.group(1)}; {hint}")


def _run_and_compare(path: str, work: nn.Module, inputs: tuple, atol: float, dt: torch.dtype) -> float:
    """Run ``path`` on onnxruntime CPU and compare with ``work``; the largest absolute difference."""
    sess = _session(path, dt)
    leaves = [v for v in pytree.tree_leaves(inputs) if isinstance(v, torch.Tensor)]
    feeds = {i.name: _numpy(leaves[k]) for k, i in enumerate(sess.get_inputs())}
    try:
        got = [np.asarray(g) for g in sess.run(None, feeds)]
    except Exception as e:  # noqa: BLE001
        raise _runtime_error(e, dt, "onnxruntime failed to run the model") from e
    ref = _numpy_leaves(_outputs(work, inputs))
    if len(got) != len(ref):
        raise ExportError(f"onnxruntime returned {len(got)} outputs, torch {len(ref)}")
    return _compare(work, inputs, [g.astype(np.float64) for g in got], ref, atol, dt)


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as numpy; bfloat16 (which numpy lacks) as ``ml_dtypes.bfloat16``, which onnxruntime reads."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes  # deferred: optional dependency, bfloat16 outputs only

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _numpy_leaves(out: Any) -> list[np.ndarray]:
    """Tensor leaves of ``out`` as float64 numpy arrays (comparisons are done in float64)."""
    return [t.detach().cpu().to(torch.float64).numpy() for t in pytree.tree_leaves(out)
            if isinstance(t, torch.Tensor)]


def _maxdiff(a: list, b: list) -> float:
    return max((float(np.max(np.abs(x - y))) for x, y in zip(a, b) if y.size), default=0.0)


def _scale(ref: list) -> float:
    return max([1.0] + [float(np.max(np.abs(r))) for r in ref if r.size])


def _compare(work: nn.Module, inputs: tuple, got: list, ref: list, atol: float, dt: torch.dtype) -> float:
    """Largest |onnxruntime - torch|; raises unless it is within ``atol`` x the outputs' magnitude (rounding
    of reordered kernels scales with it: random-init resnet50 logits reach ~2e3) plus twice torch's own error
    in ``dt`` against a float64 run (ill-conditioned models amplify rounding: random-init igcv3_w1's float32
    outputs are 7e-4 off exact arithmetic, onnxruntime's as far)."""
    diff = _maxdiff(got, ref)
    scale = _scale(ref)
    if diff <= atol * scale:
        return diff
    noise = float("nan")
    try:
        noise = _maxdiff(ref, _numpy_leaves(_outputs(copy.deepcopy(work).double(), _to64(inputs))))
    except Exception:  # noqa: BLE001 - a model that will not run in float64 keeps the plain tolerance
        pass
    if not diff <= atol * scale + 2 * noise:
        raise ExportError(f"onnxruntime output differs from torch by {diff:.3g} > atol {atol} x output "
                          f"magnitude {scale:.3g} + 2 x torch's own {_name(dt)} error {noise:.3g}")
    return diff
