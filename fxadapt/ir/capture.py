"""Capture: lift any ``nn.Module`` to a trainable ATen-level ``torch.fx.GraphModule``.

Steps: normalise the example inputs (``fxadapt.ir.inputs``: a tensor, a positional tuple, a dict of
keyword inputs or an ``(args, kwargs)`` pair); copy the model in eval mode (new modules over
copy-on-write clones of its tensors, ``fxadapt.ir.share``: the caller's model is never touched);
``torch.export.export(strict=False)`` with a dynamic batch axis on every tensor input, positional or keyword
(a size-1 batch is traced at size 2, which export would otherwise specialise; static shapes if that fails);
drop export's guard module; then ``fxadapt.passes.capture`` lifts parametric ATen calls back into ``nn``
modules (``passes/lift_modules``) so ``.train()``/``.eval()`` work, and lints. This module holds the steps
below the passes (``export_model``, ``tidied``, ``stamp``); ``capture`` itself is
``fxadapt.passes.capture.capture`` (``fxadapt.capture``). The model runs eagerly only when export fails, to
tell wrong inputs (``InputError``) from untraceable code (``CaptureError``, naming the user's source line) and
to register dataclass outputs as pytree nodes.

KV caches: when ``forward`` takes ``use_cache`` (by name, or through ``**kwargs`` of a model whose config has
``use_cache=True``) and the example inputs do not set it, the copy is called
with ``use_cache=False`` (a ``UserWarning`` says so): a cache object (``DynamicCache``) is no tensor
pytree and its key/value tensors would pin every attention width as a model output. Set ``use_cache``
in the example inputs to override. ``as_called(model, inputs)`` gives the inputs the original model must
be called with to compare against the capture. Model outputs keep their type: a Hugging Face
``ModelOutput`` (or any registered dataclass) comes back as itself, so ``captured(**inputs).logits`` works.

The result records ``meta[INPUTS_KEY]`` (the ``Inputs``), ``meta[BATCH_KEY]`` (their batch size) and
``meta[FIXED_KEY]`` (the keyword arguments capture fixed, e.g. ``{"use_cache": False}``).

Example:
    >>> import torch
    >>> from fxadapt import capture
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    >>> gm = capture(model, (torch.randn(1, 3, 16, 16),))
    >>> gm(torch.randn(4, 3, 16, 16)).shape   # batch size is free
    torch.Size([4, 8, 14, 14])
    >>> gm.meta[INPUTS_KEY].batch
    1
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import io
import logging
import warnings
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from fxadapt import meta
from fxadapt.errors import CaptureError, InputError, warn
from fxadapt.ir.capture_hints import data_dependent, hint, where_failed
from fxadapt.ir.inputs import Inputs, as_inputs
from fxadapt.ir.model_hints import latent_kv_hint
from fxadapt.ir.share import shared_copy

INPUTS_KEY = meta.INPUTS             # "fxadapt.inputs": the Inputs the graph was captured with
BATCH_KEY = meta.BATCH               # "fxadapt.batch": their batch size (the size of symbolic batch dims)
FIXED_KEY = "fxadapt.fixed_kwargs"   # dict: keyword arguments capture fixed on the model (use_cache=False)


def normalize_inputs(example_inputs: Any) -> tuple:
    """Positional example inputs as a tuple (for callers that take positional inputs only).

    >>> normalize_inputs(torch.ones(2))
    (tensor([1., 1.]),)
    """
    inputs = as_inputs(example_inputs)
    if inputs.kwargs:
        raise InputError(f"this step takes positional example inputs only (a tensor or a tuple); got keyword "
                         f"inputs {sorted(inputs.kwargs)}")
    return inputs.args


def fixed_kwargs(model: nn.Module, inputs: Inputs) -> dict:
    """Keyword arguments capture adds: ``use_cache=False`` where it is unset and ``forward`` takes it, by name
    or through ``**kwargs`` into a model whose config turns the cache on (GraniteMoE's causal LM hands its
    ``**kwargs`` to the inner model, whose ``use_cache`` defaults to ``config.use_cache``).

    >>> fixed_kwargs(torch.nn.Linear(2, 2), as_inputs(torch.ones(1, 2)))
    {}
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    if "use_cache" in inputs.kwargs:
        return {}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    cached = getattr(getattr(model, "config", None), "use_cache", None) is True
    return {"use_cache": False} if "use_cache" in params or (var_kw and cached) else {}


def as_called(model: nn.Module, example_inputs: Any) -> Inputs:
    """The inputs to call the original ``model`` with so that it computes what its capture computes.

    >>> as_called(torch.nn.Linear(2, 2), torch.ones(1, 2)).kwargs
    {}
    """
    inputs = as_inputs(example_inputs)
    return inputs.with_kwargs(**fixed_kwargs(model, inputs))


def check_runs(model: nn.Module, inputs: Any) -> Any:
    """Run the model once; a failure here is the inputs' (or the model's) fault, not the tracer's."""
    inputs = as_inputs(inputs)
    try:
        with torch.no_grad():
            return inputs.call(model)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        shapes = [tuple(v.shape) for v in inputs.tensors()]
        raise InputError(
            f"{type(model).__name__} fails on the example inputs (tensor shapes {shapes}"
            f"{', keywords ' + str(sorted(inputs.kwargs)) if inputs.kwargs else ''}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def _register_dataclasses(out: Any) -> bool:
    """Let torch.export flatten dataclass outputs (at any depth) the user did not register as pytree
    nodes; True if any was registered."""
    found = False
    for _ in range(8):
        new = {type(v) for v in pytree.tree_leaves(out)
               if dataclasses.is_dataclass(v) and not isinstance(v, type)
               and type(v) not in pytree.SUPPORTED_NODES}
        if not new:
            return found
        for cls in new:
            torch.export.register_dataclass(cls)
        found = True
    return found


def _batch2(inputs: Inputs) -> Inputs:
    """Size-1 leading axes doubled, so export does not specialise the batch to 1."""
    return inputs.map(lambda v: torch.cat([v, v]) if v.dim() and v.shape[0] == 1 else v)


def free_axes(v: torch.Tensor, dynamic: str = "auto") -> tuple[int, ...]:
    """The axes of an input tensor capture (and ONNX export) leaves free: the batch; with ``"auto"`` also
    the sequence axis of token / feature inputs (2-D and 3-D) and the spatial axes of float images (4-D).

    >>> (free_axes(torch.zeros(2, 16, dtype=torch.long)), free_axes(torch.zeros(2, 3, 8, 8)),
    ...  free_axes(torch.zeros(2, 3, 8, 8), "batch"))
    ((0, 1), (0, 2, 3), (0,))
    """
    if not v.dim():
        return ()
    if dynamic != "auto":
        return (0,)
    extra = (2, 3) if v.dim() == 4 and v.is_floating_point() else (1,) if v.dim() in (2, 3) else ()
    return (0, *extra)


def _dynamic_spec(inputs: Inputs, dynamic: str = "batch") -> torch.export.ShapesCollection:
    spec = torch.export.ShapesCollection()
    for v in inputs.tensors():
        if v.dim():
            spec[v] = {d: torch.export.Dim.AUTO for d in free_axes(v, dynamic)}
    return spec


def dynamic_axes(gm: GraphModule) -> tuple:
    """Per graph input, the axes whose size is symbolic (as export left them); read before shape checks
    replace the symbolic values."""
    out = []
    for node in gm.graph.nodes:
        v = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(v, torch.Tensor):
            out.append((node.target, tuple(k for k, s in enumerate(v.shape) if not isinstance(s, int))))
    return tuple(out)


_TORCH_LOGGERS = ("torch._dynamo", "torch.export", "torch._export", "torch._subclasses.fake_tensor",
                  "torch.fx.experimental.symbolic_shapes", "torch._functorch", "torch.utils._sympy")


@contextlib.contextmanager
def quiet_torch_logs():
    """Keep torch's own dumps of a failed trace (the whole graph, fake-tensor tracebacks) out of the user's
    log while capture tries its variants; the error capture raises carries the part that matters."""
    loggers = [logging.getLogger(n) for n in _TORCH_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:   # torch.export prints the partial graph of a failed trace straight to stderr
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_CASTS = {"float": torch.float32, "half": torch.float16, "double": torch.float64, "bfloat16": torch.bfloat16}


def _unchanged(module: nn.Module, device, dtype) -> bool:
    """Whether converting ``module`` to ``device`` / floating ``dtype`` would leave every tensor as it is."""
    for t in [*module.parameters(), *module.buffers()]:
        if device is not None and torch.device(device) != t.device:
            return False
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            return False
    return True


@contextlib.contextmanager
def noop_conversions():
    """Inside, ``module.to(...)`` / ``.float()`` / ``.half()`` / ... that would change no tensor return the
    module untouched. Eager PyTorch returns the same module then too, but it swaps every parameter for
    itself, which the parameters of a trace refuse ("Couldn't swap Linear.weight"): Switch Transformers'
    router calls ``self.classifier.to(self.dtype)`` in every forward. A conversion that changes a tensor
    still runs (and fails the trace with its reason)."""
    orig = {name: getattr(nn.Module, name) for name in ("to", *_CASTS)}

    def to(self, *args, **kwargs):
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        return self if _unchanged(self, device, dtype) else orig["to"](self, *args, **kwargs)

    def cast(name):
        def run(self):
            return self if _unchanged(self, None, _CASTS[name]) else orig[name](self)
        return run

    try:
        nn.Module.to = to
        for name in _CASTS:
            setattr(nn.Module, name, cast(name))
        yield
    finally:
        for name, f in orig.items():
            setattr(nn.Module, name, f)


def export(model: nn.Module, example_inputs: Any, dynamic: str = "batch") -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch axis (``dynamic="auto"``: also the sequence / image axes, see
    ``free_axes``), falling back to static shapes (see module docstring)."""
    inputs = as_inputs(example_inputs)
    dyn = _batch2(inputs)
    # RNNs warn: export reassigns _flat_weights
    with warnings.catch_warnings(), quiet_torch_logs(), noop_conversions():
        warnings.filterwarnings("ignore", message=".*_flat_weights.*")
        try:
            if dynamic != "static":
                return torch.export.export(model, dyn.args, dyn.kwargs,
                                           dynamic_shapes=_dynamic_spec(dyn, dynamic),  # type: ignore[arg-type]
                                           strict=False)  # export takes ShapesCollection; its stub omits it
        except Exception:  # noqa: BLE001 - retried statically; that error is the one reported
            pass
        try:
            return torch.export.export(model, inputs.args, inputs.kwargs, strict=False)
        except Exception as e:  # noqa: BLE001
            err = e
    text = str(err).strip()
    first = text.splitlines()[0].split("  (Size-like")[0].strip() if text else type(err).__name__
    why = hint(text)   # one line: the user's source line, then torch's reason, then what to change
    why = why or latent_kv_hint(model, text)
    where = where_failed(err, model)
    if "data-dependent" in text and not why:   # torch's guard expression (Eq(u0, 0)) says nothing more
        first, why = "", data_dependent(err, model, where)
    raise CaptureError(f"cannot capture {type(model).__name__} to an ATen graph at {where}: "
                       f"{type(err).__name__}" + (f": {first}" if first else "")
                       + (f"; {why}" if why else "")) from err


def _first_names(gm: GraphModule) -> None:
    """A tensor shared under several names (a module reused in two places) is read under its first name, as
    ``named_parameters()`` lists it: one name per tensor, so the analysis sees every use of a tied weight."""
    first: dict[int, str] = {}
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        first.setdefault(id(t), name)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                t = gm.get_parameter(node.target)
            except AttributeError:
                try:
                    t = gm.get_buffer(node.target)
                except AttributeError:
                    continue
            node.target = first.get(id(t), node.target)


def _working_copy(model: nn.Module, inputs: Inputs) -> tuple[nn.Module, dict]:
    """An eval-mode copy of ``model`` (new modules; its tensors copy-on-write clones of the user's,
    ``ir.share``: no memory until written) whose ``forward`` has capture's fixed keyword arguments bound."""
    work = shared_copy(model).eval()
    fixed = fixed_kwargs(work, inputs)
    if fixed:
        warn(f"fxadapt.capture: calling {type(model).__name__} with use_cache=False: the KV cache is "
                      f"not captured (set use_cache in example_inputs to choose)")
        work.forward = functools.partial(work.forward, **fixed)
    return work, fixed


def _export_or_explain(work: nn.Module, inputs: Inputs,
                       dynamic: str = "batch") -> torch.export.ExportedProgram:
    """``export``; on failure run eagerly: wrong inputs are an ``InputError``, unregistered dataclass
    outputs are registered and export retried, anything else is the ``CaptureError``."""
    try:
        return export(work, inputs, dynamic)
    except CaptureError as e:
        out = check_runs(work, inputs)
        if not _register_dataclasses(out):
            raise e
    return export(work, inputs, dynamic)


def _tidy(gm: GraphModule) -> None:
    """Drop export's guard module, read shared tensors under one name, record source lines."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    _first_names(gm)
    for node in gm.graph.nodes:
        # a view of a transposed tensor relies on the layout the producer happened to have (AFMoE's
        # ``sdpa(...).transpose(1, 2).view(b, s, -1)``); a rewrite may change it, a reshape does not care
        if node.target == torch.ops.aten.view.default and getattr(node.args[0], "target", None) in (
                torch.ops.aten.transpose.int, torch.ops.aten.permute.default):
            node.target = torch.ops.aten.reshape.default
        trace = node.meta.get("stack_trace")
        if trace:
            node.meta[meta.SOURCE] = trace.strip().splitlines()[-1].strip()


@dataclasses.dataclass(frozen=True)
class Exported:
    """What ``export_model`` gives: the ``ExportedProgram``, the eval-mode working copy it was exported from
    (its ``forward`` bound to the fixed keyword arguments), the example inputs and those fixed arguments."""

    program: torch.export.ExportedProgram
    work: nn.Module
    inputs: Inputs
    fixed: dict


def export_model(model: nn.Module, example_inputs: Any, dynamic: str = "batch") -> Exported:
    """The ``torch.export`` steps of capture (see module docstring): inputs normalised, a working copy,
    exported with free axes per ``dynamic``, wrong inputs and untraceable code explained."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = as_inputs(example_inputs)
    work, fixed = _working_copy(model, inputs)
    return Exported(_export_or_explain(work, inputs, dynamic), work, inputs, fixed)


def tidied(ep: torch.export.ExportedProgram) -> GraphModule:
    """The program's module, tidied: guards dropped, shared tensors under one name, source lines recorded."""
    gm = ep.module(check_guards=False)   # no guard module built: it would be dropped (``_tidy``)
    _tidy(gm)
    return gm


def stamp(gm: GraphModule, model: nn.Module, exported: Exported, dynamic: str) -> GraphModule:
    """``gm`` in ``model``'s train/eval mode with what capture records: the inputs, their batch, the fixed
    keyword arguments and the free axes (``dynamic``: the mode that was asked for)."""
    gm.train(model.training)
    gm.meta.update({INPUTS_KEY: exported.inputs, BATCH_KEY: exported.inputs.batch, FIXED_KEY: exported.fixed,
                    meta.DYNAMIC: dynamic_axes(gm)})
    return gm
