"""Safetensors files read and written one tensor at a time (no mmap, no whole state dict in memory).

A file is ``len(header)`` (8 bytes, little endian), the JSON header ``{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}`` padded with spaces to a multiple of 8, then the tensors'
bytes; a checkpoint is one ``model.safetensors`` or several shards named in ``model.safetensors.index.json``
(``{"metadata": {...}, "weight_map": {name: file}}``), as ``save_pretrained`` writes them. Reading a tensor is
one ``readinto`` of its byte range into a new tensor: the pages read stay in the page cache, not in the
process, so reading a 13 GB checkpoint tensor by tensor keeps one tensor resident.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fxadapt.errors import InputError, LoadError

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies in a safetensors file (``start``/``end``: byte offsets of its data)."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


class Checkpoint:
    """The tensors of a (sharded) safetensors checkpoint, read one at a time with plain file reads (no
    mmap: the pages read stay in the page cache, not in the process).

    >>> import tempfile, safetensors.torch
    >>> d = tempfile.mkdtemp()
    >>> safetensors.torch.save_file({"w": torch.arange(6.0).reshape(2, 3)}, d + "/model.safetensors")
    >>> Checkpoint(d).read("w").tolist()
    [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    """

    def __init__(self, path: str):
        index = os.path.join(path, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise LoadError(f"{path} holds no model.safetensors nor {INDEX}: save it with "
                            f"save_pretrained(safe_serialization=True)")
        self.entries: dict[str, Entry] = {}
        self._buffer = torch.empty(0, dtype=torch.uint8)
        for name in files:
            self.entries.update(_header(os.path.join(path, name)))

    def read(self, key: str, reuse: bool = False) -> torch.Tensor:
        """The tensor ``key`` (a new tensor; ``reuse=True``: a view of one buffer kept for every such read,
        valid until the next one: no fresh pages to fault in per tensor)."""
        e = self.entries[key]
        if reuse:
            if self._buffer.numel() < e.end - e.start:
                self._buffer = torch.empty(max(e.end - e.start for e in self.entries.values()),
                                           dtype=torch.uint8)
            out = self._buffer[:e.end - e.start].view(e.dtype).view(e.shape)
        else:
            out = torch.empty(e.shape, dtype=e.dtype)
        with open(e.file, "rb") as f:
            f.seek(e.start)
            f.readinto(out.view(-1).view(torch.uint8).numpy().data)
        return out

    def nbytes(self) -> int:
        return sum(e.end - e.start for e in self.entries.values())


def _header(file: str) -> dict[str, Entry]:
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        head = json.loads(f.read(n))
    head.pop("__metadata__", None)
    return {k: Entry(file, DTYPES[v["dtype"]], tuple(v["shape"]), 8 + n + v["data_offsets"][0],
                     8 + n + v["data_offsets"][1]) for k, v in head.items()}


def shard_bytes(size: int | str) -> int:
    """``save_pretrained``'s ``max_shard_size`` in bytes (decimal units, as transformers reads them).

    >>> shard_bytes("50KB"), shard_bytes("5GB"), shard_bytes("1GiB"), shard_bytes(1000)
    (50000, 5000000000, 1073741824, 1000)
    """
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?)b\s*", size, re.IGNORECASE)
    if m is None:
        raise InputError(f"cannot read max_shard_size {size!r}: use bytes or a size like '5GB'")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def shards(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Keys in order, cut greedily into shards of at most ``limit`` bytes (a bigger tensor alone).

    >>> shards({"a": 3, "b": 3, "c": 5}, 6)
    [['a', 'b'], ['c']]
    """
    out: list[list[str]] = [[]]
    used = 0
    for k, n in sizes.items():
        if out[-1] and used + n > limit:
            out.append([])
            used = 0
        out[-1].append(k)
        used += n
    return out


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return numel(shape) * torch.empty((), dtype=dtype).element_size()


def write_shard(path: str, keys: list[str], shapes: dict, tensor: Callable[[str], torch.Tensor]) -> None:
    """A safetensors file written tensor by tensor: the header first (the shapes are known), then each
    tensor's bytes as it comes."""
    head: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    at = 0
    for k in keys:
        dtype, shape = shapes[k]
        n = nbytes(dtype, shape)
        head[k] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for k in keys:
            t = tensor(k).contiguous()
            f.write(t.view(-1).view(torch.uint8).numpy().data)
            del t
