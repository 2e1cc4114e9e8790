"""Deterministic batches from the data users have: tensors, dicts of tensors, datasets, data loaders and lists
of batches, with or without labels.

Sources and how batch ``step`` is read:

- **samples** (``(x, y)`` / ``(x,)`` / ``x`` tensors, a ``TensorDataset``, a dict of tensors such as a
  tokenizer's whole-corpus ``BatchEncoding``, a map-style ``Dataset``): epoch ``e`` uses the permutation drawn
  from ``Generator(seed + e)``, so batch ``k`` is a pure function of ``k`` (datasets are read item by item and
  collated, never loaded whole);
- **a DataLoader**: batch ``step mod len(loader)`` of an epoch (the epoch's length learned at its end when the
  loader has none). Over a map-style dataset only the index lists of the loader's own sampler are walked to
  reach a batch, and only the batches used are loaded, so a far step (a resume, a per-budget offset of the
  many-budgets search) costs no reads; an iterable one is read from the start of an epoch to the batch;
- **a list of batches** (dicts or tuples, as a collator made them): batch ``step mod len(list)``.

Every item is then split by a ``Layout`` (how the captured model is called, ``Layout.example``) into a
``Batch``: ``inputs`` (an ``fxadapt.ir.inputs.Inputs``: ``batch.call(model)``) and ``targets``:

- a tuple is ``(inputs..., targets)`` in the order of the example inputs, or the inputs alone (an attention
  mask or token types may be left out: ones / zeros); ``(x, y)`` for a one-input model;
- a dict is keyword inputs by name plus ``labels`` (or ``label``), as Hugging Face collators give them;
- ``Layout.task``: ``"labels"`` (targets as given), ``"causal"`` (next-token targets: ``labels``, or the
  ``input_ids`` themselves when a token batch has none; the prediction at ``t`` is scored against ``t + 1``)
  or ``"none"`` (calibration data: ``targets is None``, so ``Batches.has_labels`` is False and a consumer
  distils from the original model: ``Batches.teacher`` fills ``Batch.reference`` with its prediction).

``task_loss(prediction, batch, loss_fn)`` is the one loss every search and fine-tune reads.
``fxadapt.train.probe.check_data`` decides the layout against the model before any work.

Sharding (``rank``/``world``, see ``fxadapt.dist``): ``batch_size`` is the *global* batch; every rank draws
the same permutation and keeps its contiguous slice of each global batch (``tensor_split``), the
deterministic equivalent of ``DistributedSampler``; when ``world`` does not divide the global batch the
shards differ by one sample (15 on 2 ranks: 8 and 7, which ``fxadapt.dist.sync_step`` weights by size),
and a global batch smaller than ``world`` is refused (a rank with no sample has no mean loss). A
``DataLoader`` over a map-style dataset is read the same way (its ``batch_size`` as the global batch, its
``collate_fn``); an iterable one gives rank ``r`` the loader's batches ``world * step + r``.

Example:
    >>> import torch
    >>> b = Batches((torch.arange(10.0), torch.arange(10)), batch_size=4, seed=0)
    >>> [len(b.batch(k)[0]) for k in range(4)]
    [4, 4, 4, 4]
    >>> torch.equal(b.batch(3)[1], Batches((torch.arange(10.0), torch.arange(10)), 4, 0).batch(3)[1])
    True
    >>> halves = [Batches((torch.arange(10.0),), 4, 0, rank=r, world=2).batch(3)[0] for r in (0, 1)]
    >>> torch.equal(torch.cat(halves), b.batch(3)[0])
    True
    >>> ids = torch.randint(0, 50, (8, 6))
    >>> lm = Batches([{"input_ids": ids[:4], "labels": ids[:4]}], layout=Layout(task="causal"))
    >>> batch = lm.get(0)
    >>> sorted(batch.inputs.kwargs), batch.causal, lm.has_labels
    (['input_ids'], True, True)
    >>> Batches(torch.randn(8, 3), 4).has_labels          # inputs only: calibration data
    False
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from torch.utils.data.dataloader import default_collate

from fxadapt.errors import InputError
from fxadapt.ir.inputs import Inputs

LABEL_KEYS = ("labels", "label")
FILLED = {"attention_mask": 1, "token_type_ids": 0}   # keyword inputs a batch may leave out, and their value
Task = Literal["labels", "causal", "none"]


def as_tensors(data: Any) -> tuple[torch.Tensor, ...] | None:
    """``data`` as a tuple of per-sample tensors (a tensor, a tuple / list of tensors, a
    ``TensorDataset``)."""
    if isinstance(data, torch.Tensor):
        return (data,)
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return tuple(data)
    if isinstance(data, TensorDataset):
        return tuple(data.tensors)
    return None


def as_mapping(data: Any) -> dict[str, torch.Tensor] | None:
    """``data`` as a dict of per-sample tensors (a dict or ``BatchEncoding`` of tensors), else None."""
    if isinstance(data, Mapping) and data \
            and all(isinstance(v, torch.Tensor) and v.dim() for v in data.values()):
        return dict(data)
    return None


def is_batch_list(data: Any) -> bool:
    """A list of ready batches (dicts or tuples of tensors), as a collator made them."""
    return (isinstance(data, (list, tuple)) and bool(data) and as_tensors(data) is None
            and all(isinstance(b, (Mapping, tuple, list)) for b in data))


def is_map_style(data: Any) -> bool:
    return isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__")


@dataclass(frozen=True)
class Batch:
    """One batch: how the model is called (``inputs``), its ``targets`` (None: no labels) and, without labels,
    the original model's prediction (``reference``) when the batches have a teacher.

    >>> b = Batch(Inputs((torch.ones(2, 3),), {}), torch.tensor([0, 1]))
    >>> b.size, b.call(torch.nn.Linear(3, 4)).shape
    (2, torch.Size([2, 4]))
    """

    inputs: Inputs
    targets: torch.Tensor | None = None
    causal: bool = False            # targets are next tokens: prediction[:, :-1] against targets[:, 1:]
    reference: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.inputs.batch

    def call(self, model: Callable) -> Any:
        return self.inputs.call(model)

    def to(self, device: torch.device | str | None) -> Batch:
        move = (lambda t: t.to(device)) if device is not None else (lambda t: t)
        return Batch(self.inputs.map(move), None if self.targets is None else move(self.targets), self.causal,
                     None if self.reference is None else move(self.reference))


@dataclass(frozen=True)
class Layout:
    """How one data item becomes a ``Batch`` (module docstring): ``example`` the inputs the graph was captured
    with (None: one positional tensor), ``task`` the targets' meaning (None: ``"labels"`` where an item has
    some)."""

    example: Inputs | None = None
    task: Task | None = None

    def slots(self) -> list[tuple[str, Any]]:
        """The example's tensor inputs as ``("arg", index)`` / ``("kw", name)``."""
        if self.example is None:
            return [("arg", 0)]
        return ([("arg", i) for i, v in enumerate(self.example.args) if isinstance(v, torch.Tensor)]
                + [("kw", k) for k, v in self.example.kwargs.items() if isinstance(v, torch.Tensor)])

    def batch(self, item: Any) -> Batch:
        if isinstance(item, torch.Tensor):
            item = (item,)
        if isinstance(item, Mapping):
            given, targets = self._from_dict(item)
        elif isinstance(item, (tuple, list)):
            given, targets = self._from_tuple(tuple(item))
        else:
            raise InputError(f"a data item must be a tensor, a tuple of tensors or a dict of tensors; got "
                             f"{type(item).__name__}")
        inputs = self._inputs(given)
        if self.task == "none":
            targets = None
        if self.task == "causal" and targets is None:
            targets = inputs.kwargs.get("input_ids", next(iter(given.values())))
        return Batch(inputs, targets, self.task == "causal")

    def _from_tuple(self, items: tuple) -> tuple[dict, torch.Tensor | None]:
        slots = self.slots()
        if self.example is None and len(items) > 2:   # (x, y, extra...): the legacy reading
            items = items[:2]
        required = [s for s in slots if s[1] not in FILLED]
        targets = None
        if len(items) >= 2 and len(items) in (len(slots) + 1, len(required) + 1):
            items, targets = items[:-1], items[-1]
        elif len(items) not in (len(slots), len(required)):
            names = ", ".join(str(k) if w == "kw" else f"input {k}" for w, k in slots)
            raise InputError(f"a data item of {len(items)} tensors does not fit the model's {len(slots)} "
                             f"input(s) ({names}): give (inputs..., targets), the inputs alone, or dicts by "
                             "name")
        chosen = slots if len(items) == len(slots) else required
        return dict(zip(chosen, items)), targets

    def _from_dict(self, item: Mapping) -> tuple[dict, torch.Tensor | None]:
        label = next((k for k in LABEL_KEYS if k in item), None)
        if self.example is None:   # no example: every other key is a keyword input
            return {("kw", k): v for k, v in item.items() if k != label}, (item[label] if label else None)
        slots = self.slots()
        if any(w == "arg" for w, _ in slots):
            raise InputError(f"data batches are dicts ({sorted(item)}) but the example inputs are "
                             "positional: give example_inputs as a dict with the batches' keys (e.g. one "
                             "batch without its labels)")
        names = {k for _, k in slots}
        extra = sorted(k for k in item if k not in names and k != label)
        missing = sorted(k for k in names if k not in item and k not in FILLED)
        if extra or missing:
            what = f"keys {extra} the example inputs lack" if extra else f"no {missing}"
            raise InputError(f"a data batch has {what}: give example_inputs with the batches' input keys "
                             f"({sorted(k for k in item if k != label)}; labels go under 'labels')")
        return {("kw", k): item[k] for k in names if k in item}, (item[label] if label else None)

    def _inputs(self, given: dict) -> Inputs:
        if self.example is None:
            return Inputs(tuple(v for (w, _), v in given.items() if w == "arg"),
                          {k: v for (w, k), v in given.items() if w == "kw"})
        ref = next(iter(given.values()))
        args = list(self.example.args)
        kwargs = dict(self.example.kwargs)
        for where, key in self.slots():
            ex = args[key] if where == "arg" else kwargs[key]
            value = given.get((where, key))
            if value is None:   # a mask / token types left out
                value = torch.full(tuple(ref.shape[:ex.dim()]), FILLED[key], dtype=ex.dtype)
            if where == "arg":
                args[key] = value
            else:
                kwargs[key] = value
        return Inputs(tuple(args), kwargs)


@dataclass(frozen=True)
class Data:
    """Data checked against a model (``fxadapt.train.probe.check_data``): the source as given, its ``Layout``
    and its number of samples (None: an iterable loader's)."""

    source: Any
    layout: Layout
    samples: int | None = None

    def with_source(self, source: Any) -> Data:
        return dataclasses.replace(self, source=source, samples=None)


class Batches:
    """The ``step``-th batch of ``data`` (module docstring): ``batch(step)`` as the source gives it,
    ``get(step, device)`` as a ``Batch``; ``inputs(step)`` / ``targets(step)`` / ``call(model, step)`` read
    one part, ``has_labels`` says whether there are targets (else set ``teacher`` to distil from)."""

    def __init__(self, data: Any, batch_size: int = 64, seed: int = 0, rank: int = 0, world: int = 1,
                 layout: Layout | None = None):
        if isinstance(data, Data):
            layout, data = layout or data.layout, data.source
        self.layout = layout or Layout()
        self.teacher: Callable | None = None
        self.tensors, self.mapping = as_tensors(data), as_mapping(data)
        self.dataset, self.collate, self.loader, self.items = None, default_collate, None, None
        if self.tensors is None and self.mapping is None:
            if is_map_style(data):
                self.dataset = data
            elif (isinstance(data, DataLoader) and world > 1 and is_map_style(data.dataset)
                  and data.batch_size):
                self.dataset, self.collate, batch_size = data.dataset, data.collate_fn, data.batch_size
            elif isinstance(data, DataLoader):
                self.loader = data
            elif is_batch_list(data):
                self.items = list(data)
            else:
                raise TypeError(f"data must be (inputs, targets) tensors, inputs alone, a dict of tensors, a "
                                f"Dataset, a DataLoader or a list of batches; got {type(data).__name__}")
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self._it, self._pos, self._epoch, self._labels = None, 0, _length(self.loader), None

    def __len__(self) -> int:
        if self.tensors is not None:
            return len(self.tensors[0])
        if self.mapping is not None:
            return len(next(iter(self.mapping.values())))
        if self.dataset is not None:
            return len(self.dataset)
        if self.items is not None:
            return sum(self.layout.batch(b).size for b in self.items)
        return len(self.loader.dataset)

    def indices(self, step: int) -> torch.Tensor:
        """This rank's sample indices of global batch ``step``."""
        n = len(self)
        bs = min(self.batch_size, n)
        per_epoch = max(1, n // bs)
        if bs < self.world:
            raise InputError(f"a global batch of {bs} samples cannot give each of {self.world} ranks one; "
                             f"use batch_size >= {self.world}")
        epoch, k = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        return perm[k * bs:(k + 1) * bs].tensor_split(self.world)[self.rank]

    def batch(self, step: int) -> Any:
        """Batch ``step`` as the source gives it: a tuple of tensors, or a dict for dict data."""
        if self.loader is not None:
            return _plain(self._from_loader(self.world * step + self.rank))
        if self.items is not None:
            return _plain(self.items[(self.world * step + self.rank) % len(self.items)])
        idx = self.indices(step)
        if self.tensors is not None:
            return tuple(t[idx] for t in self.tensors)
        if self.mapping is not None:
            return {k: v[idx] for k, v in self.mapping.items()}
        return _plain(self.collate([self.dataset[int(i)] for i in idx]))

    def get(self, step: int, device: torch.device | str | None = None) -> Batch:
        """Batch ``step`` split into inputs and targets, on ``device``; without targets and with a
        ``teacher``, its prediction as ``reference``."""
        b = self.layout.batch(self.batch(step)).to(device)
        if b.targets is None and self.teacher is not None:
            with torch.no_grad():
                b = dataclasses.replace(b, reference=prediction(b.call(self.teacher)).detach())
        return b

    def inputs(self, step: int) -> Inputs:
        return self.get(step).inputs

    def targets(self, step: int) -> torch.Tensor | None:
        return self.get(step).targets

    def call(self, model: Callable, step: int, device: torch.device | str | None = None) -> Any:
        return self.get(step, device).call(model)

    @property
    def has_labels(self) -> bool:
        """Whether batches carry targets (labels or next tokens); False for calibration data."""
        if self.layout.task is not None:
            return self.layout.task != "none"
        if self._labels is None:
            self._labels = self.layout.batch(self.batch(0)).targets is not None
        return self._labels

    def _from_loader(self, step: int):
        if self._epoch:
            step %= self._epoch
        if self._it is None or step < self._pos:
            self._it, self._pos = self._walk(), 0
        while True:
            try:
                item = next(self._it)
            except StopIteration:
                if self._pos == 0:
                    raise InputError("data: the DataLoader yields no batch") from None
                self._epoch = self._pos   # an iterable loader's epoch, learned at its end
                step %= self._epoch
                self._it, self._pos = self._walk(), 0
                continue
            self._pos += 1
            if self._pos > step:
                return self._load(item)

    def _fast(self) -> bool:
        """Reach a batch by walking the loader's sampler (index lists), loading only that batch."""
        loader = self.loader
        return loader.batch_sampler is not None and is_map_style(loader.dataset) and loader.num_workers == 0

    def _walk(self):
        return iter(self.loader.batch_sampler) if self._fast() else iter(self.loader)

    def _load(self, item):
        if self._fast():
            return self.loader.collate_fn([self.loader.dataset[i] for i in item])
        return item

    def all(self) -> Any:
        """Every sample at once (tuples concatenated per position, dicts per key)."""
        if self.tensors is not None:
            return self.tensors
        if self.mapping is not None:
            return self.mapping
        if self.dataset is not None:
            return _plain(self.collate([self.dataset[i] for i in range(len(self.dataset))]))
        parts = [_plain(b) for b in (self.items if self.items is not None else self.loader)]
        if isinstance(parts[0], Mapping):
            return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return tuple(torch.cat(p) for p in zip(*parts))


def _length(loader: DataLoader | None) -> int | None:
    if loader is None:
        return None
    try:
        return len(loader) or None
    except TypeError:
        return None


def _plain(item: Any) -> Any:
    """A batch as a tuple (tensors, lists) or a dict (mappings, a ``BatchEncoding``)."""
    if isinstance(item, torch.Tensor):
        return (item,)
    if isinstance(item, Mapping):
        return dict(item)
    return tuple(item)


def task_loss(pred: torch.Tensor, batch: Batch, loss_fn: Callable = F.cross_entropy) -> torch.Tensor:
    """The loss of ``pred`` (a model's ``prediction``) on ``batch``: ``loss_fn(pred, targets)`` (a user's loss
    gets both as they are; cross-entropy is taken over every token for per-token integer targets, shifted by
    one for next-token ones); without targets the distillation loss to
    ``batch.reference`` (KL per row for cross-entropy, else ``loss_fn(pred, reference)``).

    >>> ids = torch.tensor([[1, 2, 3]])
    >>> b = Batch(Inputs((ids,), {}), ids, causal=True)
    >>> round(float(task_loss(torch.zeros(1, 3, 4), b)), 4)     # log(4): uniform over 4 tokens
    1.3863
    """
    if batch.targets is None:
        if batch.reference is None:
            raise InputError("data without labels needs a teacher: set Batches.teacher (the original model) "
                             "to distil from, or give (inputs, targets)")
        ref = batch.reference.float()
        if loss_fn is F.cross_entropy:
            return F.kl_div(F.log_softmax(pred.reshape(-1, pred.shape[-1]), -1),
                            F.log_softmax(ref.reshape(-1, ref.shape[-1]), -1), log_target=True,
                            reduction="batchmean")
        return loss_fn(pred, ref)
    y = batch.targets
    if loss_fn is not F.cross_entropy:   # a user's loss takes the prediction and the targets as they are
        return loss_fn(pred, y)
    if batch.causal:
        pred, y = pred[:, :-1], y[:, 1:]
    if y.dim() >= 2 and not y.is_floating_point() and tuple(y.shape) == tuple(pred.shape[:-1]):
        pred, y = pred.reshape(-1, pred.shape[-1]), y.reshape(-1)
    return loss_fn(pred, y)


def prediction(out: Any) -> torch.Tensor:
    """The tensor a loss reads from a model's output: the tensor itself, a ``ModelOutput``'s ``logits``, or
    the first tensor of a tuple / list / dict.

    >>> prediction((torch.ones(2), torch.zeros(1))).tolist()
    [1.0, 1.0]
    """
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"cannot find the prediction tensor in a model output of type {type(out).__name__}; "
                    f"give a loss_fn that takes the model's output as it is")
