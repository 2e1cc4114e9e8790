"""Deterministic batches from tensors, datasets or data loaders (so a resumed search sees the same data).

``Batches(data, batch_size, seed).batch(step)`` returns the step-th batch: for tensors or datasets of
tensors, epoch ``e`` uses the permutation drawn from ``Generator(seed + e)``, so batch ``k`` is a pure
function of ``k``; a ``DataLoader`` is cycled (on resume it is replayed up to the step).

Example:
    >>> import torch
    >>> b = Batches((torch.arange(10.0), torch.arange(10)), batch_size=4, seed=0)
    >>> [len(b.batch(k)[0]) for k in range(4)]
    [4, 4, 4, 4]
    >>> torch.equal(b.batch(3)[1], Batches((torch.arange(10.0), torch.arange(10)), 4, 0).batch(3)[1])
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset


def as_tensors(data: Any) -> tuple[torch.Tensor, ...] | None:
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return tuple(data)
    if isinstance(data, TensorDataset):
        return tuple(data.tensors)
    if isinstance(data, Dataset) and not isinstance(data, DataLoader) and hasattr(data, "__len__"):
        items = [data[i] for i in range(len(data))]
        return tuple(torch.stack([torch.as_tensor(it[k]) for it in items]) for k in range(len(items[0])))
    return None


class Batches:
    def __init__(self, data: Any, batch_size: int = 64, seed: int = 0):
        self.tensors = as_tensors(data)
        if self.tensors is None and not isinstance(data, DataLoader):
            raise TypeError(f"data must be a (inputs, targets) tuple of tensors, a Dataset or a DataLoader; "
                            f"got {type(data).__name__}")
        self.loader = None if self.tensors is not None else data
        self.batch_size, self.seed = batch_size, seed
        self._it, self._pos = None, 0

    def __len__(self) -> int:
        if self.tensors is not None:
            return len(self.tensors[0])
        return len(self.loader.dataset)

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        if self.tensors is None:
            return self._from_loader(step)
        n = len(self.tensors[0])
        bs = min(self.batch_size, n)
        per_epoch = max(1, n // bs)
        epoch, k = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        idx = perm[k * bs:(k + 1) * bs]
        return tuple(t[idx] for t in self.tensors)

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
        parts = list(zip(*[tuple(b) for b in self.loader]))
        return tuple(torch.cat(p) for p in parts)
