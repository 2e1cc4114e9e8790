"""Sweep ``fxadapt.transform`` over Hugging Face families built from small configs (``bench/hf_families.py``).

For every family and MACs budget (default 0.5 and 1.5) the model is built (seeded), transformed with the
defaults and classified:

- **adapted**: a result came back; it is ``in_window`` when its MACs, counted here independently with
  ``FlopCounterMode`` (``fxadapt.analysis.count.count_macs``, attention through the math SDPA backend), lie
  within 1% of ``budget`` times the original's MACs counted the same way, and the report
  (``macs_after / macs_before``) agrees. ``returned`` says whether it is the user's class ("module") or the
  verified graph (a fallback with a ``WriteBackWarning``, whose message is kept).
- **refused**: an ``fxadapt.FxAdaptError`` that is a deliberate refusal; the first 120 characters of the
  message are kept, and ``one_line`` says whether the whole message is one line.
- **crashed**: any other exception, or an ``FxAdaptError`` that only wraps an unexpected exception of a
  pipeline step, a rewritten graph that fails to run or a result that fails its checks (``_internal``), or
  the caller's model mutated (its ``state_dict`` changed), or the independent count failing on the original.
- **skipped**: the installed transformers cannot build the family from its small config.
- **timeout**: the run took longer than ``--limit`` seconds (default 120) and was skipped.

Models with ``generate`` then run a greedy ``generate(max_new_tokens=3)`` on the adapted model; after a
function-preserving growth (budget > 1) the tokens are also compared with the original's.

    python bench/sweep_hf.py [--budgets 0.5 1.5] [--families llama bert ...] [--new] [--limit 120]

``--new`` sweeps only the families of ``bench/hf_families_new.py`` (new in issue 27's second round); their
rows are marked ``(new)`` in the table. ``--merge EARLIER.json LATER.json`` sweeps nothing and writes one
table of two sweeps (the later one's rows win per family), with the totals of the new families and the rest.

Writes ``bench/results/sweep_hf.json`` and ``bench/results/sweep_hf.md`` (the table) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_families import FAMILIES as OLD_FAMILIES  # noqa: E402
from hf_families_new import NEW_FAMILIES  # noqa: E402

import fxadapt  # noqa: E402
from fxadapt.analysis.count import count_macs  # noqa: E402
from fxadapt.ir.capture import as_called  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES = {**OLD_FAMILIES, **NEW_FAMILIES}
TOL = 0.01
# FxAdaptError classes that report fxadapt's own failure (a wrapper of an unexpected exception in a pipeline
# step, a broken rewrite, a failed check of the result): counted as crashes, not refusals
INTERNAL = {"InternalError", "UnexpectedError", "StepError", "PipelineError", "ShapeCheckError",
            "VerificationError"}
KINDS = (("ssm", ("mixer", "ssm", "x_proj", "dt_proj")),
         ("channels", ("convolution", "conv_layers", "downsample", "shortcut", "embedder", ".conv", "convs")),
         ("experts", ("expert", "moe", "router", "gate.weight")),
         ("attention", ("attn", "attention", "query", "q_proj", "qkv", "self", "k_proj", "v_proj")),
         ("mlp",
          ("mlp", "intermediate", "fc", "ffn", "feed_forward", "gate_proj", "up_proj", "wi", "dense_h_to_4h",
                  "pwconv", "ff")),
         ("hidden", ("embed", "wte", "word_embeddings", "patch", "shared", "feature_projection", "stem",
                     "encoder.", "decoder.", "lm_head", "pooler")))


class Timeout(BaseException):
    """Raised by the alarm; a BaseException so no ``except Exception`` inside the library swallows it."""


def _alarm(signum, frame):
    raise Timeout()


def _internal(e: BaseException) -> bool:
    """An FxAdaptError that reports fxadapt's own failure, not a refusal with a reason: a wrapper of an
    unexpected exception, a rewritten graph that fails to run (``ShapeCheckError``) or an adapted model that
    fails its checks (``VerificationError``)."""
    wrapper = getattr(fxadapt.errors, "InternalError", None)
    if wrapper is not None and isinstance(e, wrapper):
        return True
    return any(c.__name__ in INTERNAL for c in type(e).__mro__)


def moved(rep) -> str:
    """Which dimensions changed, from the report's groups (by the producer's name) and blocks."""
    kinds = []
    for c in rep.groups:
        if c.before == c.after:
            continue
        name = c.name.lower()
        kind = next((k for k, keys in KINDS if any(w in name for w in keys)), name.rsplit(".", 1)[-1])
        if kind not in kinds:
            kinds.append(kind)
    if rep.blocks_removed:
        kinds.append(f"-{len(rep.blocks_removed)} blocks")
    if rep.blocks_added:
        kinds.append(f"+{len(rep.blocks_added)} blocks")
    return ", ".join(kinds) or "nothing"


def _call_inputs(model, inputs):
    """The call the capture made: HF models with ``use_cache`` run without the cache; graphs as they are."""
    return inputs if isinstance(model, torch.fx.GraphModule) else as_called(model, inputs)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def _generate(model, prompt_inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**prompt_inputs, max_new_tokens=3, do_sample=False)


def adapt(fam, model, budget: float, base_macs: float) -> dict:
    """One transform, classified (see the module docstring)."""
    x = fam.example()
    before = _state(model)
    t0 = time.perf_counter()
    rec: dict = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fxadapt.transform(model, budget, x)
    except Timeout:
        raise
    except fxadapt.FxAdaptError as e:
        rec.update(status="crashed" if _internal(e) else "refused", error=type(e).__name__,
                   reason=str(e).replace("\n", " ")[:120], one_line=len(str(e).splitlines()) <= 1,
                   trace=traceback.format_exc(limit=-6))
        if isinstance(e, fxadapt.BudgetError):
            rec["frozen"] = frozen_reasons(model, x)
        return _finish(rec, t0, model, before)
    except Exception as e:  # noqa: BLE001 - the sweep records every failure
        rec.update(status="crashed", error=type(e).__name__, reason=str(e).replace("\n", " ")[:200],
                   trace=traceback.format_exc(limit=-8))
        return _finish(rec, t0, model, before)
    rep = fxadapt.report(out)
    ratio = count_macs(out, _call_inputs(out, x)) / base_macs
    wb = [str(w.message) for w in caught if issubclass(w.category, fxadapt.WriteBackWarning)]
    bw = [str(w.message) for w in caught if issubclass(w.category, fxadapt.BudgetWarning)]
    rec.update(status="adapted", returned=rep.returned, cls=type(out).__name__, ratio=ratio,
               report_ratio=rep.macs_after / rep.macs_before, moved=moved(rep),
               in_window=abs(ratio / budget - 1) <= TOL
               and abs(rep.macs_after / rep.macs_before / budget - 1) <= TOL,
               writeback_warning=wb[0][:300] if wb else "", budget_warning=bw[0][:300] if bw else "")
    if fam.gen is not None:
        rec["generate"] = _check_generate(fam, model, out, budget)
    return _finish(rec, t0, model, before)


def frozen_reasons(model, x, n: int = 3) -> list[str]:
    """Why the groups that bound the reachable range are frozen: the distinct reasons of the analysis
    ``transform`` runs (static capture, whole heads), most MACs first."""
    try:
        a = fxadapt.analyze(fxadapt.capture(model, x, dynamic="static"), attention="heads")
    except fxadapt.FxAdaptError as e:
        return [f"analyze: {e}"[:120]]
    frozen = sorted((g for g in a.groups if not g.prunable and g.reason and "model output" not in g.reason),
                    key=lambda g: -g.width)
    reasons = dict.fromkeys(f"{g.name}: {g.reason.split(': ', 1)[-1]}"[:110] for g in frozen)
    return list(reasons)[:n]


def _check_generate(fam, model, out, budget: float) -> str:
    if not hasattr(out, "generate"):
        return f"no ({type(out).__name__} has no generate)"
    try:
        got = _generate(out, fam.gen())
    except Exception as e:  # noqa: BLE001
        return f"fail: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    if budget > 1:   # function-preserving growth: the original's greedy tokens
        return "ok (= original)" if torch.equal(got, _generate(model, fam.gen())) else "ok (tokens differ)"
    return "ok"


def _finish(rec: dict, t0: float, model, before: dict) -> dict:
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    if not _same_state(before, _state(model)):
        rec.update(status="crashed", reason="the input model was mutated (state_dict changed)")
    if rec["status"] != "crashed":
        rec.pop("trace", None)      # tracebacks only where they are needed
    return rec


def sweep_family(name: str, budgets, limit: float) -> list[dict]:
    fam = FAMILIES[name]
    rows = []
    try:
        model = fam.build()
    except Exception as e:  # noqa: BLE001 - a family the installed transformers cannot build here
        return [dict(family=name, kind=fam.kind, budget=b, status="skipped",
                     reason=f"build: {type(e).__name__}: {str(e)[:100]}") for b in budgets]
    try:
        base = count_macs(model, as_called(model, fam.example()))
    except Exception as e:  # noqa: BLE001 - fxadapt's independent count fails on the original: a crash
        return [dict(family=name, kind=fam.kind, budget=b, status="crashed",
                     reason=f"count_macs(original): {type(e).__name__}: {str(e)[:100]}") for b in budgets]
    for b in budgets:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(int(limit))
        try:
            rec = adapt(fam, model, b, base)
        except Timeout:
            rec = dict(status="timeout", reason=f"skipped: over {limit:.0f} s")
        finally:
            signal.alarm(0)
        rows.append(dict(family=name, kind=fam.kind, budget=b, **rec))
    return rows


def _cell(r: dict) -> str:
    if r["status"] != "adapted":
        return r["status"]
    cell = "adapted" if r["returned"] == "module" else f"adapted ({r['returned']})"
    return f"{cell} {r['ratio']:.3f}" + ("" if r["in_window"] else " OUT")


def _why(r: dict) -> str:
    """A refusal's error and message (and what froze the groups a budget error is bounded by), a fallback's
    write-back reason, or an out-of-window result's BudgetWarning."""
    if r.get("reason"):
        frozen = f" [frozen: {' / '.join(r['frozen'])}]" if r.get("frozen") else ""
        return f"{r.get('error', '')} {r['reason']}".strip() + frozen
    if r.get("writeback_warning"):
        text = r["writeback_warning"]
        return "WriteBackWarning: " + text[text.find("(") + 1:][:160]
    if r.get("budget_warning") and not r.get("in_window"):
        return "BudgetWarning: " + r["budget_warning"][:160]
    return ""


def table(rows: list[dict], budgets) -> str:
    """The markdown table: one line per family."""
    by = {}
    for r in rows:
        by.setdefault(r["family"], {})[r["budget"]] = r
    head = ["family", "kind"] + [str(b) for b in budgets] + ["what moved", "reason when refused / fallback",
                                                           "generate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fam, cells in by.items():
        rs = [cells[b] for b in budgets if b in cells]
        moves = [(r["budget"], r["moved"]) for r in rs if r.get("moved")]
        mv = "; ".join(f"{b}: {m}" for b, m in moves) if len({m for _, m in moves}) > 1 else \
            (moves[0][1] if moves else "")
        why = "; ".join(f"{r['budget']}: {w}" for r in rs for w in [_why(r)] if w)
        gen = "; ".join(f"{r['budget']}: {r['generate']}" for r in rs if "generate" in r) or "-"
        name = f"{fam} (new)" if fam in NEW_FAMILIES else fam
        lines.append("| " + " | ".join([name, rs[0]["kind"]] + [_cell(r) for r in rs]
                                       + [mv or "-", why.replace("|", "/") or "-", gen]) + " |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    count = {s: sum(r["status"] == s for r in rows)
             for s in ("adapted", "refused", "crashed", "timeout", "skipped")}
    count["out_of_window"] = sum(r["status"] == "adapted" and not r["in_window"] for r in rows)
    count["graph_fallback"] = sum(r["status"] == "adapted" and r["returned"] != "module" for r in rows)
    count["generate_failed"] = sum(not r.get("generate", "ok").startswith("ok") for r in rows)
    count["families"] = len({r["family"] for r in rows})
    return count


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--budgets", type=float, nargs="*", default=[0.5, 1.5])
    p.add_argument("--families", nargs="*", default=list(FAMILIES))
    p.add_argument("--new", action="store_true", help="only the families of bench/hf_families_new.py")
    p.add_argument("--limit", type=float, default=120.0, help="seconds per family and budget before skipping")
    p.add_argument("--out", default=str(RESULTS / "sweep_hf"), help="path stem of the .json and .md written")
    p.add_argument("--merge", nargs=2, metavar=("EARLIER", "LATER"),
                   help="sweep nothing: write the table of two sweeps' .json (LATER's rows win per family)")
    args = p.parse_args(argv)
    if args.merge:
        return merge(*args.merge, out=Path(args.out), budgets=args.budgets)
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    t0, rows = time.perf_counter(), []
    for name in list(NEW_FAMILIES) if args.new else args.families:
        for r in sweep_family(name, args.budgets, args.limit):
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "trace"}), flush=True)
    counts = summary(rows)
    counts["seconds"] = round(time.perf_counter() - t0, 1)
    return _write(rows, args.budgets, Path(args.out), counts)


def _totals(name: str, counts: dict) -> str:
    return f"{name}{counts['families']} families: " + ", ".join(
        f"{k} {v}" for k, v in counts.items() if k != "families")


def _write(rows: list[dict], budgets, out: Path, counts: dict, lines: tuple = ()) -> dict:
    md = f"{table(rows, budgets)}\n\n" + "\n".join([_totals("", counts), *lines]) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"summary": counts, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(md)
    print(md)
    return {"summary": counts, "rows": rows}


def merge(earlier: str, later: str, out: Path, budgets) -> dict:
    """One table of two sweeps (the later one's rows replace the earlier one's for the families it swept),
    with the totals of all, of the families new in ``hf_families_new`` (marked ``(new)``) and of the rest."""
    old, new = (json.loads(Path(p).read_text())["rows"] for p in (earlier, later))
    swept = {r["family"] for r in new}
    rows = [r for r in old if r["family"] not in swept] + new
    rows.sort(key=lambda r: list(FAMILIES).index(r["family"]) if r["family"] in FAMILIES else len(FAMILIES))
    fresh = [r for r in rows if r["family"] in NEW_FAMILIES]
    rest = [r for r in rows if r["family"] not in NEW_FAMILIES]
    return _write(rows, budgets, out, summary(rows),
                  (_totals("new: ", summary(fresh)), _totals("earlier list: ", summary(rest))))


if __name__ == "__main__":
    main()
