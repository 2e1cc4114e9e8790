"""``write_back``: the verified graph's plan applied to a copy of the user's own module tree (new modules,
unchanged tensors shared copy-on-write: ``fxadapt.ir.share``).

    recipe  = width ops (widths.py) + depth ops (depth.py) [+ HF config ops (hf.py) + per-module config
              views where a layer's attention sizes differ from the shared config (layer_config.py)]
    model'  = apply(recipe[width], copy(model)); tensors <- the graph's, by name (copy-on-write, ir.share);
              apply(recipe[depth]); zero the repeated copies' branch outputs; config fields
    verify  : model'(x) == graph(x) at the example inputs (rtol/atol of the verifier, scaled to the outputs'
              magnitude) and MACs(model') == MACs(graph) by the independent count; at another batch size
              and sequence length / image size (the batch alone where the original only runs at the
              example's size) model' runs and every output axis the input change moved moves as in the
              original, every axis the adaptation changed keeps the graph's size (and, for
              function-preserving changes, model' == original there) (check.py).

Any step that cannot be expressed or any failed check gives a reason; ``transform`` then returns the
graph with a ``WriteBackWarning`` (or raises ``WriteBackError`` with ``write_back="strict"``). The
user's model is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.fx import GraphModule

from fxadapt.errors import FxAdaptError, WriteBackError, WriteBackWarning  # noqa: F401  (defined in fxadapt.errors)
from fxadapt.ir.capture import as_called
from fxadapt.ir.share import share_into, shared_copy
from fxadapt.writeback import hf, stock
from fxadapt.writeback.check import CheckFailed, check, kept_attributes, variants  # noqa: F401  (re-exported)
from fxadapt.writeback.depth import NotExpressible, depth_ops
from fxadapt.writeback.layer_config import module_config_ops, original_paths
from fxadapt.writeback.probe import Divergence, first_divergence, graph_inputs, running_at_failure
from fxadapt.writeback.recipe import Recipe, apply
from fxadapt.writeback.uses import edited_paths, forward_uses, has_module
from fxadapt.writeback.widths import MEASURED, NAMES, graph_tensor, tensors_of, twin_attrs, width_ops

if TYPE_CHECKING:
    from fxadapt.ir.inputs import Inputs
    from fxadapt.planning.plan import Plan


@dataclass(frozen=True)
class Failure:
    """Why a plan could not be written back (``str``: the sentence a warning carries)."""

    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class NotExpressed(Failure):
    """The plan has no expression in the model's modules (a depth change its code cannot take, a plan node
    the planned graph does not hold)."""


@dataclass(frozen=True)
class Mismatch(Failure):
    """The written-back model differs from the verified graph (outputs, MACs, output axes at another input
    shape); ``uniform_hint``: its layers got different widths and it may read one size from its config."""

    uniform_hint: bool = False

    def __str__(self) -> str:
        return self.message + _UNIFORM_HINT * self.uniform_hint


@dataclass(frozen=True)
class SizeConflict(Mismatch):
    """The written-back model fails on the example inputs: its code reads a size the plan changed;
    ``divergence``: the first module that receives another shape than the graph gives it (``probe``), where
    one does (re-planning reads it: ``fxadapt.pipeline.replan``)."""

    divergence: Divergence | None = None

    def __str__(self) -> str:
        where = (f"; {self.divergence}: the model's code computes that size at run time (from another "
                 f"tensor's shape or its config), where the graph holds a constant sized independently"
                 if self.divergence is not None else "")
        return self.message + where + _UNIFORM_HINT * self.uniform_hint


_UNIFORM_HINT = ("; the layers got different widths and the model may read a size from its config, shared by "
                 "every layer: pass layers='uniform' to give repeated layers the same widths")


@dataclass(frozen=True)
class WriteBack:
    """The written-back module, or the typed ``failure`` that kept it from being one; the recipe either
    way."""

    module: nn.Module | None
    recipe: Recipe
    failure: Failure | None = None
    shapes: tuple = ()          # the input shapes the written-back module was checked at

    @property
    def reason(self) -> str | None:
        """The failure as a sentence (None when the module came back)."""
        return str(self.failure) if self.failure is not None else None


@dataclass(frozen=True)
class Reference:
    """What the written-back module is checked against."""

    graph: GraphModule
    planned: GraphModule        # the graph the plan was made on (its blocks, the old shapes)
    macs: float
    preserving: bool
    rtol: float = 1e-4
    atol: float = 1e-5
    expected: Any = None        # the graph's outputs at the example inputs (the verifier ran it)
    original: Any = None        # the original's outputs (or their recorded shapes) at the example inputs


def write_back(model: nn.Module, plan: Plan, inputs: Inputs, ref: Reference) -> WriteBack:
    """Apply ``plan`` (already applied to ``ref.graph``) to a deep copy of ``model`` and verify it.

    A hidden-named attribute of an attention module equal to both its input width and its all-head size
    follows the all-head size first; when that fails the check and the input width reads differently, that
    is tried too (``widths.SIZES``). Before that, a failed first attempt that set head counts is tried with
    them left as they were: a module may read its head count for another tensor than the attention's (an
    input split into heads before its projections), where the attention's own views infer it. The
    attributes a module's forward reads into the size arguments the plan edited are found once, on a copy
    of the original (``uses``), for every attempt."""
    used = _forward_uses(model, inputs, ref)
    first = _attempt(model, plan, inputs, ref, "all", used=used)
    if first.module is not None or first.recipe == Recipe():
        return first
    if heads := _head_counts(first.recipe):   # read for another size (Wav2Vec2-Conformer's rotary input)
        kept = _attempt(model, plan, inputs, ref, "all", unset=heads, used=used)
        if kept.module is not None:
            return kept
    if width_ops(model, ref.graph, ref.planned, "hidden", used)[0] \
            == width_ops(model, ref.graph, ref.planned, "all", used)[0]:
        return first    # no attribute reads differently: nothing else to try
    second = _attempt(model, plan, inputs, ref, "hidden", used=used)
    return second if second.module is not None else first


def _forward_uses(model: nn.Module, inputs: Inputs, ref: Reference) -> dict:
    """``uses.forward_uses`` on a copy of ``model`` (its modules' classes are swapped while it runs)."""
    if not edited_paths(ref.graph, ref.planned):
        return {}
    probe = shared_copy(model)
    return forward_uses(probe, lambda: as_called(probe, inputs).call(probe), ref.graph, ref.planned)


def _head_counts(recipe: Recipe) -> frozenset:
    """The head-count attributes a recipe sets (``widths.MEASURED``), as ``(module, attr)``."""
    names = {n for kind in MEASURED for n in NAMES[kind]}
    return frozenset((o["module"], o["attr"]) for o in recipe.ops if o["op"] == "set" and o["attr"] in names)


def unchecked(model: nn.Module, plan: Plan, inputs: Inputs, ref: Reference) -> WriteBack:
    """The plan in a copy of a model on the meta device (a streamed checkpoint: ``fxadapt.export.stream``):
    the recipe, the sizes and the config ``write_back`` gives, with no values and no check (the model's
    code is taken to run with them: its config reads are not probed)."""
    return _attempt(model, plan, inputs, ref, "all", checked=False)


def _attempt(model: nn.Module, plan: Plan, inputs: Inputs, ref: Reference, prefer: str,
             checked: bool = True, unset: frozenset = frozenset(), used: dict | None = None) -> WriteBack:
    work = shared_copy(model)   # new modules; unchanged tensors stay the user's storage, copy-on-write
    try:
        ops, evidence = width_ops(work, ref.graph, ref.planned, prefer, used)
        ops = [o for o in ops if (o.get("module"), o.get("attr")) not in unset]
        depth = depth_ops(work, ref.planned, plan, inputs)
    except NotExpressible as e:
        return WriteBack(None, Recipe(), NotExpressed(str(e)))
    except KeyError as e:   # a plan block whose nodes the planned graph does not hold: a guard, not a path
        return WriteBack(None, Recipe(), NotExpressed(f"the plan names graph node {e.args[0]!r}, which the "
                                                      f"planned graph does not hold"))
    recipe = Recipe(tuple(ops) + tuple(depth.ops))
    apply(recipe, work, phases=("width",))
    if checked:
        _fill(work, ref.graph)
    paths = original_paths(work)
    apply(recipe, work, phases=("depth",))
    slots = Recipe(tuple(_fill_slots(work, ref.graph, depth.fill)))
    recipe = recipe + slots
    with torch.no_grad():
        for name in depth.zero:
            work.get_parameter(name).zero_()
    if hf.is_hf(work):
        runs = stock.runner(work, inputs) if checked else lambda: True
        recipe = _hf_final(work, model, recipe, depth.order, (paths, evidence, runs))
    else:
        final = Recipe(tuple(o for o in _layer_ops(work, depth.order)))
        apply(final, work, phases=("final",))
        recipe = recipe + final
    work.train(model.training)
    if not checked:
        return WriteBack(work, recipe)
    try:
        shapes = check(work, model, inputs, ref)
    except CheckFailed as e:
        hint = _uniform_hint(work)
        if e.fails:   # where it parts from the graph (``probe``)
            where = first_divergence(work, lambda: as_called(work, inputs).call(work),
                                     graph_inputs(ref.graph))
            note = "" if where is not None else _inside_note(work, model, inputs, evidence)
            return WriteBack(None, recipe, SizeConflict(str(e) + note, hint, where))
        return WriteBack(None, recipe, Mismatch(str(e), hint))
    return WriteBack(work, recipe, None, shapes)


def _inside_note(work: nn.Module, model: nn.Module, inputs: Inputs, evidence: dict) -> str:
    """Where the failing op is inside a module (no module receives another shape than the graph gives it):
    that module and the sizes it cannot take, from the graph's edited view/split sizes there and its size
    attributes that differed and coincide now (code that compares them takes another branch)."""
    running = running_at_failure(work, lambda: as_called(work, inputs).call(work)) or []
    found = next(((p, m) for p, m, _ in reversed(running) if p not in ("", "?")), None)
    if found is None:
        return ""
    path, mod = found
    pairs = evidence.get(path, {})
    kept = {a for k, (a, _) in pairs.items() if isinstance(k, tuple) and k[0] == "kept"}
    named = lambda a: "".join(f" ({k})" for k, v in sorted(vars(mod).items()) if v == a and type(v) is int)  # noqa: E731
    sizes = [f"{a}{named(a)} -> {b}" + (f" (and {a} kept)" if a in kept else "")
             for k, (a, b) in sorted(pairs.items(), key=str) if isinstance(k, tuple) and k[0] == "view"]
    was = vars(model.get_submodule(path)) if has_module(model, path) else {}
    now = {k: v for k, v in vars(mod).items() if type(v) is int and type(was.get(k)) is int}
    met = [f"{a} and {b} (were {was[a]} and {was[b]}, both {now[a]} now)"
           for a in sorted(now) for b in sorted(now) if a < b and now[a] == now[b] and was[a] != was[b]]
    if not sizes and not met:
        return ""
    what = "; ".join(x for x in (f"the graph's view/split sizes there {', '.join(sizes)}" if sizes else "",
                                 f"its sizes {', '.join(met)}" if met else "") if x)
    return (f"; it fails inside {path} ({type(mod).__name__}), whose code computes a size at run time (from "
            f"another tensor's shape or by comparing its sizes) that it cannot take: {what}")


def _hf_final(work: nn.Module, model: nn.Module, recipe: Recipe, order: dict, found: tuple) -> Recipe:
    """The config operations of a written-back HF model, then the per-module config views its layers need
    (``layer_config``; ``found``: original paths by module identity, attention evidence); the recipe rides
    in the config where the stock class cannot rebuild the result from its config alone."""
    paths, evidence, runs = found
    final = Recipe(tuple(hf.config_ops(work, model, order, evidence)))
    apply(final, work, phases=("final",))
    hf.keep_valid(work.config, model.config, list(final.ops))
    views = Recipe(tuple(module_config_ops(work, model, paths, evidence)))
    apply(views, work, phases=("final",))
    # read right or refused
    marked = Recipe(tuple(stock.refuse_misreads(work, model, list(final.ops), evidence, runs)))
    recipe = recipe + final + views + marked
    if views.ops or marked.ops or not hf.stock_rebuilds(work):
        work.config.fxadapt_recipe = {"base": hf.base_values(model, list(final.ops + marked.ops)),
                                      "ops": list(recipe.ops)}
    return recipe


def _uniform_hint(work: nn.Module) -> bool:
    """A Hugging Face model whose layers got different widths may read a size from its config for every
    layer that no per-module view covers (``layer_config`` covers the attention sizes: Phi-3's fused qkv)."""
    return hf.is_hf(work) and hf.RECIPE_FIELD in vars(work.config)


def _fill_slots(work: nn.Module, gm: GraphModule, pairs: list) -> list[dict]:
    """A kept depth slot (trained by a search, or widened by the plan): the unit's copy takes the graph
    copy's shapes, size attributes and values; the ``resize``/``set`` operations, after depth, for the
    recipe."""
    ops = []
    for path, gpath in pairs:
        mod, twin = work.get_submodule(path), gm.get_submodule(gpath)
        for name, g in [*twin.named_parameters(recurse=False), *twin.named_buffers(recurse=False)]:
            full = f"{path}.{name}"
            if tuple(getattr(mod, name).shape) != tuple(g.shape):
                ops.append({"op": "resize", "name": full, "shape": list(g.shape), "final": True})
        for (p_, attr), value in (twin_attrs(mod, twin, path) or {}).items():
            op = {"op": "set", "module": p_, "attr": attr, "final": True,
                  "value": list(value) if isinstance(value, tuple) else value}
            ops.append({**op, "tuple": True} if isinstance(value, tuple) else op)
    apply(Recipe(tuple(ops)), work, phases=("final",))
    with torch.no_grad():
        for path, gpath in pairs:
            mod, twin = work.get_submodule(path), gm.get_submodule(gpath)
            for name, g in [*twin.named_parameters(recurse=False), *twin.named_buffers(recurse=False)]:
                getattr(mod, name).copy_(g)
    return ops


def _layer_ops(model: nn.Module, order: dict) -> list[dict]:
    return [op for parent in order for op in hf._layer_idx(model, parent)]


def _fill(work: nn.Module, gm: GraphModule) -> None:
    """Give every tensor the graph holds under a name of the user's model the graph's values (tied ones
    once): re-pointed at a copy-on-write clone of the graph's tensor (``ir.share.share_into``), no copy."""
    user, graph = tensors_of(work), tensors_of(gm)
    done = set()
    with torch.no_grad():
        for name, t in user.items():
            g = graph_tensor(graph, user, name)
            if g is not None and id(t) not in done and tuple(g.shape) == tuple(t.shape):
                share_into(t, g)
                done.add(id(t))
