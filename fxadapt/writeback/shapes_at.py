"""The original model's outputs at another input shape, for the write-back's axis check, computed cheaply.

Where the check reads only the original's output *shapes* (a plan that does not preserve the function) and
the model is heavy enough for it to pay (``worth_meta``: many MACs an op), the original runs on the ``meta``
device: a copy of its module tree over meta tensors (the user's model is not touched), called on meta
inputs. That computes every shape the real run would (the same code, the ops' meta kernels) without the
arithmetic, the kernels memoised by their arguments' metadata as in the shape check (``passes.meta_run.
MetaCache``: a batch norm's Python meta kernel runs once per shape): on resnet50 at batch 2, ~0.06 s (~0.14 s
uncached) where the real run takes ~0.35 s. Anything it cannot decide falls back to the real run:

- the meta run fails for a reason of the meta device (value-dependent code, ``.item()``, a CPU tensor made
  in ``forward``, a missing meta kernel): the original runs for real, as before; an op's size check that
  fails (a fixed 7x7 pool given a 6x6 map) fails a real run the same way, and that input shape is skipped;
- the meta run passes but the written-back model then fails or disagrees there: ``runs_for_real`` runs the
  original for real first, since values a meta run never sees (an index past a table's end) could make the
  original fail there too — then that input shape is skipped, as it always was.

Example:
    >>> import torch
    >>> from fxadapt.ir.inputs import as_inputs
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1))
    >>> out, exact = original_outputs(m, as_inputs(torch.randn(2, 3, 16, 16)), exact=False)
    >>> tuple(out.shape), out.is_meta, exact
    ((2, 4, 1, 1), True, False)
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from fxadapt.checks import verify
from fxadapt.passes.meta_run import MetaCache, to_meta


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree over meta tensors (ties kept; no data copied)."""
    memo: dict = {}
    for t in [*model.parameters(), *model.buffers()]:
        m = to_meta(t.detach())
        memo.setdefault(id(t),
                        nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m)
    return copy.deepcopy(model, memo)


def original_outputs(original: nn.Module, inputs, exact: bool) -> tuple[Any, bool]:
    """``(outputs, exact)``: the original's outputs at ``inputs`` — on the meta device (shapes only,
    ``exact=False``) unless ``exact`` values are asked for or the meta run cannot tell, then for real;
    ``(None, _)`` when the original does not run there."""
    if not exact:
        try:
            copy, meta_inputs = _meta_copy(original), inputs.map(to_meta)
            with MetaCache():
                return verify.outputs(copy, meta_inputs), False
        except Exception as e:  # noqa: BLE001 - decided by the real run below, unless a size check failed
            if _size_error(e):
                return None, False
    try:
        return verify.outputs(original, inputs), True
    except Exception:  # noqa: BLE001 - the original does not run there: nothing to compare
        return None, True


def _size_error(e: BaseException) -> bool:
    """A meta run's error that a real run raises too: a ``RuntimeError`` of an op's size check ("Output size
    is too small", mismatched shapes), not one about the meta device itself (a missing meta kernel is a
    ``NotImplementedError``; ``.item()``, ``.tolist()``, numpy and device mixing name the meta device)."""
    return type(e) is RuntimeError and "meta" not in str(e).lower()


def worth_meta(graph, macs: float) -> bool:
    """Whether a meta run is cheaper than the real one: meta kernels cost ~0.1-0.5 ms an op in Python, real
    ones their arithmetic (~10-50 GMAC/s a core), so the meta device pays off from ~4M MACs an op on average
    (resnet50: ~7M, a Llama: ~20M+; mobilenetv2: ~1M, where the real run is the cheaper one)."""
    ops = sum(1 for n in graph.graph.nodes if n.op in ("call_function", "call_module"))
    return macs > 4e6 * max(ops, 1)


def runs_for_real(original: nn.Module, inputs) -> bool:
    """Whether the original runs at ``inputs`` (a meta run's verdict confirmed before it fails a check)."""
    return original_outputs(original, inputs, exact=True)[0] is not None
