"""Activation importance of a streamed checkpoint on calibration batches, one module's weights resident.

Sequential onloading: the meta-built model runs its own forward on the calibration batches (those of one
length concatenated, up to ``TOKENS`` tokens a forward, so a unit is read once per such chunk); a forward
pre-hook on each *unit* (an element of a ``ModuleList``, e.g. a decoder layer, or a module holding weights
of its own outside one: the embedding, the final norm, the LM head) reads that unit's tensors from the
checkpoint by name and a forward hook puts the meta tensors back, so only one unit's weights (plus the
hidden states handed between units) are resident. The LM head runs only when an output site needs it.

The statistic (Minitron's activation importance) is, at a site reading activation ``x`` (tokens ``t``):

    r_site[p] = sum_t |x_t[p]| / T          (mean absolute activation of position p over the T tokens)

where a ``param`` site of a group is mapped to an activation by the op its weight feeds in the analysed
graph (``ops.registry.op_of``) and the module that owns the weight: ``in`` on ``linear``'s weight axis 1
-> the Linear's input (the MLP width: ``down_proj``'s input; heads:
``o_proj``'s input, its positions grouped into heads by the site's index; the hidden size: the inputs of
every projection, i.e. the norms' outputs, and of the LM head); ``out`` on ``linear``'s weight axis 0 or
``embedding``'s axis 1 -> the module's output, used only for a group with no ``in`` site. The
positions are mapped onto units exactly as the data-free L1 scores are (``planning.plan.importance``):

    score_g[u] = sum_site  s_site[u] / mean_u(s_site),    s_site[u] = sum_{p: index_site[p] = u} r_site[p]

Groups with no such site keep the L1 score. The widths stay the data-free solve's; the scores only choose
which units are kept (``make_plan(..., scores=)``).

Example:
    >>> import tempfile, transformers
    >>> src = tempfile.mkdtemp()
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    >>> transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    >>> from fxadapt.export.stream import adapt_checkpoint
    >>> res = adapt_checkpoint(src, 0.5, tempfile.mkdtemp(), data=torch.randint(0, 64, (2, 4, 16)))
    >>> 0.45 < res.macs_after / res.macs_before <= 0.5
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fxadapt.errors import InputError
from fxadapt.export.shards import Checkpoint
from fxadapt.ops.registry import op_of
from fxadapt.pipeline.transform import Job
from fxadapt.planning.plan import make_plan

if TYPE_CHECKING:
    from fxadapt.analysis.analyze import Analysis


@dataclass(frozen=True)
class Probe:
    """Where a group's site reads its activation: ``module`` (a name of the model), its ``input`` or output,
    the group and the site's position -> unit index."""

    group: int
    module: str
    input: bool
    index: np.ndarray = field(compare=False)


def probes(a: Analysis, model: nn.Module) -> list[Probe]:
    """The activation probes of every prunable group (module docstring): its ``in`` Linear sites, else its
    ``out`` Linear / Embedding sites."""
    owners = _weight_owners(model)
    nodes = {n.name: n for n in a.gm.graph.nodes}
    linear, embedding = torch.ops.aten.linear.default, torch.ops.aten.embedding.default
    out = []
    for g in a.groups:
        if not g.prunable:
            continue
        ins, outs = [], []
        for m in g.members:
            s = m.site
            if s.kind != "param" or s.ref is None:
                continue
            op = op_of(nodes[s.node_name]) if s.node_name in nodes else None   # the op the weight feeds
            for name, _ in owners.get(s.ref.target, []):
                if s.role == "in" and op is linear and s.axis == 1:
                    ins.append(Probe(g.id, name, True, m.index))
                elif s.role == "out" and (op is linear and s.axis == 0 or op is embedding and s.axis == 1):
                    outs.append(Probe(g.id, name, False, m.index))
        out += ins or outs
    return out


def _weight_owners(model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """Every name of a ``weight`` (tied names too) -> the (name, module) pairs whose ``weight`` it is."""
    by_id: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        w = mod._parameters.get("weight")
        if w is not None:
            by_id.setdefault(id(w), []).append((name, mod))
    return {name: by_id.get(id(p), []) for name, p in model.named_parameters(remove_duplicate=False)}


def activation_stats(model: nn.Module, ckpt: Checkpoint, keys: dict[str, str], wanted: Iterable[Probe],
                     batches: Iterable[Any], progress: Callable[[], None] | None = None
                     ) -> dict[tuple[str, bool], np.ndarray]:
    """``r[(module, input)]``: the mean |activation| per last-axis position over every token of ``batches``
    (token-id tensors), the model run with one unit's weights read from ``ckpt`` at a time (``keys``: the
    model's tensor names -> checkpoint keys); ``progress`` is called once per unit run."""
    sites = {(p.module, p.input) for p in wanted}
    sums: dict[tuple[str, bool], torch.Tensor] = {}
    tokens: dict[tuple[str, bool], int] = {}

    def add(key, x: torch.Tensor) -> None:
        x = x.detach()
        sums[key] = sums.get(key, 0) + x.abs().float().reshape(-1, x.shape[-1]).sum(0).double()
        tokens[key] = tokens.get(key, 0) + x.numel() // x.shape[-1]

    handles = []
    head = _head(model)
    for name, mod in model.named_modules():
        if (name, True) in sites:
            handles.append(mod.register_forward_pre_hook(lambda _m, i, k=(name, True): add(k, i[0])))
        if (name, False) in sites:
            handles.append(mod.register_forward_hook(lambda _m, _i, o, k=(name, False): add(k, o)))
    if head is not None and (head[0], False) not in sites:   # nothing reads the logits: stop before them
        handles.append(head[1].register_forward_pre_hook(_stop))
    handles += onload(model, ckpt, keys, progress)
    try:
        with torch.no_grad(), _cpu_buffers(model):
            for ids in chunks(batches):
                try:
                    model(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return {k: (s / tokens[k]).numpy() for k, s in sums.items()}


TOKENS = 1 << 13   # tokens one forward runs at most: batches of one length are run together up to this


def chunks(batches: Iterable[Any], tokens: int = TOKENS) -> Iterable[torch.Tensor]:
    """Consecutive batches of one sequence length concatenated (a batch split) into runs of at most
    ``tokens`` tokens (at least one sequence), so each unit is read once per run, not per batch.

    >>> [tuple(c.shape) for c in chunks([torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(5, 3)], 12)]
    [(3, 4), (1, 4), (4, 3), (1, 3)]
    """
    held: list[torch.Tensor] = []
    for batch in batches:
        batch = torch.as_tensor(batch)
        for b in batch.reshape(-1, batch.shape[-1]).split(max(1, tokens // batch.shape[-1])):
            room = tokens - sum(h.numel() for h in held)
            if held and (b.shape[-1] != held[0].shape[-1] or room < b.shape[-1]):
                yield torch.cat(held)
                held, room = [], tokens
            if room < b.numel():   # the run fills up: its first rows close it
                take = max(1, room // b.shape[-1])
                held.append(b[:take])
                yield torch.cat(held)
                held, b = [], b[take:]
            if b.numel():
                held.append(b)
    if held:
        yield torch.cat(held)


class _Stop(Exception):
    """Raised before the LM head when no probe reads the logits."""


def _stop(*_):
    raise _Stop


def _head(model: nn.Module) -> tuple[str, nn.Module] | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return next(((n, m) for n, m in model.named_modules() if m is head), None) if head is not None else None


def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules onloaded one at a time: every element of a ``ModuleList`` and every module with weights
    of its own outside one (module docstring)."""
    out: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, mod: nn.Module) -> None:
        if isinstance(mod, nn.ModuleList):
            out.extend((f"{prefix}{n}", m) for n, m in mod.named_children())
            return
        if any(p is not None for p in mod._parameters.values()):
            out.append((prefix.rstrip("."), mod))
            return
        for n, m in mod.named_children():
            walk(f"{prefix}{n}.", m)

    walk("", model)
    return out


def onload(model: nn.Module, ckpt: Checkpoint, keys: dict[str, str],
           progress: Callable[[], None] | None = None) -> list:
    """Hooks on every unit (``units``): before its forward its parameters are read from ``ckpt`` (new
    tensors, by their checkpoint keys), after it the original (meta) parameters are put back; the handles."""
    handles = []
    for prefix, unit in units(model):
        saved: list[tuple[nn.Module, str, nn.Parameter]] = []

        def load(mod, _inputs, prefix=prefix, saved=saved):
            for name, sub in mod.named_modules(remove_duplicate=False):
                for leaf, p in list(sub._parameters.items()):
                    full = ".".join(x for x in (prefix, name, leaf) if x)
                    if p is None:
                        continue
                    if full not in keys:
                        raise InputError(f"the checkpoint holds no tensor for {full}: it does not match "
                                         f"its config")
                    saved.append((sub, leaf, p))
                    sub._parameters[leaf] = nn.Parameter(ckpt.read(keys[full]), requires_grad=False)

        def unload(_mod, _inputs, _out, saved=saved):
            for sub, leaf, p in saved:
                sub._parameters[leaf] = p
            saved.clear()
            if progress is not None:
                progress()

        handles += [unit.register_forward_pre_hook(load), unit.register_forward_hook(unload)]
    return handles


class _cpu_buffers:
    """Rebuilds the modules holding meta buffers that no checkpoint stores (rotary embeddings'
    ``inv_freq``) from the config, on the CPU, and puts the meta ones back on exit."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.swapped: list[tuple[nn.Module, str, nn.Module]] = []

    def __enter__(self):
        config = getattr(self.model, "config", None)
        for name, mod in list(self.model.named_modules()):
            if not any(b.is_meta for b in mod._buffers.values() if b is not None) or not name:
                continue
            parent, _, leaf = name.rpartition(".")
            owner = self.model.get_submodule(parent)
            try:
                with torch.device("cpu"):
                    fresh = type(mod)(config=config)
            except TypeError as e:
                raise InputError(f"{name} ({type(mod).__name__}) holds buffers the checkpoint does not "
                                 f"store: score this model in memory") from e
            setattr(owner, leaf, fresh)
            self.swapped.append((owner, leaf, mod))
        return self

    def __exit__(self, *exc):
        for owner, leaf, mod in self.swapped:
            setattr(owner, leaf, mod)


def group_scores(ps: list[Probe], stats: dict[tuple[str, bool], np.ndarray],
                 widths: dict[int, int]) -> dict[int, np.ndarray]:
    """``score_g[u]``: every probe's statistic summed per unit, normalised by its mean, summed over the
    group's probes (module docstring); ``widths``: units per group."""
    out: dict[int, np.ndarray] = {}
    for p in ps:
        r = stats[(p.module, p.input)]
        pos = p.index >= 0
        sums = np.bincount(p.index[pos], weights=r[pos], minlength=widths[p.group])
        out[p.group] = out.get(p.group, 0) + sums / max(sums.mean(), 1e-12)
    return out


def calibration(data: Any, vocab: int) -> list[torch.Tensor]:
    """The calibration batches as ``(batch, seq)`` token-id tensors: ``data`` is a tensor ``(n, batch, seq)``
    or ``(batch, seq)``, or an iterable of ``(batch, seq)`` tensors, every id in ``[0, vocab)``."""
    out = list(data) if not isinstance(data, torch.Tensor) or data.dim() == 3 else [data]
    out = [torch.as_tensor(b) for b in out]
    for b in out:
        if b.dim() != 2 or b.is_floating_point() or b.is_complex() or b.numel() == 0:
            raise InputError(f"data: give token ids of shape (batches, batch, seq) or (batch, seq), not "
                             f"{b.dtype} {tuple(b.shape)}")
        if int(b.min()) < 0 or int(b.max()) >= vocab:
            raise InputError(f"data: token ids must lie in [0, {vocab}) (the config's vocab_size), "
                             f"not [{int(b.min())}, {int(b.max())}]")
    if not out:
        raise InputError("data: the calibration batches are empty: give at least one batch of token ids")
    return out


def data_scores(a: Analysis, model: nn.Module, ckpt: Checkpoint, keys: dict[str, str], batches: Any,
                progress: Callable[[], None] | None = None) -> dict[int, np.ndarray]:
    """Per-unit activation importance of every prunable group with an activation site (module docstring),
    on the calibration ``batches`` (as ``calibration`` reads them)."""
    ps = probes(a, model)
    config: Any = getattr(model, "config", None)
    stats = activation_stats(model, ckpt, keys, ps, calibration(batches, config.vocab_size), progress)
    return group_scores(ps, stats, {g.id: g.units for g in a.groups})


def rescored(job: Job, model: nn.Module, ckpt: Checkpoint, keys: dict[str, str], batches: Any,
             progress: Callable[[], None] | None = None) -> Job:
    """``job``'s plan with the same widths, its units chosen by their activation importance on ``batches``
    (``data_scores``; a group without an activation site keeps its L1 choice)."""
    assert job.outcome is not None
    a = job.outcome.analysis
    scores = data_scores(a, model, ckpt, keys, batches, progress)
    plan = make_plan(a, job.outcome.plan.units, scores=scores, preserve=job.cfg.solve.preserve)
    return dataclasses.replace(job, outcome=dataclasses.replace(job.outcome, plan=plan))
