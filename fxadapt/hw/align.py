"""Hardware width alignment: the channel multiple that runs fast on a device (``auto_align``).

Why the numbers of ``auto_align``: onnxruntime's CPU provider rewrites convolutions to the NCHWc layout,
whose channel block is MLAS's ``NchwcBlockSize`` (``onnxruntime/core/mlas/lib/platform.cpp``): the
vector register width in floats of the kernels it selects, 16 when the CPU has AVX-512F (zmm), 8 on
every other x86-64 CPU (AVX/AVX2-FMA3 use one ymm; the SSE kernels process two xmm per block). A channel
count that is not a multiple of the block leaves a ragged last block or falls back to the plain NCHW
path. ARM NEON registers hold 4 floats (MLAS builds with NEON NCHWc kernels use a block of 16; both are
multiples of 4), so other CPUs get 4. On CUDA, half-precision tensor cores want channel counts that are
multiples of 8 (16 bytes).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

from fxadapt.errors import BudgetError

CUDA_ALIGN = 8


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _torch_capability() -> str:
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # noqa: BLE001 - an old torch without the query: fall back to the architecture
        return ""


@functools.cache
def _cpu_block() -> int:
    flags, machine = _cpu_flags(), platform.machine().lower()
    if "avx512f" in flags or "AVX512" in _torch_capability():
        return 16
    if machine in ("x86_64", "amd64", "i386", "i686") or flags & {"avx2", "avx", "sse2"}:
        return 8
    return 4


def auto_align(device: str = "cpu") -> int:
    """The channel alignment that suits ``device``: onnxruntime's NCHWc block on this CPU (16 with
    AVX-512F, 8 on other x86-64, 4 elsewhere; see the module docstring), 8 for ``"cuda"``.

    >>> auto_align("cpu") in (4, 8, 16), auto_align("cuda")
    (True, 8)
    """
    kind = str(device).split(":")[0].lower()
    if kind == "cuda":
        return CUDA_ALIGN
    if kind != "cpu":
        raise BudgetError(f"auto_align: unknown device {device!r}; use 'cpu' or 'cuda'")
    return _cpu_block()
