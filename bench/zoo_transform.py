"""Zoo transform sweep: ``fxadapt.transform`` (data-free) on every pytorchcv model of
``../shared/zoo/pytorchcv.tsv`` at several budgets, each result checked independently
(``tests/transform_harness.py``): transform ok or error type + first line; output structure/shapes equal the
original's; MACs counted with ``FlopCounterMode`` within 1% of budget x original MACs on the right side;
the caller's model untouched; ONNX export + onnxsim + checker + onnxruntime match (at ``--onnx-budgets``).

    python bench/zoo_transform.py                                  # whole zoo, budgets 0.25 .. 2.0
    python bench/zoo_transform.py --models resnet18,mobilenetv2_w1 --budgets 0.5,1.5
    python bench/zoo_transform.py --onnx-budgets all --threads 2   # ONNX at every budget
    python bench/zoo_transform.py --summary                        # re-print the summary of the last run
    nohup python bench/zoo_transform.py --resume [--retry-failed] > bench/.cache/zoo_transform.log 2>&1 &

Each model runs in its own spawned process (memory is returned after every model; a crash or hang is a
recorded failure, not the end of the sweep). A model whose build + first capture+analysis takes longer
than ``--timeout-per-model`` seconds is skipped (recorded as ``Timeout``); each later budget gets
``--timeout-per-budget`` seconds. Rows are appended to ``bench/.cache/zoo_transform.jsonl`` as they come
(``--resume`` skips models already there); the end writes ``zoo_transform.json`` (rows + summary) and
``zoo_transform.tsv`` and prints per-budget pass rates, the worst relative budget error, failures grouped
by reason and the ONNX pass rate.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
CACHE = ROOT / "bench" / ".cache"
BUDGETS = (0.25, 0.5, 0.75, 1.5, 2.0)


# ------------------------------------------------------------------------------------------------
# Worker (one spawned process per model)
# ------------------------------------------------------------------------------------------------
def _worker(entry, budgets, onnx_budgets, threads, conn) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import torch
    import transform_harness as th
    import zoo_harness as zh

    torch.set_num_threads(threads)
    model, x = zh.build(entry)
    macs = zh.reference_macs(model, x)
    with torch.no_grad():
        shapes = th._shapes(model(x))
    conn.send(("built", macs))
    first = [True]

    def progress(step: str) -> None:
        if first[0] and step != "capture + analyze":
            first[0] = False
            conn.send(("analyzed", None))

    for b in budgets:
        r = th.check_transform(model, x, b, onnx=b in onnx_budgets, name=entry.factory, macs_before=macs,
                               ref_shapes=shapes, progress=progress)
        first[0] = False
        conn.send(("row", r.row()))
        gc.collect()
    conn.send(("done", None))


def _timeout_row(name: str, budget: float, what: str) -> dict:
    return {"model": name, "budget": budget, "transformed": False, "ok": False, "error": what,
            "onnx": "", "rel_err": 0.0, "budget_ok": False, "shapes_ok": False, "untouched": True}


def run_model(entry, budgets, onnx_budgets, args) -> list[dict]:
    """Run one model's budgets in a spawned process; rows for budgets it never reached say why."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_worker, args=(entry, budgets, onnx_budgets, args.threads, send), daemon=True)
    p.start()
    send.close()
    rows: list[dict] = []
    phase, limit, t0 = "build", args.timeout_per_model, time.perf_counter()
    reason = ""
    while True:
        try:
            ready = recv.poll(2.0)
            kind, payload = recv.recv() if ready else (None, None)
        except EOFError:
            ready = False
        if not ready:
            if not p.is_alive():
                reason = f"WorkerCrash: process exited with code {p.exitcode} during {phase}"
                break
            if time.perf_counter() - t0 > limit:
                reason = f"Timeout: {phase} took over {limit:.0f} s"
                break
            continue
        if kind == "done":
            break
        if kind == "row":
            rows.append(payload)
            print(_line(payload), flush=True)
        # the first deadline covers build + the first capture+analysis; later ones each remaining budget
        phase = "capture+analysis" if kind == "built" else "transform"
        limit = args.timeout_per_model if kind == "built" else args.timeout_per_budget
        t0 = time.perf_counter()
    if p.is_alive():
        p.kill()
    p.join(5)
    recv.close()
    done = {r["budget"] for r in rows}
    for b in budgets:
        if b not in done:
            rows.append(_timeout_row(entry.factory, b, reason))
            print(_line(rows[-1]), flush=True)
    return rows


def _line(r: dict) -> str:
    state = "ok  " if r["ok"] else "FAIL"
    onnx = f" onnx={r['onnx'][:40]}" if r.get("onnx") else ""
    return (f"{r['model']:26} {r['budget']:5.2f} {state} rel_err={r.get('rel_err', 0):+.5f} "
            f"t={r.get('seconds', 0):6.1f}s{onnx} {r['error'][:150]}")


# ------------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------------
def reason_class(error: str) -> str:
    """A failure reason with numbers and quoted/node names blurred, so identical causes group together."""
    s = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", error)
    s = re.sub(r"\d[\d,]*(\.\d+)?(e[+-]?\d+)?", "N", s)
    s = re.sub(r"\b[\w.]*N[\w.]*\b", lambda m: "N" if re.search(r"\d|_N|N_", m.group()) else m.group(), s)
    return s[:120]


def summarize(rows: list[dict]) -> dict:
    by_budget: dict[float, list[dict]] = defaultdict(list)
    for r in rows:
        by_budget[r["budget"]].append(r)
    rates = {str(b): {"ok": sum(r["ok"] for r in rs), "total": len(rs),
                      "transformed": sum(r["transformed"] for r in rs)}
                      for b, rs in sorted(by_budget.items())}
    measured = [r for r in rows if r["transformed"] and r.get("macs_after")]
    worst = max(measured, key=lambda r: abs(r["rel_err"]), default=None)
    wrong_side = [f"{r['model']}@{r['budget']}" for r in measured if not r["budget_ok"]]
    failures: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if not r["ok"]:
            err = r["error"] or f"onnx: {r['onnx']}"
            failures[reason_class(err)].append(f"{r['model']}@{r['budget']}")
    tried = [r for r in rows if r.get("onnx")]
    return {"rates": rates, "models": len({r["model"] for r in rows}),
            "worst_rel_err": None if worst is None else
            {"model": worst["model"], "budget": worst["budget"], "rel_err": worst["rel_err"]},
            "max_abs_rel_err_shrink": max((abs(r["rel_err"]) for r in measured if r["budget"] < 1),
                                          default=0),
            "max_abs_rel_err_grow": max((abs(r["rel_err"]) for r in measured if r["budget"] > 1), default=0),
            "outside_window": wrong_side,
            "onnx": {"ok": sum(r["onnx"] == "ok" for r in tried), "tried": len(tried)},
            "failures": dict(sorted(failures.items(), key=lambda kv: -len(kv[1])))}


def print_summary(s: dict) -> None:
    print(f"\n== {s['models']} models ==")
    for b, v in s["rates"].items():
        print(f"budget {b:>5}: {v['ok']}/{v['total']} pass ({100 * v['ok'] / max(v['total'], 1):.1f}%), "
              f"{v['transformed']} transformed")
    if s["worst_rel_err"]:
        w = s["worst_rel_err"]
        print(f"worst relative budget error: {w['rel_err']:+.5f} ({w['model']} @ {w['budget']}); "
              f"max |err| shrink {s['max_abs_rel_err_shrink']:.5f}, grow {s['max_abs_rel_err_grow']:.5f}; "
              f"outside the 1% window / wrong side: {s['outside_window'] or 'none'}")
    o = s["onnx"]
    print(f"ONNX export + onnxruntime match: {o['ok']}/{o['tried']}")
    print("failures by reason:")
    for reason, where in s["failures"].items():
        print(f"  [{len(where)}] {reason}\n        "
              f"{', '.join(where[:12])}{' ...' if len(where) > 12 else ''}")


def write_outputs(rows: list[dict], s: dict, stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps({"summary": s, "rows": rows}, indent=1))
    cols = ["model", "budget", "ok", "transformed", "shapes_ok", "budget_ok", "untouched", "rel_err",
            "macs_before", "macs_after", "onnx", "onnx_diff", "seconds", "onnx_seconds", "error"]
    lines = ["\t".join(cols)] + ["\t".join(str(r.get(c, "")) for c in cols) for r in rows]
    stem.with_suffix(".tsv").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(v) for v in s.split(",") if v.strip())


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="", help="comma-separated factories (default: the whole zoo list)")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    p.add_argument("--onnx-budgets", default="0.5", help="budgets exported to ONNX: list, 'all' or 'none'")
    p.add_argument("--timeout-per-model", type=float, default=900.0,
                   help="seconds for build + first capture+analysis; a slower model is skipped")
    p.add_argument("--timeout-per-budget", type=float, default=1800.0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in the workers")
    p.add_argument("--out", default=str(CACHE / "zoo_transform"), help="output stem (.jsonl/.json/.tsv)")
    p.add_argument("--resume", action="store_true", help="skip models already in the .jsonl")
    p.add_argument("--retry-failed", action="store_true",
                   help="with --resume: rerun models with a failed row")
    p.add_argument("--summary", action="store_true", help="only summarize the existing .jsonl")
    return p.parse_args(argv)


def _load(jsonl: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()] if jsonl.exists() \
            else []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import zoo_harness as zh

    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    jsonl = stem.with_suffix(".jsonl")
    budgets = _floats(args.budgets)
    onnx = {"all": budgets, "none": ()}.get(args.onnx_budgets) or _floats(args.onnx_budgets)
    if not args.summary:
        wanted = set(filter(None, args.models.split(",")))
        entries = [e for e in zh.zoo_entries() if not wanted or e.factory in wanted]
        if not args.resume:
            jsonl.write_text("")
        old = _load(jsonl)
        if args.retry_failed:
            failed = {r["model"] for r in old if not r["ok"] and (not wanted or r["model"] in wanted)}
            old = [r for r in old if r["model"] not in failed]
            jsonl.write_text("".join(json.dumps(r) + "\n" for r in old))
        done = {r["model"] for r in old}
        for i, e in enumerate(entries):
            if e.factory in done:
                continue
            print(f"# [{i + 1}/{len(entries)}] {e.factory} {'x'.join(map(str, e.shape))}", flush=True)
            rows = run_model(e, budgets, onnx, args)
            with jsonl.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    rows = _load(jsonl)
    s = summarize(rows)
    print_summary(s)
    write_outputs(rows, s, stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
