"""Per-layer latency lookup table: measured seconds of one layer alone on a target, cached on disk.

An entry's key is the concrete layer key of ``fxadapt.hw.keys`` (what the registry's ``latency_key`` gives,
evaluated at some widths). It is measured by building that single layer and timing it on the target:
for onnxruntime as a one-node ONNX graph (``Conv``/``ConvTranspose`` or ``Gemm``, weights as initializers)
run in a session with the target's threads; for torch as the ``nn`` module run eagerly. The time is the
median of interleaved runs (``LUT.runs``, stopping early once ``LUT.budget_s`` was spent).

The table is stored as JSON in ``cache_dir() / "lut" / <target>-<hash of hardware>.json`` (one file per
target and processor; entries from other processes are merged on save, the file replaced atomically).
``cache_dir()`` is ``$FXADAPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fxadapt``, else ``~/.cache/fxadapt``.
Entries are filled lazily: ``LUT.get(keys)`` measures only the keys it has not seen, with a tqdm bar.
A ``timer(key) -> seconds`` given to ``LUT`` replaces the measurement (tests inject one).

>>> import tempfile, os
>>> os.environ["FXADAPT_CACHE_DIR"] = tempfile.mkdtemp()
>>> calls = []
>>> lut = LUT(timer=lambda k: calls.append(k) or 1e-3, progress=False)
>>> key = ("conv", 1, 8, 16, 1, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1), False, (0, 0), True, "float32")
>>> lut.get([key, key]).tolist(), LUT(timer=lambda k: 1.0, progress=False).get([key]).tolist(), len(calls)
([0.001, 0.001], [0.001], 1)
>>> del os.environ["FXADAPT_CACHE_DIR"]
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fxadapt.hw.target import Target, median_time

ENV = "FXADAPT_CACHE_DIR"


def cache_dir() -> Path:
    """Where fxadapt caches measurements (see module docstring)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fxadapt"


def key_text(key: tuple) -> str:
    """A layer key as stable text (the JSON of its nested lists).

    >>> key_text(("linear", 4, 8, 16, True, "float32"))
    '["linear", 4, 8, 16, true, "float32"]'
    """
    return json.dumps(key)


class LUT:
    """Seconds per layer key on ``target`` (see module docstring)."""

    def __init__(self, target: Target | None = None, timer: Callable | None = None, path: str | Path | None = None,
                 progress: bool = True, runs: int = 15, budget_s: float = 0.25):
        self.target = target or Target()
        self.timer = timer
        self.progress, self.runs, self.budget_s = progress, runs, budget_s
        hw = "injected" if timer is not None else self.target.hardware()
        digest = hashlib.sha1(hw.encode()).hexdigest()[:10]
        self.path = Path(path) if path else cache_dir() / "lut" / f"{self.target.name()}-{digest}.json"
        self.table: dict[str, float] = self._load()
        self.measured = 0           # entries measured by this object
        self.measure_s = 0.0        # seconds spent measuring them

    def _load(self) -> dict[str, float]:
        try:
            return {k: float(v) for k, v in json.loads(self.path.read_text()).get("entries", {}).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**self._load(), **self.table}
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}")
        hw = "injected" if self.timer is not None else self.target.hardware()
        tmp.write_text(json.dumps({"target": self.target.name(), "hardware": hw, "entries": merged}))
        os.replace(tmp, self.path)

    def __contains__(self, key: tuple) -> bool:
        return key_text(key) in self.table

    def get(self, keys: list[tuple]) -> np.ndarray:
        """Seconds of every key (missing ones measured first)."""
        texts = [key_text(k) for k in keys]
        missing = list(dict.fromkeys(t for t in texts if t not in self.table))
        if missing:
            self._fill(missing)
        return np.array([self.table[t] for t in texts], dtype=float)

    def _fill(self, missing: list[str]) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(missing, desc=f"latency table ({self.target.name()})", unit="layer",
                   disable=not self.progress, leave=False)
        start = time.perf_counter()
        for text in bar:
            key = _untext(json.loads(text))
            self.table[text] = float(self.timer(key) if self.timer is not None else self.measure(key))
            self.measured += 1
        self.measure_s += time.perf_counter() - start
        self.save()

    def measure(self, key: tuple) -> float:
        """Time one layer alone on the target (see module docstring)."""
        return median_time(self.target.layer(key), self.runs, 2, self.budget_s, self.target.clock)


def _untext(v):
    return tuple(_untext(i) for i in v) if isinstance(v, list) else v


def _conv_parts(key: tuple):
    (_, n, cin, cout, groups, spatial, kernel, stride, padding, dilation, transposed, opad, bias, dtype) = key
    nd = len(kernel)
    if padding and isinstance(padding[0], str):  # "same" / "valid"
        padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel)) if padding[0] == "same" else (0,) * nd
    return n, cin, cout, groups, spatial, kernel, stride, padding, dilation, transposed, opad, bias, dtype


def layer_onnx(key: tuple):
    """A one-node ONNX model of the layer ``key`` and an input feed for it.

    >>> proto, feed = layer_onnx(("linear", 3, 8, 5, True, "float32"))
    >>> [n.op_type for n in proto.graph.node], feed["x"].shape
    (['Gemm'], (3, 8))
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    np_dt = np.float16 if key[-1] == "float16" else np.float32
    onnx_dt = TensorProto.FLOAT16 if key[-1] == "float16" else TensorProto.FLOAT
    inits = []
    if key[0] == "linear":
        _, rows, fin, fout, bias, _ = key
        x = rng.standard_normal((rows, fin)).astype(np_dt)
        inits.append(numpy_helper.from_array(rng.standard_normal((fout, fin)).astype(np_dt) * 0.1, "w"))
        ins = ["x", "w"]
        if bias:
            inits.append(numpy_helper.from_array(np.zeros(fout, np_dt), "b"))
            ins.append("b")
        node = helper.make_node("Gemm", ins, ["y"], transB=1)
        out_shape = [rows, fout]
    else:
        n, cin, cout, groups, spatial, kernel, stride, pad, dil, transposed, opad, bias, _ = _conv_parts(key)
        x = rng.standard_normal((n, cin, *spatial)).astype(np_dt)
        wshape = (cin, cout // groups, *kernel) if transposed else (cout, cin // groups, *kernel)
        inits.append(numpy_helper.from_array(rng.standard_normal(wshape).astype(np_dt) * 0.1, "w"))
        ins = ["x", "w"]
        if bias:
            inits.append(numpy_helper.from_array(np.zeros(cout, np_dt), "b"))
            ins.append("b")
        attrs = dict(kernel_shape=list(kernel), strides=list(stride), pads=list(pad) * 2, dilations=list(dil),
                     group=int(groups))
        if transposed:
            attrs["output_padding"] = list(opad)
        node = helper.make_node("ConvTranspose" if transposed else "Conv", ins, ["y"], **attrs)
        out_shape = ["n", "c", *[f"s{i}" for i in range(len(spatial))]]
    graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("x", onnx_dt, list(x.shape))],
                              [helper.make_tensor_value_info("y", onnx_dt, out_shape)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = min(proto.ir_version, 9)
    onnx.checker.check_model(proto)
    return proto, {"x": x}


def layer_module(key: tuple) -> tuple[torch.nn.Module, torch.Tensor]:
    """The ``torch.nn`` layer of ``key`` and an input for it.

    >>> mod, x = layer_module(("linear", 3, 8, 5, True, "float32"))
    >>> tuple(mod(x).shape)
    (3, 5)
    """
    dt = torch.float16 if key[-1] == "float16" else torch.float32
    if key[0] == "linear":
        _, rows, fin, fout, bias, _ = key
        mod, x = torch.nn.Linear(fin, fout, bias=bias), torch.randn(rows, fin)
    else:
        n, cin, cout, groups, spatial, kernel, stride, pad, dil, transposed, opad, bias, _ = _conv_parts(key)
        nd = len(kernel)
        cls = getattr(torch.nn, f"ConvTranspose{nd}d" if transposed else f"Conv{nd}d")
        extra = {"output_padding": opad} if transposed else {}
        mod = cls(cin, cout, kernel, stride, pad, dilation=dil, groups=groups, bias=bias, **extra)
        x = torch.randn(n, cin, *spatial)
    return mod.to(dt), x.to(dt)
