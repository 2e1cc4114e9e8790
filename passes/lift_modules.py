"""Pass: lift parametric ATen calls back into standard ``nn`` modules (``call_module`` nodes).

``torch.export`` yields ``aten.conv2d(x, W, b, ...)`` with ``W`` a ``get_attr``; its ``.module()`` refuses
``.train()`` and bakes ``training=False`` into ``batch_norm``/``dropout``. Re-wrapping each such call in the
``nn`` module that computes exactly the same function (``nn.Conv2d`` with the same weight tensor,
``nn.BatchNorm2d`` with the same running stats, ``nn.Dropout``...) makes the graph module train, eval,
fine-tune, slice and export like any model. Parameters keep their fully qualified names: the module is
installed at the weight's owner path (``features.conv.weight`` -> module ``features.conv``). A call whose
lift would rename a parameter (a top-level weight, a kernel not called ``weight``, the second use of a
shared or tied tensor) stays an ATen call reading the parameter under its own name — except a tied tensor
used by a module registered under another of its names (GPT-2's ``lm_head.weight`` is
``transformer.wte.weight``): that use is lifted at its own module path (``lm_head``), holding the very
same ``Parameter``, while its ATen template reads the tensor's first name, so the analysis sees one tensor
(one group), the result keeps both names in its ``state_dict``, and rebuilding after slicing (``relift``)
re-ties them.

The ATen call a module stands for is kept in ``node.meta[meta.ATEN]`` (an ``AtenCall`` with ``ParamRef``
placeholders) so the op-rule table, keyed by ATen overloads, still applies.

Example:
    >>> import torch
    >>> from fxadapt import capture
    >>> gm = capture(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)),
    ...              (torch.randn(2, 3, 8, 8),))
    >>> [type(m).__name__ for m in gm.children()]
    ['Conv2d', 'BatchNorm2d']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from fxadapt import meta
from fxadapt.ir.atencall import AtenCall, Input
from fxadapt.ir.channels import ParamRef
from fxadapt.ops import OPS
from fxadapt.ops.lifts import Skip

aten = torch.ops.aten


@dataclass(frozen=True)
class LiftConfig:
    lift_dropout: bool = True   # parameter-free lifts (dropout) too
    origin: nn.Module | None = None   # the user's model: BN momentum is read from it (export bakes 0.0/None)


def fill_args(node: Node) -> list:
    """Schema-complete positional args (defaults filled in)."""
    schema = node.target._schema  # type: ignore[union-attr]  # an OpOverload
    args = list(node.args)
    for arg in schema.arguments[len(args):]:
        args.append(node.kwargs.get(arg.name, arg.default_value if arg.has_default_value() else None))
    return args


def _aliases(gm: GraphModule) -> dict[int, set[str]]:
    """Every name of every tensor that has several (tied or shared parameters)."""
    names: dict[int, set[str]] = {}
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), set()).add(name)
    return {k: v for k, v in names.items() if len(v) > 1}


def _tied_path(node: Node, gm: GraphModule, args: list, params: tuple, aliases: dict, origin) -> str:
    """The calling module's path when it owns one of the other names of a tied parameter argument and is
    another module than the tensor's first owner (a module reused twice stays one ATen call)."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0].replace("L['self'].", "") if stack else ""
    if not path or origin is None:
        return ""
    for i in params:
        a = args[i]
        if isinstance(a, Node) and a.op == "get_attr":
            target = str(a.target)   # a get_attr's target is its dotted name
            names = aliases.get(id(getattr_path(gm, target)), ())
            if any(n.rpartition(".")[0] == path and n != target for n in names) and \
                    _module_or_none(origin, path) is not _module_or_none(origin, target.rpartition(".")[0]):
                return path
    return ""


def _module_or_none(root: nn.Module, path: str):
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _module_name(node: Node, gm: GraphModule, args: list, params: tuple, taken: set, aliases: dict,
                 origin=None) -> str:
    path = _tied_path(node, gm, args, params, aliases, origin)
    for i in () if path else params:
        if isinstance(args[i], Node) and args[i].op == "get_attr":
            path = args[i].target.rpartition(".")[0]
            break
    if not path:
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else node.name
    path = path.replace("L['self'].", "") or node.name
    name, k = path, 1
    while name in taken:
        name, k = f"{path}_{k}", k + 1
    return name


def _plan_param_op(node: Node, gm: GraphModule, taken: set, aliases: dict, origin=None):
    """(module name, module, ATen template, new args) for a parametric call, or None to keep it ATen."""
    args = fill_args(node)
    lift = OPS[node.target].lift
    assert lift is not None, node.target
    builder, act_idx, par_idx = lift.build, lift.acts, lift.params
    if any(not isinstance(args[i], Node) or args[i].op != "get_attr" for i in par_idx if args[i] is not None):
        return None
    tensors: dict[Any, Any] = {a.target: getattr_path(gm, str(a.target))
                               for i in par_idx if isinstance(a := args[i], Node)}
    for a in (args[i] for i in par_idx):
        if isinstance(a, Node) and str(a.target).endswith("running_mean"):
            nbt = str(a.target).rpartition(".")[0] + ".num_batches_tracked"
            if _has(gm, nbt):
                tensors[("nbt", a.target)] = getattr_path(gm, nbt)
    built_args = [len(a.meta["val"].shape) if i in act_idx and isinstance(a, Node) and "val" in a.meta
                  else (a.target if isinstance(a, Node) and a.op == "get_attr" else a)
                  for i, a in enumerate(args)]
    try:
        built = builder(built_args, tensors)
    except Skip:
        return None
    name = _module_name(node, gm, args, par_idx, taken, aliases, origin)

    def known(a: Node) -> bool:  # the module would hold the tensor under its own name, or a tied alias
        target = str(a.target)
        own = f"{name}.{_attr(built, target, gm)}"
        return own == target or own in aliases.get(id(getattr_path(gm, target)), ())

    if any(isinstance(a, Node) and not known(a) for a in (args[i] for i in par_idx)):
        return None  # lifting would rename a parameter (top-level, not called "weight", or tied): keep ATen
    template = AtenCall(node.target, tuple(
        Input(act_idx.index(i)) if i in act_idx else (ParamRef(str(a.target)) if isinstance(a, Node) else a)
        for i, a in enumerate(args)))
    return name, built, template, tuple(args[i] for i in act_idx)


def lift_modules(gm: GraphModule, cfg: LiftConfig = LiftConfig()) -> PassResult:
    """Replace lifted ATen calls by ``call_module`` nodes; returns a new, trainable ``GraphModule``."""
    graph = gm.graph
    modules: dict[str, nn.Module] = {}
    taken: set[str] = set()
    aliases = _aliases(gm)
    for node in list(graph.nodes):
        spec = OPS.get(node.target) if node.op == "call_function" else None
        if spec is None or spec.lift is None or (not spec.lift.params and not cfg.lift_dropout):
            continue
        planned = _plan_param_op(node, gm, taken, aliases, cfg.origin)
        if planned is None:
            continue
        name, built, template, new_args = planned
        taken.add(name)
        _copy_hparams(built, cfg.origin, name)
        modules[name] = built
        with graph.inserting_before(node):
            new = graph.create_node("call_module", name, new_args)
        new.meta.update(node.meta)
        new.meta[meta.ATEN] = template
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    out = _rebuild(gm, modules)
    out.meta[meta.LIFTED] = len(modules)
    return PassResult(out, bool(modules))


def relift(gm: GraphModule, node: Node) -> nn.Module:
    """Rebuild the module of a lifted node from its ATen template and its current (e.g. sliced) tensors,
    keeping the non-tensor state (training flag, BatchNorm momentum); installs and returns it."""
    tpl: AtenCall = node.meta[meta.ATEN]
    path = str(node.target)   # a call_module's target is its dotted name
    old = getattr_path(gm, path)
    tensors: dict[Any, Any] = {}
    for a in tpl.params():
        tensors[a.target] = getattr_path(gm, a.target)
        if a.target.endswith("running_mean") \
                and _has(gm, (nbt := a.target.rpartition(".")[0] + ".num_batches_tracked")):
            tensors[("nbt", a.target)] = getattr_path(gm, nbt)
    val = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], Node) else None
    args = [(val.dim() if val is not None else 4) if isinstance(a, Input) else
            (a.target if isinstance(a, ParamRef) else a) for a in tpl.args]
    lift = OPS[tpl.op].lift
    assert lift is not None, tpl.op
    new = lift.build(args, tensors)
    for key in ("momentum", "training"):
        if hasattr(old, key):
            setattr(new, key, getattr(old, key))
    _keep_extras(old, new)
    set_path(gm, path, new)
    return new


def _keep_extras(old: nn.Module, new: nn.Module) -> None:
    """Tensors and submodules the graph keeps under the lifted module's path that are not the op's own
    (Gemma's ``embed_tokens.embed_scale``, read by a ``get_attr`` beside the lifted embedding) move over to
    the rebuilt module."""
    for name, t in [*old.named_parameters(recurse=False), *old.named_buffers(recurse=False)]:
        if not hasattr(new, name):
            set_path(new, name, t)
    for name, child in old.named_children():
        if not hasattr(new, name):
            new.add_module(name, child)


def _copy_hparams(built: nn.Module, origin: nn.Module | None, name: str) -> None:
    """BatchNorm momentum is not visible in an eval-mode export: take it from the user's module."""
    if origin is None or not isinstance(built, nn.modules.batchnorm._BatchNorm):
        return
    try:
        src = getattr_path(origin, name)
    except AttributeError:
        return
    if isinstance(src, nn.modules.batchnorm._BatchNorm):
        built.momentum = src.momentum


def _attr(module: nn.Module, target: str, gm: GraphModule) -> str:
    tensor = getattr_path(gm, target)
    for name, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if value is tensor:
            return name
    return target.rpartition(".")[2]


def _has(gm: nn.Module, target: str) -> bool:
    try:
        getattr_path(gm, target)
        return True
    except AttributeError:
        return False


def getattr_path(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_path(root: nn.Module, target: str, value: Any) -> None:
    *parents, leaf = target.split(".")
    obj = root
    for part in parents:
        if not hasattr(obj, part):
            obj.add_module(part, nn.Module())
        obj = getattr(obj, part)
    if isinstance(value, nn.Module):
        obj.add_module(leaf, value)
    elif isinstance(value, nn.Parameter):
        obj.register_parameter(leaf, value)
    else:
        obj.register_buffer(leaf, value)


def _rebuild(gm: GraphModule, modules: dict[str, nn.Module]) -> GraphModule:
    """A fresh plain ``GraphModule`` holding the lifted modules and every remaining attribute."""
    root = nn.Module()
    for name in sorted(modules, key=lambda n: n.count(".")):
        set_path(root, name, modules[name])
    for node in gm.graph.nodes:
        if node.op == "get_attr" and not _has(root, node.target):
            set_path(root, node.target, getattr_path(gm, node.target))
        if node.op == "call_module" and not _has(root, node.target):
            set_path(root, node.target, getattr_path(gm, node.target))
    gm.graph._tracer_cls = None  # export's tracer cannot be rebuilt on unpickling; fx's default can
    gm.graph._tracer_extras = {}
    out = GraphModule(root, gm.graph, class_name="CapturedModule")
    for node in out.graph.nodes:   # a tied tensor's first name whose own module is never called (T5/BART
        tpl = node.meta.get(meta.ATEN) if node.op == "call_module" else None   # ``shared``): kept as well
        for ref in tpl.params() if tpl is not None else ():
            if not _has(out, ref.target):
                set_path(out, ref.target, getattr_path(gm, ref.target))
    return out
