"""Per-layer latency lookup table: measured seconds of one layer alone on a target, cached on disk.

An entry's key is the concrete layer key of ``fxadapt.ops.latency_keys`` (what the registry's
``latency_key`` gives, evaluated at some widths). It is measured by building that single layer
(``fxadapt.hw.layers``) and timing it on the target:
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
from tqdm.auto import tqdm

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

    def __init__(self, target: Target | None = None, timer: Callable | None = None,
                 path: str | Path | None = None, progress: bool = True, runs: int = 15,
                 budget_s: float = 0.25):
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
