"""Recipes that follow the model: the shapes a checkpoint holds when it is saved win over the ones the
recipe recorded when ``transform`` made it.

A user edits the adapted model after ``transform`` (``resize_token_embeddings``, added tokens, a LoRA merge,
a dtype change) and saves it; the recipe it carries (``config.fxadapt_recipe``, or the one ``fxadapt.save``
writes) still says the shapes of the moment of adaptation. The recipe says *which* tensors changed; the
checkpoint says their *sizes* at save time. So, on load, after the recipe is replayed on a fresh instance:

    for every tensor t (final names) that the recipe made (resized, or an inserted copy's),
    whose checkpoint shape s' has t's rank and differs from t's:
        resize t to s'                                     (a ``final`` resize operation)
        set num_embeddings, embedding_dim / out_features, in_features / nf  of its nn.Embedding /
        nn.Linear / transformers Conv1D owner from s'      (``final`` set operations)

The operations are appended to the recipe, so the loaded model carries a recipe that replays to its own
shapes (and re-saving round-trips again). A checkpoint tensor of another rank, or a name the checkpoint
lacks, is left alone (the weights loader then names the mismatch). Tensors the recipe never made are the
stock class's business: their sizes come from the config (``resize_token_embeddings`` sets ``vocab_size``).

Example:
    >>> import torch
    >>> from fxadapt.writeback.recipe import Recipe, apply
    >>> fresh = torch.nn.Sequential(torch.nn.Embedding(1000, 128))
    >>> made = made_by(Recipe(({"op": "resize", "name": "0.weight", "shape": [1000, 80]},)), fresh)
    >>> extra = follow(fresh, made, {"0.weight": (1100, 80)})
    >>> [o.get("shape", o.get("value")) for o in extra.ops]
    [[1100, 80], 1100, 80]
    >>> m = apply(extra, fresh)
    >>> m[0].weight.shape, m[0].num_embeddings, m[0].embedding_dim
    (torch.Size([1100, 80]), 1100, 80)
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from fxadapt.writeback.recipe import Recipe, apply

_ATTRS = {   # module kind -> (attribute, axis of the weight it reads)
    nn.Embedding: (("num_embeddings", 0), ("embedding_dim", 1)),
    nn.Linear: (("out_features", 0), ("in_features", 1)),
}


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict([*model.named_parameters(remove_duplicate=False),
                 *model.named_buffers(remove_duplicate=False)])


def made_by(recipe: Recipe, fresh: nn.Module, phases: tuple = ("width", "depth", "final")) -> set[str]:
    """Replay ``recipe`` on ``fresh`` (in place) and return the final names of the tensors it made."""
    kept = list(_tensors(fresh).values())   # held, so no new tensor can take a freed one's id
    before = {id(t) for t in kept}
    apply(recipe, fresh, phases=phases)
    return {n for n, t in _tensors(fresh).items() if id(t) not in before}


def follow(model: nn.Module, made: set[str], saved: dict[str, tuple]) -> Recipe:
    """``final`` operations resizing the tensors of ``model`` named in ``made`` to their shapes in ``saved``
    (tensor name -> shape at save time) where the ranks agree and the shapes differ (module docstring)."""
    ops = []
    for name, t in _tensors(model).items():
        shape = saved.get(name)
        if name in made and shape is not None and len(shape) == t.dim() and tuple(shape) != tuple(t.shape):
            shape = [int(s) for s in shape]
            ops.append({"op": "resize", "name": name, "shape": shape, "final": True})
            ops += [{"op": "set", "module": m, "attr": a, "value": v, "final": True}
                    for (m, a), v in _attrs(model, name, shape).items()]
    return Recipe(tuple(ops))


def _attrs(fresh: nn.Module, name: str, shape: list[int]) -> dict[tuple[str, str], int]:
    """(module, attribute) -> size for the module owning weight ``name``, read from its new ``shape``."""
    owner, _, attr = name.rpartition(".")
    if attr != "weight":
        return {}
    try:
        mod = fresh.get_submodule(owner)
    except AttributeError:
        return {}
    pairs = next((v for k, v in _ATTRS.items() if isinstance(mod, k)), None)
    if pairs is None and type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):   # transformers' GPT-2 Conv1D
        pairs = (("nf", 1),)
    return {(owner, a): shape[axis] for a, axis in pairs or () if axis < len(shape)}


def checkpoint_shapes(directory: str | os.PathLike) -> dict[str, tuple]:
    """Tensor name -> shape of a ``save_pretrained`` directory's safetensors files, read from their headers
    (no tensor data is loaded); empty when it has none."""
    from safetensors import safe_open  # deferred: optional dependency, safetensors checkpoints only

    directory = os.fspath(directory)
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [n for n in ("model.safetensors",) if os.path.exists(os.path.join(directory, n))]
    out = {}
    for name in files:
        with safe_open(os.path.join(directory, name), "pt") as f:
            for key in f.keys():
                out[key] = tuple(f.get_slice(key).get_shape())
    return out
