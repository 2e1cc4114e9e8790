"""Where a model will run: ``Target(runtime, device, threads, batch)``, and how fxadapt times it there.

- ``runtime="onnxruntime"`` (default): the model (BatchNorm folded) is exported to ONNX with the TorchScript
  exporter (``export_onnx``'s dynamo path when that fails) and run in an ``InferenceSession`` with
  ``CPUExecutionProvider`` (``CUDAExecutionProvider`` for ``device="cuda"``), ``threads`` intra-op and one
  inter-op thread, sequential execution, all graph optimisations (so NCHWc layouts apply);
- ``runtime="torch"``: eager ``torch`` under ``no_grad`` with ``torch.set_num_threads(threads)``
  (CUDA: the model and inputs on the GPU, ``torch.cuda.synchronize()`` after every run).

``batch=None`` runs at the example input's batch; another batch repeats the example along axis 0.
Latencies are medians of interleaved runs (``interleaved``): every round runs every candidate once, so
load on a shared machine hits them alike; single-threaded CPU runs are timed by the thread's CPU time
(``Target.clock``), which preemption by other processes does not inflate. ``Target.align()`` is the width
alignment that suits the target (``fxadapt.hw.align.auto_align``: onnxruntime's NCHWc block on this CPU, 8 on
CUDA).

>>> t = Target()
>>> t.runtime, t.device, t.threads, t.align() in (4, 8, 16)
('onnxruntime', 'cpu', 1, True)
>>> Target(runtime="tvm")
Traceback (most recent call last):
fxadapt.errors.TargetError: unknown runtime 'tvm'; use one of: onnxruntime, torch
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fxadapt.errors import (
    TargetError,  # noqa: F401  (defined in fxadapt.errors)
)
from fxadapt.hw.align import auto_align
from fxadapt.hw.layers import layer_module, layer_onnx
from fxadapt.hw.onnx import export_onnx, prepare
from fxadapt.ir.inputs import Inputs, as_inputs

RUNTIMES = ("onnxruntime", "torch")
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Target:
    """A runtime and device to adapt for (see module docstring)."""

    runtime: str = "onnxruntime"
    device: str = "cpu"
    threads: int = 1
    batch: int | None = None

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise TargetError(f"unknown runtime {self.runtime!r}; use one of: {', '.join(RUNTIMES)}")
        if str(self.device).split(":")[0] not in DEVICES:
            raise TargetError(f"unknown device {self.device!r}; use one of: {', '.join(DEVICES)}")
        for what, v in (("threads", self.threads), ("batch", self.batch)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise TargetError(f"Target {what} must be a positive int, got {v!r}")
        if self.cuda:
            _check_cuda(self.runtime)

    @property
    def cuda(self) -> bool:
        return str(self.device).startswith("cuda")

    @property
    def clock(self) -> Callable[[], float]:
        """What a run is timed with: on CPU with one thread the calling thread's CPU time
        (``time.thread_time``: onnxruntime and torch then compute on the calling thread, and time the
        scheduler gives other processes on a shared machine is not counted), else wall time."""
        return time.thread_time if self.threads == 1 and not self.cuda else time.perf_counter

    def align(self) -> int:
        """Width alignment for this target (``auto_align`` of its device)."""
        return auto_align("cuda" if self.cuda else "cpu")

    def name(self) -> str:
        """Short label, e.g. ``onnxruntime-cpu-1t``.

        >>> Target(runtime="torch", threads=2, batch=8).name()
        'torch-cpu-2t-b8'
        """
        b = f"-b{self.batch}" if self.batch else ""
        return f"{self.runtime}-{str(self.device).replace(':', '')}-{self.threads}t{b}"

    def hardware(self) -> str:
        """The processor the timings belong to (GPU name on CUDA) and the runtime's version."""
        if self.cuda:
            chip = torch.cuda.get_device_name(torch.device(self.device))
        else:
            chip = cpu_name()
        return f"{chip} | {self.runtime} {_version(self.runtime)}"

    def inputs(self, example_inputs: Any) -> Inputs:
        """The example inputs at this target's batch (repeated along axis 0), on its device."""
        inp = as_inputs(example_inputs)
        if self.batch is not None and self.batch != inp.batch:
            b = inp.batch
            inp = inp.map(lambda t: t.repeat_interleave(-(-self.batch // b), 0)[: self.batch]
                          if t.dim() and t.shape[0] == b else t)
        return inp

    def compile(self, model: torch.nn.Module, example_inputs: Any) -> Callable[[], Any]:
        """A no-argument callable that runs ``model`` once on the example inputs on this target."""
        inp = self.inputs(example_inputs)
        if self.runtime == "torch":
            return _torch_runner(model, inp, self)
        return onnx_runner(onnx_bytes(model, inp), inp, self)

    def layer(self, key: tuple) -> Callable[[], Any]:
        """A no-argument callable that runs the single layer ``key`` (``fxadapt.ops.latency_keys``) on this
        target: a one-node ONNX graph for onnxruntime, the ``torch.nn`` module for torch
        (``fxadapt.hw.layers``)."""
        if self.runtime == "onnxruntime":
            proto, feed = layer_onnx(key)
            return onnx_runner(proto.SerializeToString(), feed, self)
        mod, x = layer_module(key)
        return _torch_runner(mod, Inputs((x,), {}), self)


def _version(runtime: str) -> str:
    if runtime == "torch":
        return torch.__version__
    import onnxruntime as ort  # deferred: optional dependency, onnxruntime targets only

    return ort.__version__


def _check_cuda(runtime: str) -> None:
    if not torch.cuda.is_available():
        raise TargetError("a CUDA target needs a GPU, and torch sees none here (torch.cuda.is_available() is "
                          "False); use Target(device='cpu')")
    if runtime == "onnxruntime":
        import onnxruntime as ort  # deferred: optional dependency, onnxruntime targets only

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise TargetError("onnxruntime here has no CUDAExecutionProvider (install onnxruntime-gpu), or "
                              "use Target(runtime='torch', device='cuda')")


@functools.cache
def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo``), with its instruction-set level.

    >>> isinstance(cpu_name(), str)
    True
    """
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    return f"{name} ({platform.machine()}, NCHWc block {auto_align('cpu')})"


def onnx_bytes(model: torch.nn.Module, inputs: Inputs) -> bytes:
    """ONNX of an eval-mode copy of ``model`` with BatchNorm folded (fxadapt graphs): the TorchScript exporter
    (fast), or ``fxadapt.export_onnx`` (dynamo, simplified, checked) when that one fails."""
    work, args, _ = prepare(model, inputs.args, fold_bn=True)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(work, tuple(args), buf, dynamo=False, kwargs=inputs.kwargs or None)
        return buf.getvalue()
    except Exception:  # noqa: BLE001 - the checked exporter is slower but handles more models
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = str(Path(d) / "m.onnx")
            export_onnx(model, (inputs.args, inputs.kwargs), path)
            return Path(path).read_bytes()


def session(model_bytes: bytes, target: Target):
    """An onnxruntime session with the target's threads (one inter-op thread, sequential execution)."""
    import onnxruntime as ort  # deferred: optional dependency, onnxruntime targets only

    so = ort.SessionOptions()
    so.intra_op_num_threads = target.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    providers = ["CUDAExecutionProvider"] if target.cuda else ["CPUExecutionProvider"]
    return ort.InferenceSession(model_bytes, so, providers=providers)


def onnx_runner(model_bytes: bytes, inputs: Inputs | dict, target: Target) -> Callable[[], Any]:
    """Run the ONNX model once per call; ``inputs`` are matched to the graph inputs in order (or a feed)."""
    sess = session(model_bytes, target)
    if isinstance(inputs, dict):
        feed = inputs
    else:
        names = [i.name for i in sess.get_inputs()]
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs.tensors())}
    return lambda: sess.run(None, feed)


def _torch_runner(model: torch.nn.Module, inputs: Inputs, target: Target) -> Callable[[], Any]:
    work = copy.deepcopy(model).eval().to(target.device)
    inp = inputs.map(lambda t: t.to(target.device))
    sync = torch.cuda.synchronize if target.cuda else (lambda: None)

    def run():
        old = torch.get_num_threads()
        torch.set_num_threads(target.threads)
        try:
            with torch.no_grad():
                out = inp.call(work)
            sync()
            return out
        finally:
            torch.set_num_threads(old)

    return run


def interleaved(fns: dict, runs: int = 20, warmup: int = 3, budget_s: float | None = None,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of every function, timed in interleaved rounds after ``warmup`` calls each;
    ``budget_s`` stops early (after at least 3 rounds) once that much time was spent timing. ``clock`` is
    the clock read around each call (``Target.clock``).

    >>> med = interleaved({"a": lambda: None, "b": lambda: sum(range(100))}, runs=5, warmup=1)
    >>> sorted(med), all(v >= 0 for v in med.values())
    (['a', 'b'], True)
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict = {k: [] for k in fns}
    spent = 0.0
    for r in range(runs):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            dt = clock() - t0
            times[k].append(dt)
            spent += dt
        if budget_s is not None and r >= 2 and spent > budget_s:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def median_time(fn: Callable[[], Any], runs: int = 20, warmup: int = 3, budget_s: float | None = None,
                clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds per call of one function (``interleaved`` with one entry)."""
    return interleaved({"x": fn}, runs, warmup, budget_s, clock)["x"]

