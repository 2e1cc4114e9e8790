"""Deterministic batches from tensors, datasets or data loaders (so a resumed search sees the same data).

``Batches(data, batch_size, seed).batch(step)`` returns the step-th batch: for tensors or map-style
datasets, epoch ``e`` uses the permutation drawn from ``Generator(seed + e)``, so batch ``k`` is a pure
function of ``k`` (datasets are read item by item and collated, never loaded whole); a ``DataLoader`` is
cycled (on resume it is replayed up to the step).

Sharding (``rank``/``world``, see ``fxadapt.dist``): ``batch_size`` is the *global* batch; every rank draws
the same permutation and keeps its contiguous slice of each global batch (``tensor_split``), the
deterministic equivalent of ``DistributedSampler``; when ``world`` does not divide the global batch the
shards differ by one sample (15 on 2 ranks: 8 and 7, which ``fxadapt.dist.sync_step`` weights by size),
and a global batch smaller than ``world`` is refused (a rank with no sample has no mean loss). A
``DataLoader`` over a map-style dataset is read the same way (its ``batch_size`` as the global batch, its
``collate_fn``); an iterable one gives rank ``r`` the loader's batches ``world * step + r`` (there the
global batch is ``world`` x the loader's batch).

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
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from torch.utils.data.dataloader import default_collate

from fxadapt.errors import InputError


def as_tensors(data: Any) -> tuple[torch.Tensor, ...] | None:
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return tuple(data)
    if isinstance(data, TensorDataset):
        return tuple(data.tensors)
    return None


def _map_style(data: Any) -> bool:
    return isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__")


class Batches:
    def __init__(self, data: Any, batch_size: int = 64, seed: int = 0, rank: int = 0, world: int = 1):
        self.tensors = as_tensors(data)
        self.dataset, self.collate, self.loader = None, default_collate, None
        if self.tensors is None:
            if _map_style(data):
                self.dataset = data
            elif isinstance(data, DataLoader) and world > 1 and _map_style(data.dataset) and data.batch_size:
                self.dataset, self.collate, batch_size = data.dataset, data.collate_fn, data.batch_size
            elif isinstance(data, DataLoader):
                self.loader = data
            else:
                raise TypeError(f"data must be a (inputs, targets) tuple of tensors, a Dataset or a DataLoader; "
                                f"got {type(data).__name__}")
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self._it, self._pos = None, 0

    def __len__(self) -> int:
        if self.tensors is not None:
            return len(self.tensors[0])
        if self.dataset is not None:
            return len(self.dataset)
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

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        if self.loader is not None:
            return self._from_loader(self.world * step + self.rank)
        idx = self.indices(step)
        if self.tensors is not None:
            return tuple(t[idx] for t in self.tensors)
        return tuple(self.collate([self.dataset[int(i)] for i in idx]))

    def _from_loader(self, step: int):
        if self._it is None or step < self._pos:
            self._it, self._pos = iter(self.loader), 0
        while True:
            try:
                item = next(self._it)
            except StopIteration:
                self._it = iter(self.loader)
                item = next(self._it)
            self._pos += 1
            if self._pos > step:
                return tuple(item)

    def all(self) -> tuple[torch.Tensor, ...]:
        if self.tensors is not None:
            return self.tensors
        if self.dataset is not None:
            return tuple(self.collate([self.dataset[i] for i in range(len(self.dataset))]))
        parts = list(zip(*[tuple(b) for b in self.loader]))
        return tuple(torch.cat(p) for p in parts)


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

