"""Where a written-back model first parts from the graph: the module that fails, and the shapes it receives.

Run the written-back model with a pre-hook on every module recording the shapes of its tensor inputs;
the innermost module still running when the forward raises is the one that failed. The graph records the
same module's inputs (the first node traced inside it, export's ``nn_module_stack``, its tensor operands
from outside the module). Where the two differ, the module's own code computed a size at run time from
another tensor (SegFormer's sequence reduction reshapes a conv's output by its *input*'s channel count),
which the static graph holds as a constant and sized independently. ``running_at_failure`` gives the modules
still running when the forward raised (``fxadapt.pipeline.replan`` reads them when no input differs: the
failing op is inside the innermost one; ``failure`` adds the exception, whose sizes
``fxadapt.pipeline.cache_check`` reads). A write-back failure carries the ``Divergence`` itself
(``fxadapt.writeback.build.SizeConflict``), which re-planning reads as data.

Example:
    >>> import torch
    >>> class Square(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv, self.norm = torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)
    ...     def forward(self, x):
    ...         return self.norm(self.conv(x)[..., :x.shape[-1]])   # a size read from the input
    >>> m = Square()
    >>> m.conv = torch.nn.Linear(2, 4)
    >>> d = first_divergence(m, lambda: m(torch.ones(1, 2)), {"norm": [(1, 4)]})
    >>> str(d)
    'norm (LayerNorm) receives shape (1, 2) where the graph gives it (1, 4)'
    >>> d.got, d.want
    ((1, 2), (1, 4))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule

from fxadapt.writeback.widths import module_stack


@dataclass(frozen=True)
class Divergence:
    """The first module whose input shape differs from the graph's: its path and class, the shape it
    receives and the one the graph gives it. ``str`` is the sentence a write-back failure carries."""

    path: str
    module: str
    got: tuple[int, ...]
    want: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.path} ({self.module}) receives shape {self.got} where the graph gives it {self.want}"


def graph_inputs(gm: GraphModule) -> dict[str, list[tuple]]:
    """Per module path: the shapes of the tensor operands its first traced node reads from outside it."""
    out: dict[str, list[tuple]] = {}
    for node in gm.graph.nodes:
        stack = module_stack(node)
        if not stack or stack[-1] in out or node.op not in ("call_function", "call_module"):
            continue
        outside = [a for a in node.all_input_nodes if a.op != "get_attr" and stack[-1] not in module_stack(a)]
        vals = [a.meta.get("val") for a in outside]
        out[stack[-1]] = [tuple(v.shape) for v in vals if isinstance(v, torch.Tensor)]
    return out


def first_divergence(model: nn.Module, run: Callable[[], object],
                     expected: dict[str, list[tuple]]) -> Divergence | None:
    """Run ``run()`` (a forward of ``model``) and, if it raises, say which module failed on which input shape
    where ``expected`` (``graph_inputs``) holds another; None when it runs or nothing disagrees."""
    for path, mod, shapes in reversed(running_at_failure(model, run) or []):
        want = expected.get(path)
        if want and shapes and shapes[0] != want[0]:
            return Divergence(path, type(mod).__name__, tuple(shapes[0]), tuple(want[0]))
    return None


def running_at_failure(model: nn.Module,
                       run: Callable[[], object]) -> list[tuple[str, nn.Module, list]] | None:
    """The modules still running (outermost first: path, module, its tensor inputs' shapes) when ``run()``
    raised; None when it runs."""
    return failure(model, run)[0]


def failure(model: nn.Module,
            run: Callable[[], object]) -> tuple[list[tuple[str, nn.Module, list]] | None, Exception | None]:
    """``(running_at_failure, the exception)``; ``(None, None)`` when ``run()`` runs."""
    running: list[tuple[str, nn.Module, list[tuple]]] = []
    paths = {id(m): p for p, m in model.named_modules()}

    def enter(mod, args, kwargs=None):
        shapes = [tuple(a.shape) for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        running.append((paths.get(id(mod), "?"), mod, shapes))

    def leave(mod, args, out):
        if running:
            running.pop()

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter, with_kwargs=True),
                                                    m.register_forward_hook(leave))]
    try:
        with torch.no_grad():
            run()
        return None, None
    except Exception as e:  # noqa: BLE001 - the failure the caller reports; here only where it is
        return list(running), e
    finally:
        for h in handles:
            h.remove()
