"""Zoo transform sweep: ``fxadapt.transform`` (data-free) on pytorchcv models at several budgets, each result
checked independently by ``transform_harness.check_transform``: outputs keep the original's structure and
shapes, MACs counted with ``FlopCounterMode`` are within 1% of budget x original MACs on the right side, the
caller's model is untouched, and (at budget 0.5) ``fxadapt.export_onnx`` succeeds and matches onnxruntime.

A model that cannot be adapted must fail with a clear fxadapt error (``FxAdaptError`` subclass), never
silently wrong: those are listed in ``KNOWN_FAILURES`` with the reason.

The default run is a smoke subset (resnet20_cifar10 and mobilenetv2_w1 at 0.5 and 1.5); ``pytest -m slow
tests/test_zoo_transform.py`` sweeps the whole zoo list x budgets (``bench/zoo_transform.py`` prints the
same checks as a report).
"""

from __future__ import annotations

import functools
import gc

import pytest
import transform_harness as th
import zoo_harness as zh

ENTRIES = {e.factory: e for e in zh.zoo_entries()} if zh.ZOO_TSV.exists() else {}
BUDGETS = (0.25, 0.5, 0.75, 1.5, 2.0)
ONNX_BUDGET = 0.5
SMOKE = (zh.ZooEntry("resnet_cifar", "resnet20_cifar10", (1, 3, 32, 32), ""),
         zh.ZooEntry("mobilenetv2", "mobilenetv2_w1", (1, 3, 224, 224), ""))

# (factory, budget or None for all budgets) -> why fxadapt refuses it; the error must be an FxAdaptError.
KNOWN_FAILURES: dict[tuple[str, float | None], str] = {
}


@functools.lru_cache(maxsize=1)
def _built(entry: zh.ZooEntry):
    pytest.importorskip("pytorchcv")
    gc.collect()
    model, x = zh.build(entry)
    return model, x, zh.reference_macs(model, x)


def _known(factory: str, budget: float) -> str | None:
    return KNOWN_FAILURES.get((factory, budget)) or KNOWN_FAILURES.get((factory, None))


def _check(entry: zh.ZooEntry, budget: float) -> None:
    model, x, macs = _built(entry)
    r = th.check_transform(model, x, budget, onnx=budget == ONNX_BUDGET, name=entry.factory, macs_before=macs)
    assert r.untouched, f"{entry.factory}@{budget}: the caller's model was mutated"
    if _known(entry.factory, budget) and not r.transformed:
        assert r.fxadapt_error, f"{entry.factory}@{budget}: not a clear fxadapt error: {r.error}"
        return
    assert r.transformed, f"{entry.factory}@{budget}: {r.error}"
    assert r.shapes_ok, f"{entry.factory}@{budget}: {r.error}"
    assert r.budget_ok, f"{entry.factory}@{budget}: {r.error}"
    assert r.onnx in ("", "ok"), f"{entry.factory}@{budget}: ONNX: {r.onnx}"


@pytest.mark.parametrize("budget", (0.5, 1.5))
@pytest.mark.parametrize("entry", SMOKE, ids=lambda e: e.factory)
def test_zoo_transform_smoke(entry, budget):
    _check(entry, budget)


@pytest.mark.slow
@pytest.mark.skipif(not ENTRIES, reason=f"zoo list not found at {zh.ZOO_TSV}")
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("factory", list(ENTRIES))
def test_zoo_transform(factory, budget):
    _check(ENTRIES[factory], budget)
