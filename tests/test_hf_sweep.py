"""The Hugging Face family sweep (``bench/sweep_hf.py``) as a test: every family of ``bench/hf_families.py``
at MACs budgets 0.5 and 1.5 is adapted or refused with a reason — never crashes (an exception that is no
``FxAdaptError``, an ``FxAdaptError`` reporting fxadapt's own failure, or a mutated input model). MACs are
counted by FlopCounterMode in the sweep (not taken from the report); an adapted model is within 1% of the
budget or says how far it is (``BudgetWarning``), and ``generate`` runs on every adapted causal / seq2seq
model returned in its own class.

The families new in issue 27's second round (``bench/hf_families_new.py``, none of them named in fxadapt's
rules) are held to what a user meeting a family for the first time needs: every case adapts (as the user's
class, or as a graph that says why with a ``WriteBackWarning`` or ``BudgetWarning``) or is refused with an
``FxAdaptError`` whose message is one line; never a crash, a ``ShapeCheckError`` or a silent budget miss.

Slow (about 3 minutes for the earlier families, as much again for the new ones):
``pytest -m slow tests/test_hf_sweep.py``.
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
from hf_families_new import NEW_FAMILIES  # noqa: E402

BUDGETS = (0.5, 1.5)
# Gated delta-net families whose eager forward (solve_triangular, per-chunk bmm) FlopCounterMode counts apart
# from the captured graph the budget is planned on and the report counts (they agree exactly there): the
# independent eager count may differ from the report by up to 2% (measured: 1.518 vs 1.514x, 1.517 vs
# 1.513x, 0.4936 vs 0.4950x), while the report stays in the 1% window. Held to that, not waved through.
COUNT_GAP = {"qwen3_next": 0.02, "qwen3_5_text": 0.02, "olmo_hybrid": 0.02}


def _in_window(family: str, r: dict) -> bool:
    gap = COUNT_GAP.get(family)
    return r["in_window"] or bool(r["budget_warning"]) or (
        gap is not None and abs(r["ratio"] - r["report_ratio"]) <= gap * r["ratio"]
        and abs(r["report_ratio"] / r["budget"] - 1) <= 0.01)
KINDS = ("decoder", "encoder", "encoder-decoder", "vision", "audio", "moe", "state-space")


def test_the_sweep_covers_forty_families_of_every_kind():
    assert len(FAMILIES) >= 40
    assert {f.kind for f in FAMILIES.values()} == set(KINDS)


def test_the_new_families_are_new_and_of_every_kind_but_encoders():
    assert len(NEW_FAMILIES) >= 70 and not set(NEW_FAMILIES) & set(FAMILIES)
    assert {f.kind for f in NEW_FAMILIES.values()} == set(KINDS) - {"encoder"}


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
        tol = COUNT_GAP.get(family, 1e-3)
        assert abs(r["ratio"] - r["report_ratio"]) <= tol * r["ratio"] or "eagerly" in r["budget_warning"], \
            f"{where}: report disagrees with the count"   # or a BudgetWarning gives the eager model's count
        assert _in_window(family, r), f"{where}: {r['ratio']:.3f} without a BudgetWarning"
        if r["returned"] == "module" and FAMILIES[family].gen is not None:
            assert r["generate"].startswith("ok"), f"{where}: generate {r['generate']}"
            assert r["budget"] < 1 \
                    or r["generate"] == "ok (= original)", f"{where}: growth changed the tokens"
        if r["returned"] != "module":
            assert r["writeback_warning"], f"{where}: a graph came back without a WriteBackWarning"


@pytest.mark.slow
@pytest.mark.parametrize("family", list(NEW_FAMILIES))
def test_new_family_adapts_or_refuses_in_one_line(family):
    rows = sweep_hf.sweep_family(family, BUDGETS, limit=120)
    assert [r["budget"] for r in rows] == list(BUDGETS)
    for r in rows:
        where = f"{family} at {r['budget']}"
        # a ShapeCheckError or an error wrapping an unexpected exception is a crash in the sweep
        assert r["status"] in ("adapted", "refused"), \
            f"{where}: {r['status']}: {r.get('error', '')} {r.get('reason')}"
        if r["status"] == "refused":
            assert r["error"] not in ("FxAdaptError", "ShapeCheckError"), f"{where}: {r['error']}"
            assert r["one_line"] and len(r["reason"]) > 20, f"{where}: refusal not one line with a reason"
            continue
        assert r["returned"] == "module" or r["writeback_warning"] or r["budget_warning"], \
            f"{where}: a {r['returned']} came back without a WriteBackWarning or BudgetWarning"
        assert _in_window(family, r), f"{where}: {r['ratio']:.3f} without a BudgetWarning"
