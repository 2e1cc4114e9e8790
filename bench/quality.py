"""Quality protocol: fxadapt (data-free, DNA, FUR) against uniform scaling and Torch-Pruning at equal MACs,
every candidate trained with the same recipe, on two tasks, paired over seeds (issue 11, item 1).

Run (resumable: finished (task, method, budget, seed) rows are cached in bench/.cache/quality_<mode>_<task>.jsonl
and skipped; delete the file to start over):

    python bench/quality.py --quick               # 2 tasks, seeds 0-2, budgets 0.5/0.25/0.1/2.0, fewer epochs
    python bench/quality.py                       # full: seeds 0-4, budgets 0.5/0.25/0.1/1.5/2.0
    python bench/quality.py --quick --tasks shapes --seeds 0   # a slice (one process per task runs in parallel)
    python bench/quality.py --quick --report      # tables from the cache only

Protocol (tasks, base model: bench/quality_tasks.py; methods: bench/quality_methods.py):
1. Per task, the base epochs E are chosen once (seed 0) by doubling until validation accuracy gains less
   than 0.5 point (``converged_epochs``); each seed then trains its own base for E epochs (SGD 0.05, cosine).
2. Per seed and budget, every method builds its candidate from that seed's base; the candidate is trained
   with ``fxadapt.finetune`` (SGD 0.05, cosine, distillation from the base, kd 0.5, T 4) for F epochs;
   ``uniform`` and ``dna-scratch`` (re-initialised, trained from scratch) get E + F epochs, the whole
   training the others had.
   ``--quick`` also trains shapes on its first 3000 images, caps its base ladder at 32 epochs, runs DNA for
   120 steps (default 300) and FUR for 2 iterations (default 4); the full mode uses the defaults.
3. Test accuracy, mean +- std over seeds; paired difference of every method against the best baseline
   (the baseline with the highest mean at that task and budget; baselines: uniform, tp-uniform, tp-global,
   datafree), computed seed by seed on the same base; search time (transform or bisection) over the
   wall time of the candidate's own fine-tuning run. A second paired table uses only the baselines with
   inherited weights (tp-uniform, tp-global, datafree) as reference. Tables go to stdout and
   bench/.cache/quality_<mode>.md.

Result (quick, 5 seeds, README "Quality"): DNA beats every baseline that keeps its weights at every
shrinking budget on both tasks (+0.9 to +6.1 points, paired) but not the same widths trained from scratch
(-0.2 to -13.3); DNA's widths trained from scratch match or beat the uniform ones (``dna-scratch``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality_methods import BASELINES, GROW, SCRATCH, SHRINK, candidate, count_macs  # noqa: E402
from quality_tasks import CACHE, TASKS, converged_epochs, trained_base  # noqa: E402

from fxadapt.train.finetune import FinetuneConfig, accuracy, finetune  # noqa: E402

# per mode and task: fine-tune epochs, base-epoch ladder (start, cap), training-set size (None: all)
SETTINGS = {
    "full": {"digits": dict(ft=15, ladder=(20, 160), train=None),
             "shapes": dict(ft=5, ladder=(10, 40), train=None),
             "opts": {}},
    "quick": {"digits": dict(ft=8, ladder=(15, 60), train=None),
              "shapes": dict(ft=4, ladder=(8, 32), train=3000),
              "opts": {"dna_steps": 120, "fur_iterations": 2}},
}


def load_task(name: str, train: int | None) -> dict:
    data = TASKS[name]()
    if train:
        data["train"] = tuple(t[:train] for t in data["train"])
    return data


def run_row(task, method, base, data, budget, seed, st, base_epochs, opts) -> dict:
    torch.manual_seed(seed)
    model, search_s = candidate(method, base, data, budget, seed, opts)
    x = data["train"][0][:1]
    ratio = count_macs(model, x) / count_macs(base, x)
    before = accuracy(model, data["test"])
    epochs = st["ft"] + (base_epochs if method in SCRATCH else 0)
    t0 = time.perf_counter()
    finetune(model, data["train"], epochs, teacher=copy.deepcopy(base), cfg=FinetuneConfig(seed=seed))
    ft_s = time.perf_counter() - t0
    return {"task": task, "method": method, "budget": budget, "seed": seed, "acc": accuracy(model, data["test"]),
            "val_acc": accuracy(model, data["val"]), "acc_before_ft": before, "macs_ratio": ratio,
            "search_s": search_s, "finetune_s": ft_s, "train_epochs": epochs}


def cache_path(mode: str, task: str) -> str:
    return os.path.join(CACHE, f"quality_{mode}_{task}.jsonl")


def load_rows(mode: str, tasks) -> list[dict]:
    rows = []
    for task in tasks:
        if os.path.exists(cache_path(mode, task)):
            with open(cache_path(mode, task)) as f:
                rows += [json.loads(line) for line in f if line.strip()]
    unique = {(r["task"], r["method"], r["budget"], r["seed"]): r for r in rows}   # a repeated row: the last wins
    return list(unique.values())


def run_task(task: str, mode: str, seeds, budgets, methods, ft_epochs) -> None:
    st = dict(SETTINGS[mode][task])
    st["ft"] = ft_epochs or st["ft"]
    data = load_task(task, st["train"])
    epochs, ladder = converged_epochs(task, data, *st["ladder"])
    print(f"[{task}] base epochs {epochs} (ladder {ladder}); fine-tune epochs {st['ft']}", flush=True)
    path = cache_path(mode, task)
    for seed in seeds:
        base = trained_base(task, data, epochs, seed)
        todo = [("base", 1.0)] + [(m, b) for b in budgets for m in (GROW if b > 1 else SHRINK)
                                  if not methods or m in methods]
        for method, budget in todo:
            if (method, budget, seed) in {(r["method"], r["budget"], r["seed"]) for r in load_rows(mode, [task])}:
                continue        # re-read every time: another process may run other seeds of this task
            if method == "base":
                row = {"task": task, "method": "base", "budget": 1.0, "seed": seed, "base_epochs": epochs,
                       "ladder": ladder, "acc": accuracy(base, data["test"]), "val_acc": accuracy(base, data["val"])}
            else:
                row = run_row(task, method, base, data, budget, seed, st, epochs, SETTINGS[mode]["opts"])
            print(json.dumps(row), flush=True)
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")


def _ms(v: list[float], scale: float = 100.0, prec: int = 2) -> str:
    if not v:
        return "-"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{scale * statistics.mean(v):.{prec}f} ± {scale * sd:.{prec}f}"


def _acc(rows, task, method, budget) -> dict[int, float]:
    return {r["seed"]: r["acc"] for r in rows if r["task"] == task and r["method"] == method
            and (method == "base" or r["budget"] == budget)}


def _cols(rows):
    return sorted({(r["task"], r["budget"]) for r in rows if r["method"] != "base"}, key=lambda k: (k[0], -k[1]))


def accuracy_table(rows) -> str:
    cols = _cols(rows)
    out = ["| method | " + " | ".join(f"{t} {b}x" for t, b in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in ("base",) + tuple(dict.fromkeys(SHRINK + GROW)):
        cells = []
        for t, b in cols:
            a = _acc(rows, t, m, b)
            cells.append(f"{_ms(list(a.values()))} ({len(a)})" if a else "")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def paired_table(rows, baselines=BASELINES) -> str:
    """Per column: best of ``baselines`` by mean; every method's per-seed difference to it (and the base's)."""
    cols = _cols(rows)
    best = {}
    for t, b in cols:
        means = {m: statistics.mean(a.values()) for m in baselines if (a := _acc(rows, t, m, b))}
        best[(t, b)] = max(means, key=means.get) if means else None
    out = ["| method − reference | " + " | ".join(f"{t} {b}x (vs {best[(t, b)]})" for t, b in cols) + " |",
           "|---" * (len(cols) + 1) + "|"]
    for m in tuple(dict.fromkeys(SHRINK + GROW)) + ("base",):
        cells = []
        for t, b in cols:
            ref, a = _acc(rows, t, best[(t, b)], b), _acc(rows, t, m, b)
            d = [a[s] - ref[s] for s in sorted(set(a) & set(ref))]
            cells.append(f"{_ms(d)} ({len(d)})" if d and m != best[(t, b)] else ("best" if d else ""))
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _method_table(rows, title: str, methods, cell) -> str:
    """One row per method, one column per (task, budget); ``cell(rows of that cell)`` formats a cell."""
    cols = _cols(rows)
    out = [f"| {title} | " + " | ".join(f"{t} {b}x" for t, b in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in methods:
        cells = []
        for t, b in cols:
            rs = [r for r in rows if r["task"] == t and r["budget"] == b and r["method"] == m]
            cells.append(cell(rs) if rs else "")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def time_table(rows) -> str:
    return _method_table(rows, "search s / fine-tune s",
                         ("tp-uniform", "tp-global", "datafree", "fur-bernoulli", "fur", "dna-markov", "dna"),
                         lambda rs: f"{statistics.mean(r['search_s'] / r['finetune_s'] for r in rs):.2f} "
                                    f"({statistics.mean(r['search_s'] for r in rs):.0f} s / "
                                    f"{statistics.mean(r['finetune_s'] for r in rs):.0f} s)")


def macs_table(rows) -> str:
    return _method_table(rows, "MACs / base (before FT acc %)", tuple(dict.fromkeys(SHRINK + GROW)),
                         lambda rs: f"{statistics.mean(r['macs_ratio'] for r in rs):.3f} "
                                    f"({100 * statistics.mean(r['acc_before_ft'] for r in rs):.1f})")


def summary(rows) -> str:
    bases = [r for r in rows if r["method"] == "base"]
    lines = ["## Bases"]
    for t in sorted({r["task"] for r in bases}):
        b = [r for r in bases if r["task"] == t]
        lines.append(f"- {t}: {b[0]['base_epochs']} epochs (val accuracy ladder "
                     + ", ".join(f"{e} ep: {100 * a:.2f}" for e, a in b[0]["ladder"])
                     + f"); test accuracy {_ms([r['acc'] for r in b])} over {len(b)} seeds")
    return "\n\n".join(["\n".join(lines), "## Test accuracy (%), mean ± std (n seeds)", accuracy_table(rows),
                        "## Paired difference vs the best baseline (points; per seed, same base)", paired_table(rows),
                        "## Paired difference vs the best baseline with inherited weights (no training from scratch)",
                        paired_table(rows, tuple(m for m in BASELINES if m != "uniform")),
                        "## Search wall time / one fine-tuning run's wall time", time_table(rows),
                        "## Measured MACs ratio (accuracy before fine-tuning, %)", macs_table(rows)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 tasks, seeds 0-2, budgets 0.5/0.25/0.1/2.0, fewer epochs")
    p.add_argument("--seeds", default=None, help="comma list (default 0-4; --quick 0-2)")
    p.add_argument("--tasks", default="digits,shapes")
    p.add_argument("--budgets", default=None, help="default 0.5,0.25,0.1,1.5,2.0 (--quick 0.5,0.25,0.1,2.0)")
    p.add_argument("--methods", default="", help="comma list (default: all)")
    p.add_argument("--epochs", type=int, default=None, help="fine-tune epochs (default: per task and mode)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", action="store_true", help="only print the tables from the cache")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    seeds = [int(s) for s in (args.seeds or ("0,1,2" if args.quick else "0,1,2,3,4")).split(",")]
    budgets = [float(b) for b in (args.budgets or ("0.5,0.25,0.1,2.0" if args.quick else "0.5,0.25,0.1,1.5,2.0")).split(",")]
    tasks = args.tasks.split(",")
    methods = [m for m in args.methods.split(",") if m]
    if not args.report:
        for task in tasks:
            run_task(task, mode, seeds, budgets, methods, args.epochs)
    text = summary(load_rows(mode, tasks))
    os.makedirs(CACHE, exist_ok=True)
    with open(os.path.join(CACHE, f"quality_{mode}.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
