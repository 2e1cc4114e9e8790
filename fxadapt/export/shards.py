"""Safetensors files read and written one tensor at a time (no mmap, no whole state dict in memory).

A file is ``len(header)`` (8 bytes, little endian), the JSON header ``{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}`` padded with spaces to a multiple of 8, then the tensors'
bytes; a checkpoint is one ``model.safetensors`` or several shards named in ``model.safetensors.index.json``
(``{"metadata": {...}, "weight_map": {name: file}}``), as ``save_pretrained`` writes them. Reading a tensor is
one ``readinto`` of its byte range into a new tensor: the pages read stay in the page cache, not in the
process, so reading a 13 GB checkpoint tensor by tensor keeps one tensor resident.

Writing a checkpoint folder is all or nothing (``staged``): the files go into a new folder beside ``out``
that is renamed onto it once complete. That folder holds a marker naming its writer (pid, host, the
process's start time); a process killed mid-write leaves it behind, and the next write into the same
``out`` removes it when the marker names a process of this host that is gone (``stale``). The checks
before a step (``require``) compare the bytes it needs with the bytes available and refuse in one line
(``ResourceError``) that names both.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from fxadapt.errors import InputError, LoadError, ResourceError

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


def write_shard(path: str, keys: list[str], shapes: dict, tensor: Callable[[str], torch.Tensor],
                written: Callable[[str], None] | None = None) -> None:
    """A safetensors file written tensor by tensor: the header first (the shapes are known), then each
    tensor's bytes as it comes (``written(key)`` called after each)."""
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
            if written is not None:
                written(k)


def shard_names(n: int) -> list[str]:
    """The file names ``save_pretrained`` gives ``n`` safetensors shards.

    >>> shard_names(1), shard_names(2)
    (['model.safetensors'], ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'])
    """
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_shards(out: str, parts: dict[str, list[str]], shapes: dict, tensor: Callable[[str], torch.Tensor],
                 progress: bool = False) -> list[str]:
    """Every shard ``{file name: keys}`` written into folder ``out`` (``write_shard``); ``progress``: a tqdm
    bar per shard and one per decoder layer (a layer counts once its last tensor is written). The paths."""
    layer = {k: _layer(k) for keys in parts.values() for k in keys}
    last = {layer[k]: k for keys in parts.values() for k in keys if layer[k] is not None}
    shard_bar = _bar(len(parts), "write shards", "shard", progress, 0)
    layer_bar = _bar(len(last), "write layers", "layer", progress and bool(last), 1)
    try:
        for name, keys in parts.items():
            shard_bar.set_postfix_str(name, refresh=False)
            write_shard(os.path.join(out, name), keys, shapes, tensor,
                        lambda k: layer_bar.update(1) if last.get(layer[k]) == k else None)
            shard_bar.update(1)
    finally:
        layer_bar.close()
        shard_bar.close()
    return [os.path.join(out, n) for n in parts]


_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def _layer(key: str) -> int | None:
    """The decoder layer of a checkpoint key (``model.layers.3.mlp.up_proj.weight`` -> 3), else None."""
    m = _LAYER.search(key)
    return int(m.group(1)) if m else None


def _bar(total: int, desc: str, unit: str, enabled: bool, position: int) -> Any:
    from tqdm import tqdm  # deferred: loaded only when a checkpoint is written

    return tqdm(total=total, desc=desc, unit=unit, position=position, disable=not enabled)


def human(n: float) -> str:
    """A byte count in binary units.

    >>> human(512), human(3 << 20), human(5 << 30)
    ('512 B', '3.0 MiB', '5.0 GiB')
    """
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{int(n)} B"


def require(need: int, have: int | None, what: str, todo: str) -> None:
    """A one-line ``ResourceError`` when ``need`` bytes exceed the ``have`` available (None: unknown, pass);
    ``what``: "<step> ... of memory" phrase, ``todo``: what the user can do.

    >>> require(2 << 30, 1 << 30, "streaming needs {need} of memory", "free memory")
    Traceback (most recent call last):
    ...
    fxadapt.errors.ResourceError: streaming needs 2.0 GiB (2147483648 bytes) of memory; 1.0 GiB (1073741824 \
bytes) are available: free memory
    """
    if have is not None and need > have:
        step = what.replace("{need}", f"{human(need)} ({need} bytes)")
        raise ResourceError(f"{step}; {human(have)} ({have} bytes) are available: {todo}")


# The weight files ``save_pretrained`` writes: ``overwrite`` replaces these, the folder's other files stay.
WEIGHT_FILES = re.compile(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?")


def check_output(out: str, overwrite: bool = False) -> None:
    """Refuse (one line) an ``out`` that is a file, or a folder that is not empty unless ``overwrite``."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"{out} is a file: -o names the folder the checkpoint is written into")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise InputError(f"{out} exists and is not empty: choose another -o, or pass --overwrite "
                         f"(overwrite=True) to replace the checkpoint in it")


@contextlib.contextmanager
def staged(out: str, overwrite: bool = False) -> Iterator[str]:
    """A new folder beside ``out`` to write the checkpoint into; on success it becomes ``out`` (one rename;
    into a non-empty ``out`` with ``overwrite``: its weight files and the new files replaced, the rest kept),
    on any failure (an error, Ctrl-C) it is removed with the parent folders it created: no half checkpoint
    (a killed process leaves the hidden ``.NAME.partial-*`` folder, never a half ``out``; the next
    ``staged(out)`` removes it once its writer is gone: ``stale``).

    >>> import tempfile
    >>> out = os.path.join(tempfile.mkdtemp(), "a", "out")
    >>> with staged(out) as tmp:
    ...     open(os.path.join(tmp, "config.json"), "w").close()
    >>> os.listdir(out)
    ['config.json']
    >>> try:
    ...     with staged(out + "2") as tmp:
    ...         raise KeyboardInterrupt
    ... except KeyboardInterrupt:
    ...     os.listdir(os.path.dirname(out))
    ['out']
    """
    check_output(out, overwrite)
    out = os.path.abspath(out)
    made = _make_parents(os.path.dirname(out))
    for old in stale(out):
        shutil.rmtree(old, ignore_errors=True)   # left by a killed write into the same ``out``
    tmp = None
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=os.path.dirname(out))
        _mark(tmp, out)
        yield tmp
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(tmp, MARKER))   # not published into ``out``
        _publish(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(made):
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        raise


MARKER = ".fxadapt-partial.json"   # in a staged folder: {"writer": "fxadapt", "out", "pid", "host", "start"}


def _mark(tmp: str, out: str) -> None:
    """The marker naming this process as the writer of staged folder ``tmp`` (module docstring)."""
    mark = {"writer": "fxadapt", "out": os.path.basename(out), "pid": os.getpid(),
            "host": socket.gethostname(), "start": _proc(os.getpid())[1]}
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump(mark, f)


def stale(out: str) -> list[str]:
    """The staged folders of ``out`` left by a killed write: named ``.NAME.partial-XXXXXXXX`` (``mkdtemp``'s
    eight characters) beside ``out``, holding our marker for ``out``'s name, whose process is gone from this
    host (no such pid, or the pid now runs a process started at another time). A folder whose writer is alive,
    of another host, or without a readable marker is kept."""
    parent, name = os.path.split(os.path.abspath(out))
    pattern = re.compile(re.escape(f".{name}.partial-") + r"[a-z0-9_]{8}")
    found = []
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        path = os.path.join(parent, entry)
        if not pattern.fullmatch(entry) or os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, MARKER)) as f:
                mark = json.load(f)
            host = mark["host"] == socket.gethostname()
            ours = (mark["writer"] == "fxadapt" and mark["out"] == name and host
                    and isinstance(mark["pid"], int) and mark["pid"] > 0)
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if ours and not _alive(mark["pid"], mark.get("start")):
            found.append(path)
    return found


def _alive(pid: int, start: int | None) -> bool:
    """Whether process ``pid`` of this host runs: it exists, is no zombie, and where ``start`` is known it
    is the process started then (not a new one given a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True   # exists, owned by another user (PermissionError): alive
    state, now = _proc(pid)
    return state != "Z" and (start is None or now is None or now == start)


def _proc(pid: int) -> tuple[str | None, int | None]:
    """The state letter and start time (clock ticks since boot) of process ``pid`` from Linux's
    ``/proc/PID/stat`` (fields 3 and 22, after the name, which may hold spaces), else Nones."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None, None


def _make_parents(parent: str) -> list[str]:
    """The missing folders down to ``parent``, created (outermost first)."""
    missing = []
    while not os.path.isdir(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for d in reversed(missing):
        os.mkdir(d)
    return missing[::-1]


def _publish(tmp: str, out: str) -> None:
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)   # mkdtemp's folder is private; ``out`` gets the user's default mode
    if not os.path.isdir(out) or not os.listdir(out):
        os.replace(tmp, out)   # onto nothing or an empty folder: atomic
        return
    new = set(os.listdir(tmp))
    for name in os.listdir(out):
        if name not in new and WEIGHT_FILES.fullmatch(name):
            os.remove(os.path.join(out, name))   # a shard of the checkpoint replaced
    for name in new:
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
    os.rmdir(tmp)
