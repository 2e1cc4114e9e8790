"""Quality protocol: fxadapt (data-free, DNA, FUR) against uniform scaling and Torch-Pruning at equal MACs and
equal training, on three tasks, paired over seeds (issue 11 item 1; made fair in issue 15 item 1; the
regression task ``sr`` in issue 15 item 3).

Run (resumable: finished rows are cached in bench/.cache/quality_<mode>_<task>.jsonl, keyed by (task, method,
budget, seed, config hash); a row whose hash differs from the current one is ignored, never reused):

    python bench/quality.py --quick --tasks digits --budgets 0.5,0.25,0.1 --seeds 0,1,2,3,4
    python bench/quality.py --quick --tasks sr --budgets 0.5,0.25,0.1 --seeds 0,1,2,3,4 --threads 1
    python bench/quality.py                       # full: seeds 0-4, budgets 0.5/0.25/0.1/1.5/2.0
    python bench/quality.py --quick --report      # tables from the cache only

Protocol (tasks, base models: bench/quality_tasks.py and bench/quality_sr.py; methods:
bench/quality_methods.py; tables: bench/quality_report.py). A task declares its metric, higher is better
(``KINDS``: accuracy for digits / shapes, PSNR in dB for sr), its loss (cross-entropy; sr: L1) and, for sr,
one SGD learning rate for every weight step (base, fine-tunes, DNA's ``w_lr``, FUR's ``lr``: 0.5).
1. Splits: every task has train / val / test. Test is only reported; every choice reads val: the base
   epochs E (``converged_epochs``: doubling until the val metric gains < 0.5 point / 0.1 dB, seed 0) and
   the reference baseline of every paired difference. The searches see the training split only.
2. Equal weight-update steps. Let ``spe`` be the optimizer steps of one epoch (train size // 64). After the
   base every method gets the same ``W = (F + S) * spe`` SGD steps on its weights (batch 64), where F are
   the fine-tune epochs and S the search epochs of the mode and task: DNA searches ``S * spe`` steps (each
   one weight step), FUR ``I`` iterations of ``S * spe / I`` weight steps, and both are then fine-tuned F
   epochs; the baselines with inherited weights (Torch-Pruning, data-free) take no step while choosing
   their widths and are fine-tuned F + S epochs; ``uniform`` and ``dna-scratch`` (re-initialised) get
   E + F + S epochs, the base's steps plus W. Fine-tuning is ``fxadapt.finetune`` (SGD 0.05, cosine,
   distillation from the base, kd 0.5, T 4; sr: SGD 0.5, ``(1 - kd) L1(y) + kd L1(teacher)``). Every row
   records its search, fine-tune and total weight steps (counted from the search history and the fine-tune
   schedule) and the tables print them. ``--quick``: digits F 8 + S 8 epochs (15 steps each: W = 240), shapes
   on its first 3000 images F 4 + S 3 (46 steps each: W = 322), base ladders capped at 60 / 32 epochs, FUR 2
   iterations; full: digits F 15 + S 20, shapes F 5 + S 2, FUR 4 iterations. sr (2000 training patches, 31
   steps an epoch): quick F 6 + S 6 (W = 372), base ladder 10 / 20 / 40 epochs (capped at 40 for the runtime;
   it was still gaining: 29.69 / 29.86 / 30.25 dB, 80 epochs 30.53); full F 10 + S 10, ladder capped at 160.
3. Test metric, mean ± the 95% t-interval over seeds; paired differences per seed (same base) against
   the reference: the equal-training baseline (uniform, tp-uniform, tp-global, datafree) with the highest
   mean *val* metric in that cell, mean ± the 95% t-interval of the differences; a second table against
   the best inherited-weight baseline (also chosen on val); the "architecture only" diagnostic
   (dna-scratch − uniform, same epochs). Tables go to stdout and bench/.cache/quality_<mode>.md
   (another task than digits / shapes: quality_<mode>_<tasks>.md).
4. Cache rows carry ``config_hash`` (sha256 of every option of the method's TransformConfig, the fine-tune
   recipe, the task's constants, E, F, S and ``PROTOCOL``; a task beyond digits / shapes adds its
   ``Kind``: loss, lr, constants; the classic tasks hash exactly as before), so a changed default produces new
   rows; the last commit of the library and bench files (``commit``), ``git rev-parse HEAD`` (``head``) and a
   hash of their uncommitted diff (``dirty``) are recorded for information.

Result (quick, 5 seeds, README "Quality"): with equal weight steps DNA beats no equal-training baseline.
The uniform widths trained from scratch win all six (task, budget) cells (DNA −0.7 to −13.1 points, the
interval excluding zero in five), and against the best inherited-weight baseline DNA ties in all six. DNA's
widths trained from scratch tie with the uniform ones (``dna-scratch``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
import warnings

import torch

import fxadapt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality_tasks  # noqa: E402
from quality_methods import GROW, SCRATCH, SEARCHES, SHRINK, candidate, count_macs, method_config  # noqa: E402
from quality_report import interval, summary  # noqa: E402, F401  (interval: bench/ablation_dna.py reads it here)
from quality_tasks import CACHE, KINDS, TASKS, converged_epochs, trained_base  # noqa: E402

from fxadapt.train.finetune import FinetuneConfig, finetune  # noqa: E402

PROTOCOL = "issue15-equal-steps-v1"
BATCH = FinetuneConfig().batch_size
# per mode and task: fine-tune epochs F, search epochs S, base-epoch ladder (start, cap), training-set size
SETTINGS = {
    "full": {"digits": dict(ft=15, search=20, ladder=(20, 160), train=None),
             "shapes": dict(ft=5, search=2, ladder=(10, 40), train=None),
             "sr": dict(ft=10, search=10, ladder=(10, 160), train=None),
             "fur_iterations": 4},
    "quick": {"digits": dict(ft=8, search=8, ladder=(15, 60), train=None),
              "shapes": dict(ft=4, search=3, ladder=(8, 32), train=3000),
              "sr": dict(ft=6, search=6, ladder=(10, 40), train=None),
              "fur_iterations": 2},
    # issue 25: the users' question, a recovery budget far below the base's training (W = 30 steps on digits,
    # 1/15 of the 450-step base): bases and ladder shared with "quick"
    "recovery": {"digits": dict(ft=1, search=1, ladder=(15, 60), train=None),
                 "shapes": dict(ft=1, search=1, ladder=(8, 32), train=3000),
                 "fur_iterations": 1},
}
DEFAULT_METHODS = ("uniform", "tp-uniform", "tp-global", "datafree", "fur", "dna", "dna-scratch")
LIBRARY_FILES = ("fxadapt", "bench/quality.py", "bench/quality_methods.py", "bench/quality_tasks.py",
                 "bench/quality_sr.py", "bench/quality_report.py")


def load_task(name: str, train: int | None) -> dict:
    data = TASKS[name]()
    if train:
        data["train"] = tuple(t[:train] for t in data["train"])
    return data


def steps_per_epoch(data: dict) -> int:
    """Optimizer steps of one ``fxadapt.finetune`` epoch (its own formula)."""
    n = len(data["train"][0])
    return max(1, n // min(BATCH, n))


def search_opts(mode: str, task: str, spe: int, search_val: str) -> dict:
    """The searches' options: their length, which split their gate steps read, and a task's own loss and
    lr."""
    st, kind = SETTINGS[mode], KINDS[task]
    opts = {"search_steps": st[task]["search"] * spe, "fur_iterations": st["fur_iterations"],
            "search_val": search_val}
    return opts | ({"loss_fn": kind.loss_fn, "lr": kind.lr} if kind.loss_fn is not None else {})


# Options added after rows were cached, with the value that reproduces the behaviour before they existed: at
# that value a field is left out of the hash (adding an option does not orphan the cache; any other value,
# or a changed default, is hashed and re-runs the rows).
ADDED_OPTIONS = {("SearchConfig", "weights"): "train", ("SearchConfig", "holdout"): 0.0,
                 ("SearchConfig", "a_optimizer"): "adam",
                 ("TransformConfig", "importance"): fxadapt.ImportanceConfig(),
                 ("TransformConfig", "keep"): (), ("TransformConfig", "only"): (),
                 ("TransformConfig", "min_width"): {}, ("TransformConfig", "max_width"): {},
                 ("ImportanceConfig", "floor"): 0.0, ("ImportanceConfig", "floors"): ()}


def stable(o):
    """Plain, process-independent data for hashing (functions by name, dataclasses field by field, bar the
    ``ADDED_OPTIONS`` at their neutral value)."""
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        name = type(o).__name__
        return {"_type": name} | {f.name: stable(getattr(o, f.name)) for f in dataclasses.fields(o)
                                  if ADDED_OPTIONS.get((name, f.name), ...) != getattr(o, f.name)}
    if isinstance(o, dict):
        return {str(k): stable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [stable(v) for v in o]
    if isinstance(o, (int, float, str, bool)) or o is None:
        return o
    if callable(o):
        return f"{getattr(o, '__module__', '')}.{getattr(o, '__qualname__', repr(o))}"
    return repr(o)


def _task_constants() -> dict:
    names = ("DIGITS_NOISE", "DIGITS_SPLIT", "SHAPES_SPLIT", "SHAPES_NOISE", "PLATEAU", "BASE_LR", "WIDTH")
    return {n: getattr(quality_tasks, n) for n in names}


def config_hash(task: str, method: str, st: dict, base_epochs: int, opts: dict) -> str:
    """What a cached row must match to be reused: every option that defines it, defaults included."""
    cfg = method_config("dna" if method == "dna-scratch" else method, 0, opts) if method != "base" else None
    if method not in SEARCHES + ("dna-scratch",):
        opts = opts | {"search_val": "train"}   # read by the searches only: one baseline row serves both
    kind = KINDS[task]
    payload = {"protocol": PROTOCOL, "task": task, "settings": st, "base_epochs": base_epochs,
               "constants": _task_constants(), "finetune": stable(kind.finetune_config()), "method": method,
               "config": stable(cfg), "opts": stable(opts) if method != "base" else None}
    if kind.constants is not None:   # a task beyond the classic two (their hashes stay as they were)
        payload["kind"] = stable(dataclasses.replace(kind, reference=None))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def provenance() -> dict:
    """The last commit touching the library / protocol files, HEAD, and a hash of their uncommitted diff."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True).stdout  # noqa: E731
    diff = git("diff", "HEAD", "--", *LIBRARY_FILES)
    return {"commit": git("log", "-1", "--format=%H", "--", *LIBRARY_FILES).strip(),
            "head": git("rev-parse", "HEAD").strip(),
            "dirty": hashlib.sha256(diff.encode()).hexdigest()[:12] if diff else ""}


def finetune_epochs(method: str, st: dict, base_epochs: int, search_steps: int, spe: int) -> int:
    """Epochs that bring ``method`` to W = (F + S) * spe weight steps after the base (scratch: E + that)."""
    if method in SCRATCH:
        return base_epochs + st["ft"] + st["search"]
    return st["ft"] + st["search"] - round(search_steps / spe)


def run_row(task, method, base, data, budget, seed, ctx) -> dict:
    st, spe, opts, epochs_base = ctx["st"], ctx["spe"], ctx["opts"], ctx["base_epochs"]
    kind = KINDS[task]
    torch.manual_seed(seed)
    model, search_s, search_steps = candidate(method, base, data, budget, seed, opts)
    x = data["train"][0][:1]
    ratio = count_macs(model, x) / count_macs(base, x)
    before, val_before = kind.metric(model, data["test"]), kind.metric(model, data["val"])
    epochs = finetune_epochs(method, st, epochs_base, search_steps, spe)
    t0 = time.perf_counter()
    if epochs > 0:
        finetune(model, data["train"], epochs, teacher=copy.deepcopy(base),
                 cfg=kind.finetune_config(seed=seed), loss_fn=kind.loss_fn)
    ft_s, ft_steps = time.perf_counter() - t0, epochs * spe
    scratch, k = method in SCRATCH, kind.key
    return {k: kind.metric(model, data["test"]), f"val_{k}": kind.metric(model, data["val"]),
            f"{k}_before_ft": before, "val_before_ft": val_before, "macs_ratio": ratio, "search_s": search_s,
            "finetune_s": ft_s, "finetune_epochs": epochs, "search_steps": search_steps,
            "finetune_steps": ft_steps,
            "steps_after_base": ft_steps - epochs_base * spe if scratch else search_steps + ft_steps,
            "steps_from_init": ft_steps if scratch else epochs_base * spe + search_steps + ft_steps}


def cache_path(mode: str, task: str) -> str:
    return os.path.join(CACHE, f"quality_{mode}_{task}.jsonl")


def load_rows(mode: str, tasks) -> list[dict]:
    rows = []
    for task in tasks:
        if os.path.exists(cache_path(mode, task)):
            with open(cache_path(mode, task)) as f:
                rows += [json.loads(line) for line in f if line.strip()]
    key = lambda r: (r["task"], r["method"], r["budget"], r["seed"], r.get("config_hash"))  # noqa: E731
    return list({key(r): r for r in rows}.values())     # a repeated row: the last wins


def task_context(task: str, mode: str, search_val: str, train_base: bool = True) -> dict | None:
    st = SETTINGS[mode][task]
    data = load_task(task, st["train"])
    if not train_base and not os.path.exists(quality_tasks.ladder_path(task, *st["ladder"])):
        return None
    epochs, ladder = converged_epochs(task, data, *st["ladder"])
    spe = steps_per_epoch(data)
    opts = search_opts(mode, task, spe, search_val)
    hashes = {m: config_hash(task, m, st, epochs, opts)
              for m in ("base",) + tuple(dict.fromkeys(SHRINK + GROW))}
    return {"task": task, "st": st, "data": data, "base_epochs": epochs, "ladder": ladder, "spe": spe,
            "opts": opts, "hashes": hashes}


def run_task(task: str, mode: str, seeds, budgets, methods, search_val: str) -> None:
    ctx = task_context(task, mode, search_val)
    st, data, epochs, spe = ctx["st"], ctx["data"], ctx["base_epochs"], ctx["spe"]
    print(f"[{task}] base epochs {epochs} (ladder {ctx['ladder']}); {spe} steps/epoch; after the base "
          f"W = ({st['ft']} + {st['search']}) x {spe} = {(st['ft'] + st['search']) * spe} weight steps",
          flush=True)
    for seed in seeds:
        base = trained_base(task, data, epochs, seed)
        todo = [("base", 1.0)] + [(m, b) for b in budgets for m in (GROW if b > 1 else SHRINK)
                                  if m in methods]
        for method, budget in todo:
            h = ctx["hashes"][method]
            done = {(r["method"], r["budget"], r["seed"], r.get("config_hash"))
                    for r in load_rows(mode, [task])}
            if (method, budget, seed, h) in done:
                continue        # re-read every time: another process may run other seeds of this task
            row = {"task": task, "method": method, "budget": budget, "seed": seed, "config_hash": h}
            if method == "base":
                kind = KINDS[task]
                row |= {"base_epochs": epochs, "ladder": ctx["ladder"],
                        kind.key: kind.metric(base, data["test"]),
                        f"val_{kind.key}": kind.metric(base, data["val"]), "steps_from_init": epochs * spe}
            else:
                row |= run_row(task, method, base, data, budget, seed, ctx)
            row |= provenance()
            print(json.dumps(row), flush=True)
            with open(cache_path(mode, task), "a") as f:
                f.write(json.dumps(row) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer epochs, shapes on 3000 images, seeds 0-2")
    p.add_argument("--seeds", default=None, help="comma list (default 0-4; --quick 0-2)")
    p.add_argument("--tasks", default="digits,shapes")
    p.add_argument("--budgets", default=None, help="default 0.5,0.25,0.1,1.5,2.0 (--quick 0.5,0.25,0.1,2.0)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list from {', '.join(dict.fromkeys(SHRINK + GROW))}")
    p.add_argument("--search-val", choices=("train", "val"), default="train",
                   help="what the searches' gate / FUR probes read (default: the training split)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", action="store_true", help="only print the tables from the cache")
    p.add_argument("--recovery", action="store_true", help="issue 25's small recovery budget (W = 2 epochs)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    mode = "recovery" if args.recovery else "quick" if args.quick else "full"
    seeds = [int(s) for s in (args.seeds or ("0,1,2" if args.quick else "0,1,2,3,4")).split(",")]
    budgets = [float(b) for b in (args.budgets or ("0.5,0.25,0.1,2.0" if args.quick
                                                   else "0.5,0.25,0.1,1.5,2.0")).split(",")]
    tasks = args.tasks.split(",")
    methods = [m for m in args.methods.split(",") if m]
    if not args.report:
        for task in tasks:
            run_task(task, mode, seeds, budgets, methods, args.search_val)
    ctxs = [c for t in tasks if (c := task_context(t, mode, args.search_val, train_base=False))]
    text = summary(load_rows(mode, tasks), ctxs, seeds)
    os.makedirs(CACHE, exist_ok=True)
    name = f"quality_{mode}.md" if set(tasks) <= {"digits", "shapes"} \
            else f"quality_{mode}_{'_'.join(tasks)}.md"
    with open(os.path.join(CACHE, name), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
