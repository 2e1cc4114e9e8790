"""``planning.l1`` in slices: the same per-position L1 as the one-shot sum, and bounded peak memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fxadapt.planning.l1 import l1


def _reference(w: torch.Tensor, axis: int) -> np.ndarray:
    """Mean |w| per position along ``axis`` in float64, independent of the code under test."""
    a = w.detach().double().abs().movedim(axis, 0).reshape(w.shape[axis], -1)
    return a.mean(1).numpy()


@pytest.mark.parametrize("shape", [(37, 5), (300, 7, 3), (1000, 64), (5, 4, 3, 2), (1, 9, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliced_equals_one_shot_and_reference(shape, dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    for axis in range(len(shape)):
        one = l1(w, axis)                       # small: the one-shot path
        for one_shot in (1, 7, 100):            # forced into slices of 1.. rows
            sliced = l1(w, axis, one_shot=one_shot)
            np.testing.assert_allclose(sliced, one, rtol=1e-6)
        np.testing.assert_allclose(one, _reference(w, axis), rtol=1e-5)


def test_input_not_written():
    w = torch.randn(64, 32).to(torch.bfloat16)
    before = w.clone()
    l1(w, 1, one_shot=8)
    assert torch.equal(w, before)


def _kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="Linux peak RSS")
def test_sliced_peak_is_bounded():
    """A 256 MiB bfloat16 matrix (a float32 copy would be 512 MiB) is scored with a peak well under one
    float32 copy (it was ~the whole float32 copy: each fresh slice landed past the kept sums)."""
    w = torch.zeros(32768, 4096, dtype=torch.bfloat16)
    w[::7] = 1.0
    base = _kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    got = [l1(w, 1), l1(w, 0)]
    peak_mib = (_kib("VmHWM") - base) / 1024
    assert peak_mib < 128, peak_mib
    ones = len(range(0, 32768, 7))              # by hand: every 7th row is ones, the rest zeros
    np.testing.assert_array_equal(got[0], np.full(4096, ones / 32768))
    np.testing.assert_array_equal(got[1], (np.arange(32768) % 7 == 0).astype(float))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_scratch_gives_the_same_bits(dtype):
    """One ``Scratch`` reused across weights (larger, then smaller, a transposed view) scores each weight
    bit-for-bit as a fresh float32 copy does."""
    from fxadapt.planning.l1 import Scratch

    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(s, generator=g).to(dtype) for s in [(300, 70), (37, 5), (8, 3, 5), (64, 96)]]
    ws.append(ws[-1].t())   # not contiguous: takes a copy of its own
    scratch = Scratch()
    for w in ws:
        for axis in range(w.dim()):
            np.testing.assert_array_equal(l1(w, axis, scratch=scratch), l1(w, axis))
            np.testing.assert_allclose(l1(w, axis, scratch=scratch), _reference(w, axis), rtol=1e-5)
