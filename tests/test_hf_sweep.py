"""The Hugging Face family sweep (``bench/sweep_hf.py``) as a test: every family of ``bench/hf_families.py``
at MACs budgets 0.5 and 1.5 is adapted or refused with a reason — never crashes (an exception that is no
``FxAdaptError``, an ``FxAdaptError`` reporting fxadapt's own failure, or a mutated input model). MACs are
counted by FlopCounterMode in the sweep (not taken from the report); an adapted model is within 1% of the
budget or says how far it is (``BudgetWarning``), and ``generate`` runs on every adapted causal / seq2seq
model returned in its own class.

Slow (about 3 minutes for the 66 families): ``pytest -m slow tests/test_hf_sweep.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import sweep_hf  # noqa: E402
from hf_families import FAMILIES  # noqa: E402

BUDGETS = (0.5, 1.5)
KINDS = ("decoder", "encoder", "encoder-decoder", "vision", "audio", "moe", "state-space")


def test_the_sweep_covers_forty_families_of_every_kind():
    assert len(FAMILIES) >= 40
    assert {f.kind for f in FAMILIES.values()} == set(KINDS)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_adapts_or_refuses_with_a_reason(family):
    rows = sweep_hf.sweep_family(family, BUDGETS, limit=120)
    for r in rows:
        where = f"{family} at {r['budget']}"
        assert r["status"] in ("adapted", "refused"), f"{where}: {r['status']}: {r.get('reason')}"
        if r["status"] == "refused":
            assert r["error"] != "FxAdaptError" \
                    and len(r["reason"]) > 20, f"{where}: refusal without a reason"
            continue
        assert abs(r["ratio"] - r["report_ratio"]) <= 1e-3 * r["ratio"] or "eagerly" in r["budget_warning"], \
            f"{where}: report disagrees with the count"   # or a BudgetWarning gives the eager model's count
        assert r["in_window"] or r["budget_warning"], f"{where}: {r['ratio']:.3f} without a BudgetWarning"
        if r["returned"] == "module" and FAMILIES[family].gen is not None:
            assert r["generate"].startswith("ok"), f"{where}: generate {r['generate']}"
            assert r["budget"] < 1 \
                    or r["generate"] == "ok (= original)", f"{where}: growth changed the tokens"
        if r["returned"] != "module":
            assert r["writeback_warning"], f"{where}: a graph came back without a WriteBackWarning"
