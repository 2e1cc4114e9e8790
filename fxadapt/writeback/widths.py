"""Width write-back: the ``resize`` and ``set`` operations that give the user's modules the graph's shapes.

Tensors: every parameter and buffer of the user's model is looked up in the verified graph by its fully
qualified name (capture keeps them; a tied tensor by any of its names); a differing shape is a ``resize``.

Attributes a module derives from its shapes, from three kinds of evidence (the first that applies wins):

1. *graph twin*: the graph holds a standard ``torch.nn`` module at the same path (lifted and rebuilt by the
   registry after slicing), so its ``in_features``/``out_channels``/``groups``/``normalized_shape``/
   ``hidden_size``... are right by construction: differing int attributes are copied;
2. *changed axes*: a module whose own tensors changed (``transformers``' ``Conv1D.nf``) gets every int
   attribute equal to an old axis size replaced by that axis' new size, when the new size is unique;
3. *attention*: for every ``scaled_dot_product_attention`` the graph runs, the enclosing module's head
   attributes, by name and old value: heads ``H_q``, key/value heads ``H_kv`` (the narrowest head axis on
   the key path, before ``repeat_kv``), ``head_dim`` ``D``, groups ``H_q / H_kv``, all-head size
   ``H_q * D`` (GPT-2's ``split_size``) and the hidden size the module reads. Edited ``view``/``reshape``/
   ``split_with_sizes`` sizes inside a module add (old, new) pairs for the same names (hand-written
   attention); for the hidden and all-head sizes (equal when the model is built) the module's own size
   arguments decide first: a size they changed follows them, a feature-axis size they kept stays; then a
   hidden-named attribute equal to the all-head size of the module's attention follows that size, or its
   input width (``prefer``; ``write_back`` tries both when the first fails its check). A head count the
   attention call measures (``MEASURED``) overrides evidence 2 for an attribute of that name.

Last and over all of these, for a module whose own view/split sizes changed and that runs no attention call
(a gated delta-net): the attributes its forward reads into those sizes take the values the graph's sizes
require (``uses``), and the others follow the config fields its constructor computes them from
(``derive``: ``conv_dim = 2 * key_dim + value_dim``), so no attribute changes because of a coincidence of
values.

``scaling`` is left alone: the graph keeps the original constant, and the verifier compares the two.

Example:
    >>> import torch, fxadapt
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> g = fxadapt.transform(m, 0.5, (torch.randn(2, 4),), output="graph",
    ...                       solve=fxadapt.SolveConfig(align=1))
    >>> ops, _ = width_ops(m, g, g)
    >>> sorted((o["module"], o["attr"], o["value"]) for o in ops if o["op"] == "set")
    [('0', 'out_features', 4), ('2', 'in_features', 4)]
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxadapt.writeback.derive import derived_attrs

aten = torch.ops.aten

NAMES = {
    "heads": ("num_heads", "num_attention_heads", "n_head", "n_heads", "num_attn_heads", "attention_heads"),
    "kv": ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head", "num_key_value_heads_per_layer"),
    "head_dim": ("head_dim", "attention_head_size", "head_size", "d_kv", "kv_channels", "dim_head"),
    "groups": ("num_key_value_groups", "n_rep", "num_kv_groups", "num_queries_per_kv"),
    "all": ("all_head_size", "inner_dim", "split_size", "inner_size"),
    "hidden": ("hidden_size", "embed_dim", "d_model", "n_embd", "dim"),
    "latent": ("kv_lora_rank", "q_lora_rank"),   # low-rank latent widths (multi-head latent attention)
}


def tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer under every name it has (tied tensors repeat)."""
    return dict([*model.named_parameters(remove_duplicate=False),
                 *model.named_buffers(remove_duplicate=False)])


def graph_tensor(graph_tensors: dict, user: dict, name: str) -> torch.Tensor | None:
    """The graph's tensor for the user's ``name``, by that name or any name of the same (tied) tensor."""
    if name in graph_tensors:
        return graph_tensors[name]
    t = user[name]
    return next((graph_tensors[n] for n, u in user.items() if u is t and n in graph_tensors), None)


def width_ops(model: nn.Module, gm: GraphModule, base: GraphModule,
              prefer: str = "all", used: dict | None = None) -> tuple[list[dict], dict]:
    """``resize`` and ``set`` operations taking ``model`` to the widths of ``gm`` (``base``: the graph before
    materialize, for the old shapes the attention evidence compares with), and that evidence (module path
    -> {kind: (old, new)}). ``prefer``: what a hidden-named attribute of an attention module equal to both its
    input width and its all-head size follows when its own size arguments do not say (``"all"`` or
    ``"hidden"``; see ``SIZES``). ``used``: the attributes modules' forwards read into edited size arguments
    (``uses.forward_uses``), which decide those modules' attributes and the config fields they are built
    from (``derive.derived_attrs``; in the evidence as ``("field", name): (old, new)``)."""
    user, graph = tensors_of(model), tensors_of(gm)
    ops, seen, changed = [], set(), {}
    for name, t in user.items():
        g = graph_tensor(graph, user, name)
        if g is None or id(t) in seen:
            continue
        seen.add(id(t))
        if tuple(g.shape) != tuple(t.shape):
            ops.append({"op": "resize", "name": name, "shape": list(g.shape)})
            changed[name] = (tuple(t.shape), tuple(g.shape))
    attrs: dict[tuple[str, str], object] = {}
    for owner in sorted({n.rpartition(".")[0] for n in changed}):
        attrs.update(_leaf_attrs(model, gm, owner, changed))
    attrs.update({k: v for k, v in _tensorless_twins(model, gm).items() if k not in attrs})
    attrs.update({k: v for k, v in _input_attrs(model, attrs).items() if k not in attrs})
    evidence = _attention_evidence(gm, base)
    for path, pairs in evidence.items():
        measured = _measured(model, path, pairs)
        attrs = {k: v for k, v in attrs.items() if k not in measured}
        attrs.update({k: v for k, v in _named(model, path, pairs, prefer).items()
                      if k not in attrs or k in measured})
    if used:
        attrs, fields = derived_attrs(model, attrs, used)
        for path, pairs in fields.items():   # ("field", name): (old, new), for the config (``hf``)
            evidence.setdefault(path, {}).update({("field", f): v for f, v in pairs.items()})
    for (path, attr), value in sorted(attrs.items()):
        op = {"op": "set", "module": path, "attr": attr,
              "value": list(value) if isinstance(value, tuple) else value}
        ops.append({**op, "tuple": True} if isinstance(value, tuple) else op)
    return ops, evidence


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def _int_attrs(mod: nn.Module) -> dict:
    return {k: v for k, v in vars(mod).items() if not k.startswith("_") and k != "training"
            and (type(v) is int or (isinstance(v, tuple) and v and all(type(x) is int for x in v)))}


def twin_attrs(mod: nn.Module, twin: nn.Module | None, path: str) -> dict | None:
    """Evidence 1: the int attributes of ``mod`` that differ from its graph twin (a standard ``torch.nn``
    module of the same kind, rebuilt by the registry after slicing), keyed ``(path, attr)``; None when
    ``twin`` is no such module."""
    if (twin is None or type(twin) is nn.Module or not type(twin).__module__.startswith("torch.nn")
            or not isinstance(mod, type(twin))):
        return None
    theirs = _int_attrs(twin)
    return {(path, k): theirs[k] for k, v in _int_attrs(mod).items() if k in theirs and theirs[k] != v}


def _tensorless_twins(model: nn.Module, gm: GraphModule) -> dict:
    """Evidence 1 for modules without tensors (a ``LayerNorm(elementwise_affine=False)``): their graph twin's
    differing int attributes (``normalized_shape``)."""
    out = {}
    for path, mod in model.named_modules():
        if path and not mod._modules and not any(t is not None for t in (*mod._parameters.values(),
                                                                           *mod._buffers.values())):
            out.update(twin_attrs(mod, _submodule(gm, path), path) or {})
    return out


def _leaf_attrs(model: nn.Module, gm: GraphModule, owner: str, changed: dict) -> dict:
    mod = _submodule(model, owner)
    if mod is None:
        return {}
    from_twin = twin_attrs(mod, _submodule(gm, owner), owner)
    if from_twin is not None:
        return from_twin
    sizes: dict[int, set] = {}
    vectors: dict[int, set] = {}   # 1-D tensors (biases) name an axis unambiguously: Conv1D(nf).bias
    for name, t in mod.named_parameters(recurse=False):
        full = f"{owner}.{name}" if owner else name
        old, new = changed.get(full, (tuple(t.shape), tuple(t.shape)))
        for a, b in zip(old, new):
            sizes.setdefault(a, set()).add(b)
            if len(old) == 1:
                vectors.setdefault(a, set()).add(b)
    out = {}
    for k, v in _int_attrs(mod).items():
        if type(v) is not int:   # a tuple of sizes (a LayerNorm subclass' normalized_shape), entry by entry
            new = tuple(_new_size(x, sizes, vectors) for x in v)
            if new != v:
                out[(owner, k)] = new
            continue
        if _new_size(v, sizes, vectors) != v:
            out[(owner, k)] = _new_size(v, sizes, vectors)
    return out


CHANNELS = ("num_channels", "in_channels", "in_chans", "input_dim")
"""A module's record of its input width (FocalNet's patch embedding checks ``x.shape[1] == num_channels``)."""


def _input_attrs(model: nn.Module, attrs: dict) -> dict:
    """Evidence 4: a module whose first child is a layer whose input width changed (``in_channels``/
    ``in_features`` set above) gets its ``CHANNELS`` attribute equal to that old width set to the new one."""
    out = {}
    for path, mod in model.named_modules():
        first = next(iter(mod._modules.items()), None)
        if first is None or first[1] is None:
            continue
        child = f"{path}.{first[0]}" if path else first[0]
        for key in ("in_channels", "in_features"):
            old, new = getattr(first[1], key, None), attrs.get((child, key))
            if type(old) is int and type(new) is int:
                out.update({(path, a): new for a, v in _int_attrs(mod).items() if a in CHANNELS and v == old})
    return out


def _new_size(v: int, sizes: dict, vectors: dict) -> int:
    """An old axis size with one new size (an unchanged axis counts as one) becomes it; else ``v``."""
    for table in (sizes, vectors):
        if len(table.get(v, ())) == 1:
            return next(iter(table[v]))
    return v


def module_stack(node: Node) -> list[str]:
    """The module paths a node was traced in, outermost first (export's ``nn_module_stack``)."""
    st = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in st.values()]



def _shape(node: Node) -> tuple | None:
    v = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def _narrowest_heads(node: Node, head_dim: int) -> int | None:
    """The fewest heads seen walking back from an attention operand through shape-preserving reshapes
    (``repeat_kv``'s expand/reshape widens k and v to the query heads; before it they have H_kv)."""
    best, cur = None, node
    for _ in range(12):
        s = _shape(cur)
        if s is None:
            break
        if len(s) == 4 and s[-1] == head_dim:
            best = s[1] if best is None else min(best, s[1])
        if len(s) == 5 and s[-1] == head_dim:
            best = s[1] if best is None else min(best, s[1])
        ins = [a for a in cur.all_input_nodes if a.op != "get_attr" and _shape(a) is not None]
        if not ins or cur.target in (aten.transpose.int, aten.permute.default):
            break   # before it, axis 1 is not the heads' (Moonshine's [b, s, h, d] of 4 tokens)
        cur = ins[0]
    return best


def _attention_shapes(node: Node) -> dict | None:
    q, k = (_shape(a) for a in node.args[:2])
    if q is None or k is None or len(q) != 4:
        return None
    d = q[-1]
    return {"heads": q[1], "kv": _narrowest_heads(node.args[1], k[-1]) or k[1], "head_dim": d}


def _attention_evidence(gm: GraphModule, base: GraphModule) -> dict[str, dict]:
    """Per enclosing module path: {kind: (old, new)} from its attention calls and edited view sizes."""
    old_nodes = {n.name: n for n in base.graph.nodes}
    found: dict[str, dict] = {}
    for node in gm.graph.nodes:
        old = old_nodes.get(node.name)
        stack = module_stack(node)
        if old is None or not stack:
            continue
        pairs = found.setdefault(stack[-1], {})
        if node.target == aten.scaled_dot_product_attention.default:
            new_s, old_s = _attention_shapes(node), _attention_shapes(old)
            if new_s and old_s:
                for kind in new_s:
                    pairs[kind] = (old_s[kind], new_s[kind])
                h, kv, d = (pairs[k] for k in ("heads", "kv", "head_dim"))
                pairs["all"] = (h[0] * d[0], h[1] * d[1])
                if kv[0] and kv[1] and h[0] % kv[0] == 0 and h[1] % kv[1] == 0:
                    pairs["groups"] = (h[0] // kv[0], h[1] // kv[1])
        elif (k := SIZED.get(node.target)) is not None and len(node.args) > k \
                and isinstance(old.args[k], (list, tuple)):
            _size_evidence(pairs, node, old, k)
    first = _first_nodes(gm)
    for path, pairs in found.items():
        hidden = _hidden(first.get(path), old_nodes)
        if hidden:
            pairs["hidden"] = hidden
    return {p: v for p, v in found.items() if v}


SIZED = {aten.view.default: 1, aten.reshape.default: 1, aten.split_with_sizes.default: 1,
         aten.zeros.default: 0, aten.ones.default: 0, aten.full.default: 0}
"""Ops with a list of sizes, by its argument index: views and splits, and constructors (T5's cross-attention
makes a zero position bias of ``(1, n_heads, q, k)``)."""


def _size_evidence(pairs: dict, node: Node, old: Node, at: int = 1) -> None:
    """Sizes in a module's own shape arguments: an edited one is ``("view", old) -> (old, new)``; one left as
    it was on the feature axis (the last entry of a view, every entry of a split) is ``("kept", old)``, and
    on any axis ``("same", old)`` (a size both edited and kept in one view names no single attribute:
    Hiera's ``[b, tokens, windows=4, 3, heads=4, d]`` with the heads pruned)."""
    olds, news = old.args[at], node.args[at]
    for k, (a, b) in enumerate(zip(olds, news)):
        if type(a) is not int or type(b) is not int:
            continue
        if a != b:
            pairs.setdefault(("view", a), (a, b))
            continue
        pairs.setdefault(("same", a), (a, a))
        if node.target == aten.split_with_sizes.default or k == len(olds) - 1:
            pairs.setdefault(("kept", a), (a, a))


def _first_nodes(gm: GraphModule) -> dict[str, Node]:
    """Module path -> the first op node (graph order) traced in that module, for every path (one pass)."""
    first: dict[str, Node] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_function"):
            for path in module_stack(node):
                first.setdefault(path, node)
    return first


def _hidden(node: Node | None, old_nodes: dict) -> tuple | None:
    """(old, new) width of the first tensor a module reads (the hidden size it works in), from ``node``:
    the first op traced in it (``_first_nodes``)."""
    if node is None:
        return None
    ins = [a for a in node.all_input_nodes if a.op != "get_attr"]
    old = old_nodes.get(ins[0].name) if ins else None
    if old is not None and _shape(ins[0]) and _shape(old):
        return _shape(old)[-1], _shape(ins[0])[-1]
    return None


def _named(model: nn.Module, path: str, pairs: dict, prefer: str = "all") -> dict:
    """Attributes of the module at ``path`` named as in ``NAMES`` whose value is an old size of that kind."""
    mod = _submodule(model, path)
    if mod is None:
        return {}
    views = {a: b for key, (a, b) in pairs.items() if isinstance(key, tuple) and key[0] == "view"}
    kept = {a for key, (a, _) in pairs.items() if isinstance(key, tuple) and key[0] == "kept"}
    same = {a for key, (a, _) in pairs.items() if isinstance(key, tuple) and key[0] == "same"}
    out = {}
    for attr, value in _int_attrs(mod).items():
        if type(value) is not int:
            continue
        if _sized_name(attr) and value in views and value not in kept | same:
            out[(path, attr)] = views[value]   # a size the module's own view/split arguments changed
        for kind, names in NAMES.items():
            if attr not in names:
                continue
            pair = pairs.get(kind)
            if kind == "hidden" and prefer == "all" and "all" in pairs and pairs["all"][0] == value:
                pair = pairs["all"]     # an attention module reshapes its heads' output by it (CodeGen)
            if kind in SIZES and value in views and value not in kept \
                    and (pair is None or pair[0] == pair[1]):
                out[(path, attr)] = views[value]
            elif kind in SIZES and value in kept and value not in views:
                continue
            elif pair is not None and pair[0] == value and pair[1] != value:
                out[(path, attr)] = pair[1]
            elif pair is None and value in views:
                out[(path, attr)] = views[value]
    return out


MEASURED = ("heads", "kv", "head_dim", "groups")
"""Head counts an attention call measures directly: its own (old, new) pair decides a module attribute of
that name, over evidence 2 (Doge's ``num_key_value_groups`` 2 equals its ``A``'s old length, the key/value
heads, 2 -> 3, while the groups stay 2)."""


def _measured(model: nn.Module, path: str, pairs: dict) -> set:
    """The ``(path, attr)`` keys of the module at ``path`` whose name is a ``MEASURED`` kind the attention
    evidence holds with the attribute's value as its old size."""
    mod = _submodule(model, path)
    if mod is None:
        return set()
    return {(path, attr) for attr, value in _int_attrs(mod).items() for kind in MEASURED
            if attr in NAMES[kind] and kind in pairs and pairs[kind][0] == value}


def _sized_name(attr: str) -> bool:
    """A size attribute named by no kind in ``NAMES`` (a Mamba-2 mixer's ``intermediate_size``/``conv_dim``, a
    gated norm's ``group_size``, Hiera's ``hidden_size_output``: a ``size``/``dim`` word after the first): it
    follows an edited size of the module's own view/split arguments.

    >>> _sized_name("conv_dim"), _sized_name("group_size"), _sized_name("layer_idx"), _sized_name("head_dim")
    (True, True, False, False)
    >>> _sized_name("hidden_size_output"), _sized_name("sizes"), _sized_name("dim")
    (True, False, False)
    """
    named = {n for names in NAMES.values() for n in names}
    words = attr.split("_")
    return attr not in named and len(words) > 1 and bool({"size", "dim"} & set(words[1:]))


# Sizes that coincide when a model is built (hidden == heads * head_dim), so the name alone does not say
# which an attribute is: the module's own shape arguments decide (XGLM's ``embed_dim`` reshapes the heads'
# output, GPT-BigCode's splits the query's width); otherwise, in a module that runs attention, ``prefer``
# picks the all-head size or the module's input width (CodeGen's ``embed_dim // mp_num`` splits its fused
# qkv into per-group widths, which neither shows: ``write_back`` tries "all", then "hidden").
SIZES = ("hidden", "all")
