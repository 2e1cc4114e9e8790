"""A simulated target: a seeded synthetic processor whose timings are a non-linear function of the shapes of
the ATen ops a model runs, plus measurement noise. It is an independent reference for the latency solver
(its lookup table, predictor and repair loop only ever see timings, never this formula), and a way to
exercise latency budgets on a machine whose own timings are too noisy to test against.

Every ATen op a run dispatches (recorded under a ``TorchDispatchMode`` at the example inputs) costs, in
seconds, with ``P = 2e10`` MAC/s and ``rng = numpy.random.default_rng(seed)`` drawing the constants once:

- convolution: ``t = MACs / (P e_k) * a(C_in / groups) * a(C_out) * w + o_conv``, with ``e_k`` a seeded
  efficiency per (kernel size, depthwise) in ``[0.5, 1.5]``, the block penalty
  ``a(c) = 1 + (B - c mod B) / B`` when ``c`` is not a multiple of the block ``B`` (8 or 16, seeded), and
  ``w = 1.3`` once the weights exceed 64 KiB (a cache step);
- matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``, CPU attention): ``t = MACs / (P e_mm) *
  a(K) a(N) + o_mm``;
- everything else: ``t = q * numel(out)**0.9 + o_op`` (memory-bound, sub-linear);
- a model run adds ``o_run``; every timed call is multiplied by ``1 + noise * z``, ``z ~ N(0, 1)`` from the
  target's own generator.

Timings advance a virtual clock (``SimulatedTarget.clock``) instead of taking time, so the solver's
interleaved medians, the lookup table (``Target.layer``: the layer alone, no ``o_run``) and the predictor
work unchanged. ``align()`` is the block ``B``.

>>> import torch
>>> t = SimulatedTarget(seed=1)
>>> run = t.compile(torch.nn.Conv2d(16, 32, 3), (torch.randn(1, 16, 12, 12),))
>>> t0 = t.clock(); _ = run(); dt = t.clock() - t0
>>> dt > 0, t.name()
(True, 'sim1-cpu')
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fxadapt.hw.layers import layer_module
from fxadapt.hw.lut import LUT
from fxadapt.hw.target import Target
from fxadapt.ir.inputs import Inputs

aten = torch.ops.aten
PEAK = 2e10
_MM = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
_FREE = {aten.view.default, aten._unsafe_view.default, aten.t.default, aten.transpose.int,
         aten.permute.default, aten.expand.default, aten.detach.default, aten.alias.default,
         aten.unsqueeze.default, aten.squeeze.dim, aten.slice.Tensor, aten.select.int, aten.split.Tensor,
         aten.lift_fresh.default}


@dataclass(frozen=True)
class _Consts:
    block: int
    eff: dict
    e_mm: float
    q: float
    o_op: float
    o_conv: float
    o_mm: float
    o_run: float

    @classmethod
    def draw(cls, seed: int) -> _Consts:
        r = np.random.default_rng(seed)
        eff = {(k, dw): float(r.uniform(0.5, 1.5)) for k in (1, 3, 5, 7) for dw in (False, True)}
        return cls(int(r.choice([8, 16])), eff, float(r.uniform(0.6, 1.2)), float(r.uniform(2e-10, 6e-10)),
                   float(r.uniform(0.5e-6, 2e-6)), float(r.uniform(2e-6, 6e-6)), float(r.uniform(1e-6, 4e-6)),
                   float(r.uniform(1e-5, 4e-5)))

    def pad(self, c: int) -> float:
        return 1.0 if c % self.block == 0 else 1.0 + (self.block - c % self.block) / self.block

    def conv(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, transposed: bool,
             groups: int) -> float:
        k = w.shape[2:]
        macs = (x.numel() if transposed else out.numel()) * w.shape[1] * math.prod(k)
        cin, cout = (x.shape[1] // groups, out.shape[1]) if not transposed \
                else (x.shape[1], w.shape[1] * groups)
        e = self.eff.get((max(k) if len(k) else 1, groups > 1 and groups == x.shape[1]), 1.0)
        cache = 1.3 if w.numel() * w.element_size() > 65536 else 1.0
        return macs / (PEAK * e) * self.pad(cin) * self.pad(cout) * cache + self.o_conv

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> float:
        m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
        batch = math.prod(a.shape[:-2])
        return batch * m * k * n / (PEAK * self.e_mm) * self.pad(k) * self.pad(n) + self.o_mm

    def other(self, out) -> float:
        numel = sum(t.numel() for t in out) if isinstance(out, (tuple, list)) \
                else getattr(out, "numel", lambda: 0)()
        return self.q * numel ** 0.9 + self.o_op


class _Recorder(TorchDispatchMode):
    def __init__(self, c: _Consts):
        super().__init__()
        self.c, self.total = c, 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is aten.convolution.default:
            self.total += self.c.conv(args[0], args[1], out, bool(args[6]), int(args[8]))
        elif func in _MM:
            a, b = (args[1], args[2]) if func in (aten.addmm.default, aten.baddbmm.default) else args[:2]
            self.total += self.c.matmul(a, b)
        elif func.overloadpacket is aten._scaled_dot_product_flash_attention_for_cpu:
            q, k = args[0], args[1]
            self.total += 2 * self.c.matmul(q, k.transpose(-1, -2))
        elif func not in _FREE:
            self.total += self.c.other(out)
        return out


def simulated_seconds(model: torch.nn.Module, inputs: Inputs, consts: _Consts) -> float:
    """Noise-free simulated seconds of one run of ``model`` on ``inputs`` (an ``Inputs``), ``o_run`` left
    out."""
    rec = _Recorder(consts)
    with torch.no_grad(), rec:
        inputs.call(model)
    return rec.total


@dataclass(frozen=True)
class SimulatedTarget(Target):
    """A seeded synthetic target (module docstring): ``Budget(latency=0.5,
    target=SimulatedTarget(seed=3))``."""

    seed: int = 0
    noise: float = 0.02
    _state: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self):
        super().__post_init__()
        self._state.update(now=0.0, rng=np.random.default_rng(self.seed + 7919), c=_Consts.draw(self.seed))

    @property
    def clock(self):
        return lambda: self._state["now"]

    def align(self) -> int:
        return self._state["c"].block

    def name(self) -> str:
        return f"sim{self.seed}-cpu" + (f"-b{self.batch}" if self.batch else "")

    def hardware(self) -> str:
        return f"simulated processor (seed {self.seed}, noise {self.noise})"

    def _runner(self, seconds: float):
        def run():
            z = float(self._state["rng"].standard_normal())
            self._state["now"] += max(seconds * (1 + self.noise * z), 0.0)
        return run

    def compile(self, model: torch.nn.Module, example_inputs: Any):
        """Simulated once at the example inputs; every call advances the clock by that time, with noise."""
        return self._runner(self.seconds(model, example_inputs))

    def layer(self, key: tuple):
        mod, x = layer_module(key)
        return self._runner(simulated_seconds(mod, Inputs((x,), {}), self._state["c"]))

    def seconds(self, model: torch.nn.Module, example_inputs: Any) -> float:
        """The noise-free simulated latency of ``model`` (a test's exact reference)."""
        c = self._state["c"]
        return simulated_seconds(copy.deepcopy(model).eval(), self.inputs(example_inputs), c) + c.o_run


# ---- a deterministic layer timer (lookup-table tests) ----------------------------------------------


def step_timer(key: tuple, block: int = 8) -> float:
    """A deterministic layer time: MACs / 1e9 s, doubled when the channels are not multiples of ``block``
    (the step onnxruntime's NCHWc kernels show), plus 2 us.

    >>> k = ("conv", 1, 16, 16, 1, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1), False, (0, 0), True, "float32")
    >>> step_timer(k) < step_timer(k[:2] + (15,) + k[3:])
    True
    """
    if key[0] == "linear":
        _, rows, fin, fout = key[:4]
        macs, chans = rows * fin * fout, (fin, fout)
    else:
        n, cin, cout, groups, spatial, kernel = key[1:7]
        stride = key[7]
        out = math.prod(max(1, s // st) for s, st in zip(spatial, stride))
        macs, chans = n * cout * (cin // groups) * math.prod(kernel) * out, (cin, cout)
    slow = 2.0 if any(c % block for c in chans) else 1.0
    return macs * slow / 1e9 + 2e-6


def fake_lut(timer: Callable = step_timer):
    """A lookup table over ``timer`` cached in a fresh temporary folder (no measurement)."""
    import tempfile
    from pathlib import Path

    return LUT(Target(), timer=timer, path=Path(tempfile.mkdtemp()) / "lut.json", progress=False)
