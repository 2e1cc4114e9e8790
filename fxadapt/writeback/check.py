"""The written-back model checked against the verified graph (``build.write_back``'s ``verify`` step):

    outputs(model', x) == graph(x)             at the example inputs (the verifier's rtol/atol, scaled
                                               to the outputs' magnitude)
    MACs(model', x) == MACs(graph)             by the independent count (``analysis.count``), to 1e-3,
                                               eagerly or on the path the capture took (``is_exporting``)
    shape(model'(x'))[k] == shape(orig(x'))[k] where the input change moved axis k, else the graph's size,
                                               at another input shape ``x'`` (``variants``: one more in the
                                               batch with a longer sequence / smaller image, then the batch
                                               alone); model'(x') == orig(x') for function-preserving plans

A failed check raises ``CheckFailed`` (``fails``: the model raised on the example inputs).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from fxadapt import frames
from fxadapt.analysis.count import run_counted
from fxadapt.checks import verify
from fxadapt.ir.capture import as_called
from fxadapt.writeback.shapes_at import original_outputs, runs_for_real, worth_meta

if TYPE_CHECKING:
    from fxadapt.ir.inputs import Inputs


class CheckFailed(Exception):
    """A failed check; ``fails``: the written-back model raised on the example inputs."""

    def __init__(self, message: str, fails: bool = False):
        super().__init__(message)
        self.fails = fails


def check(work: nn.Module, original: nn.Module, inputs: Inputs, ref) -> tuple:
    """Verify ``work`` against the graph (see the module docstring); the input shapes it was checked at."""
    cfg = SimpleNamespace(rtol=ref.rtol, atol=ref.atol)
    try:
        macs, got = run_counted(work, as_called(work, inputs))
    except Exception as e:  # noqa: BLE001 - the user's forward failed with the new sizes
        raise CheckFailed(f"the written-back model fails on the example inputs: {type(e).__name__}: "
                        f"{_first(e)}", fails=True) from e
    expected = ref.expected if ref.expected is not None else verify.outputs(ref.graph, inputs)
    _close(expected, got, cfg, "at the example inputs")
    if not _same_macs(macs, ref.macs) and not _same_macs(_traced_path_macs(work, inputs), ref.macs):
        raise CheckFailed(f"the written-back model runs {macs:,.0f} MACs where the graph runs "
                          f"{ref.macs:,.0f}")
    original_shapes = ref.original if ref.original is not None \
            else verify.outputs(original, as_called(original, inputs))
    with kept_attributes(original), kept_attributes(work):
        alt = _other_shape(work, original, inputs, got, original_shapes, ref, cfg)
    return (_shapes(inputs),) + ((alt,) if alt else ())


def _same_macs(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= 1e-3 * max(a, b, 1.0)


def _traced_path_macs(work: nn.Module, inputs: Inputs) -> float | None:
    """MACs of ``work`` on the code path its capture took: with ``torch.compiler.is_exporting()`` true (a
    forward that branches on it runs an uncounted kernel eagerly, the gated delta-net's
    ``solve_triangular``, and a counted loop when exported, as the graph was); None when it fails there."""
    with mock.patch.object(torch.compiler, "is_exporting", lambda: True):
        try:
            return run_counted(work, as_called(work, inputs))[0]
        except Exception:  # noqa: BLE001 - no like-for-like count: the eager one decides
            return None


@contextlib.contextmanager
def kept_attributes(model: nn.Module):
    """Restore every module's plain attributes afterwards: some forwards change them for the input size they
    see (HF Swin shrinks ``window_size`` to a small image), and neither the user's model nor the result may
    keep that."""
    saved = [(m, {k: v for k, v in vars(m).items() if not k.startswith("_") and not isinstance(v, nn.Module)})
             for m in model.modules()]
    try:
        yield
    finally:
        for m, attrs in saved:
            for k, v in attrs.items():
                if k in vars(m):
                    object.__setattr__(m, k, v)


def _other_shape(work, original, inputs: Inputs, got, original_shapes, ref, cfg) -> list | None:
    """One more input shape (another batch size and sequence length / image size; the batch alone where the
    original only runs at the example's length or size): the first the original runs at."""
    real = ref.preserving or not worth_meta(ref.graph, ref.macs)   # else the original's shapes: a meta run
    for alt in variants(inputs):
        orig_alt, exact = original_outputs(original, as_called(original, alt), exact=real)
        if orig_alt is None:   # the original does not run there either: nothing to compare
            continue
        try:
            mine = verify.outputs(work, as_called(work, alt))
        except Exception as e:  # noqa: BLE001
            if not (exact or runs_for_real(original, as_called(original, alt))):
                continue
            raise CheckFailed(f"the written-back model fails at input shapes {_shapes(alt)} where the "
                              f"original runs: {type(e).__name__}: {_first(e)}") from e
        try:
            _axes(orig_alt, mine, original_shapes, got, _shapes(alt))
        except CheckFailed:
            if not (exact or runs_for_real(original, as_called(original, alt))):
                continue
            raise
        if ref.preserving:
            _close(orig_alt, mine, cfg, f"(function-preserving) at input shapes {_shapes(alt)}")
        return _shapes(alt)
    return None


def _first(e: BaseException) -> str:
    """The error's first line and the user's source line it was raised at (a size in their ``forward``)."""
    text = str(e).strip()
    line = text.splitlines()[0][:300] if text else type(e).__name__
    user = frames.user_frame(e.__traceback__, packages=True)
    return line + (f" (at {frames.where(user, source=True)})" if user is not None else "")


def _close(ref: Any, got: Any, cfg, where: str) -> None:
    try:
        verify.check_shapes(ref, got)
        verify.check_close(ref, got, cfg, "writing the plan back into the model's modules")
    except verify.VerificationError as e:
        raise CheckFailed(f"the written-back model differs from the verified graph {where}: {e}") from e


def _axes(orig_alt, mine, orig, got, where) -> None:
    """Output axes: moved by the input change as in the original, else kept at the adapted size."""
    leaves = lambda o: [t for t in pytree.tree_leaves(o) if isinstance(t, torch.Tensor)]  # noqa: E731
    for a, m, o, g in zip(leaves(orig_alt), leaves(mine), leaves(orig), leaves(got)):
        want = tuple(sa if sa != so else sg for sa, so, sg in zip(a.shape, o.shape, g.shape))
        if a.dim() != m.dim() or tuple(m.shape) != want:
            raise CheckFailed(f"at input shapes {where} the written-back model returns shape "
                              f"{tuple(m.shape)}, expected {want}")


def _shapes(inputs: Inputs) -> list:
    return [tuple(t.shape) for t in inputs.tensors()]


def variants(inputs: Inputs) -> list:
    """Other inputs to check at, most different first: one more in the batch together with a longer sequence
    (tokens, features, audio: every input sharing that axis' size) or a smaller image; then the batch
    alone."""
    batch = inputs.batch
    more = (lambda t: torch.cat([t, t[:1]]) if t.dim() and t.shape[0] == batch else t) if batch \
            else (lambda t: t)
    out = [inputs.map(more)]
    first = next((t for t in inputs.tensors() if t.dim() >= 2), None)
    if first is None:
        return out
    if first.dim() == 4 and first.is_floating_point():
        h, w = first.shape[-2:]
        size = (max(8, (3 * h // 4) // 8 * 8), max(8, (3 * w // 4) // 8 * 8))
        if size == (h, w):
            return out
        spatial = lambda t: (F.interpolate(t, size=size, mode="bilinear") if t.dim() == 4  # noqa: E731
                             and t.shape[-2:] == first.shape[-2:] and t.is_floating_point() else t)
        return [inputs.map(lambda t: spatial(more(t)))] + out
    n = first.shape[1]
    longer = lambda t: torch.cat([t, t[:, :3]], 1) if t.dim() >= 2 and t.shape[1] == n else t  # noqa: E731
    return [inputs.map(lambda t: longer(more(t)))] + out
