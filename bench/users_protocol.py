"""The users' question (issue 25 items 8 and 9b): a base trained far longer than the recovery budget W,
then every method at ``budget`` x the base's MACs gets the same W weight steps after the base.

Task ``shapes-users``: the shapes generator of bench/quality_tasks.py (``_shapes``: 3x16x16 images, 10
classes) with its own generator seed (``GEN_SEED``, so no image of the ``shapes`` task recurs), 50000 train /
5000 val / 10000 test, standardised with the training split's mean and std. Base: ``base_model(seed)``
(ExampleResNet width 8, 1.17M MACs), trained with the existing base recipe (``fxadapt.finetune``, SGD lr
0.05, cosine, no teacher) for ``BASE_EPOCHS`` = 6 epochs = 4686 steps; bases 0, 1, 2 (cached in
bench/.cache/). The base length is fixed in advance (not chosen on test or val).

Recovery budget ``W`` = 100 SGD steps (batch 64) after the base: 2.1% of the base's steps (base = 46.9 W).
A search's own weight steps count: ``importance`` gets ``steps = W // 2`` distillation steps inside the
search (bench/quality.py's recovery-mode split, F = S) and is fine-tuned ``W - s`` steps, ``s`` its weight
steps read from its history; data-free and Torch-Pruning (uniform L1 / global group L2) take no weight step
and are fine-tuned W steps. Fine-tuning is bench/quality.py's recipe: ``fxadapt.finetune``, SGD 0.05
cosine, distillation from the base (kd 0.5, T 4), batch 64; ``k`` steps are one epoch over ``k * 64``
training images drawn by the fine-tune seed (the same draw for every method of a run: paired).
``scratch-W`` (the floor, a diagnostic): the data-free widths re-initialised, trained the same W steps with
the same recipe.

A run is (base seed, fine-tune seed); every method of a run shares its base and seed. Tables: per budget
the mean test / val accuracy per method ± the 95% t-interval over runs, the accuracy before recovery, and
``importance`` minus the best keep-weights baseline (data-free, tp-uniform, tp-global: the one with the
highest mean *val* accuracy in that budget), paired per run, mean ± 95% t-interval, on test and on val.
Nothing is chosen on test. Rows are cached in bench/.cache/users_protocol.jsonl, keyed by (method, budget,
base, seed, config hash); rerunning skips finished rows.

    python bench/users_protocol.py --bases-only --bases 0          # train / cache one base
    python bench/users_protocol.py --seeds 0,1 --bases 0,1,2       # rows (two processes: disjoint seeds)
    python bench/users_protocol.py --report                        # tables from the cache
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol_rows  # noqa: E402
from quality import stable  # noqa: E402
from quality_methods import candidate, code_revision, count_macs, method_config  # noqa: E402
from quality_report import interval  # noqa: E402
from quality_tasks import BASE_LR, CACHE, _shapes, _standardise, base_model  # noqa: E402

from fxadapt.train.finetune import FinetuneConfig, accuracy, finetune  # noqa: E402

PROTOCOL = "issue25-users-v1"
TASK = "shapes-users"
SPLIT = (50000, 5000, 10000)
GEN_SEED = 2025
BASE_EPOCHS = 6
W = 100
BUDGETS = (0.5, 0.25, 0.1)
BASELINES = ("datafree", "tp-uniform", "tp-global")      # keep the base's weights
METHODS = BASELINES + ("importance", "scratch-W")
# val-only diagnostics, run on request
ABLATIONS = ("importance-oneshot", "importance-fisher", "importance-floor", "importance-floor1", "dna",
             "importance-screen-floors", "importance-depth", "datafree-lat", "importance-lat",
             "importance-lrr", "importance-act", "importance-taylor")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = os.path.join(CACHE, "users_protocol.jsonl")
RESULTS = os.path.join(ROOT, "bench", "results", "users_protocol")


def _hash(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]


def data_hash() -> str:
    return _hash([TASK, SPLIT, GEN_SEED])


def users_task() -> dict:
    """The task's splits (generated in chunks of 5000 from one generator; cached)."""
    path = os.path.join(CACHE, f"users_data_{data_hash()}.pt")
    if os.path.exists(path):
        return torch.load(path)
    g = torch.Generator().manual_seed(GEN_SEED)
    parts = {}
    for name, n in zip(("train", "val", "test"), SPLIT):
        chunks = [_shapes(min(5000, n - i), g) for i in range(0, n, 5000)]
        parts[name] = (torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]))
    data = _standardise(parts)
    os.makedirs(CACHE, exist_ok=True)
    torch.save(data, path)
    return data


def base_cfg(seed: int) -> FinetuneConfig:
    return FinetuneConfig(lr=BASE_LR, kd=0.0, seed=seed)


def base_path(seed: int) -> str:
    key = _hash([data_hash(), BASE_EPOCHS, stable(base_cfg(seed))])
    return os.path.join(CACHE, f"users_base_s{seed}_{key}.pt")


def trained_base(data: dict, seed: int) -> torch.nn.Module:
    path, model = base_path(seed), base_model(seed)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
        return model.eval()
    t0 = time.perf_counter()
    finetune(model, data["train"], BASE_EPOCHS, cfg=base_cfg(seed))
    print(f"[base {seed}] {time.perf_counter() - t0:.0f} s, val {accuracy(model, data['val']):.4f}",
          flush=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def base_steps(data: dict) -> int:
    return BASE_EPOCHS * (len(data["train"][0]) // FinetuneConfig().batch_size)


def opts() -> dict:
    return {"search_steps": W // 2, "fur_iterations": 1, "search_val": "train"}


def row_hash(method: str) -> str:
    cfg = None if method == "scratch-W" else method_config(method, 0, opts())
    return _hash(code_revision(method) | {"protocol": PROTOCOL, "data": data_hash(),
                                          "base_epochs": BASE_EPOCHS, "W": W,
                  "method": method, "config": stable(cfg), "finetune": stable(FinetuneConfig()),
                  "base": stable(base_cfg(0))})


def recover(model, base, data: dict, steps: int, seed: int) -> None:
    """``steps`` SGD steps of the distillation recipe: one epoch over ``steps * 64`` images drawn by
    ``seed``."""
    if steps <= 0:
        return
    n = steps * FinetuneConfig().batch_size
    idx = torch.randperm(len(data["train"][0]), generator=torch.Generator().manual_seed(10_000 + seed))[:n]
    finetune(model, (data["train"][0][idx], data["train"][1][idx]), 1, teacher=copy.deepcopy(base),
             cfg=FinetuneConfig(seed=seed))


_KEPT: dict = {}   # (base seed, budget, method) -> a seed-free candidate and its scores (once per process)


def prepared(method: str, base, b: int, data: dict, budget: float, seed: int) -> tuple:
    """(candidate, seconds, search weight steps, test and val accuracy before recovery); the keep-weights
    baselines do not depend on the seed, so each is built once per (base, budget)."""
    key = (b, budget, method)
    if key in _KEPT:
        model, *rest = _KEPT[key]
        return (copy.deepcopy(model), *rest)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    name = "uniform" if method == "scratch-W" else method
    model, _, steps = candidate(name, base, data, budget, seed, opts())
    seconds = time.perf_counter() - t0
    out = (model, seconds, steps, accuracy(model, data["test"]), accuracy(model, data["val"]))
    if method in BASELINES:
        _KEPT[key] = (copy.deepcopy(model), *out[1:])
    return out


def run_row(method: str, base, b: int, data: dict, budget: float, seed: int) -> dict:
    model, search_s, search_steps, before, val_before = prepared(method, base, b, data, budget, seed)
    x = data["train"][0][:1]
    ratio = count_macs(model, x) / count_macs(base, x)
    t0 = time.perf_counter()
    recover(model, base, data, W - search_steps, seed)
    return {"acc": accuracy(model, data["test"]), "val_acc": accuracy(model, data["val"]),
            "acc_before": before, "val_before": val_before, "macs_ratio": ratio, "search_steps": search_steps,
            "finetune_steps": W - search_steps, "search_s": search_s, "finetune_s": time.perf_counter() - t0}


def load_rows() -> list[dict]:
    return protocol_rows.load_rows(ROWS)


def run(runs, budgets, methods, floor_seeds) -> None:
    """``protocol_rows.run`` on this protocol."""
    protocol_rows.run(sys.modules[__name__], runs, budgets, methods, floor_seeds)


def _cell(v: list[float]) -> str:
    if not v:
        return "—"
    m, h = interval(v)
    return f"{100 * m:.2f} ± {100 * h:.2f}"


def summary(rows: list[dict]) -> tuple[str, dict]:
    """Markdown tables and their numbers (see module docstring)."""
    by, runs, budgets, rows = protocol_rows.indexed(sys.modules[__name__], rows)
    out, res = [], {"W": W, "base_steps": BASE_EPOCHS * (SPLIT[0] // 64), "budgets": {}}
    out.append("| budget | method | runs | test acc % | val acc % | test before recovery % | "
               "search + fine-tune steps |")
    out.append("|---|---|---|---|---|---|---|")
    for bud in budgets:
        cell = res["budgets"].setdefault(str(bud), {"methods": {}})
        for m in METHODS + ABLATIONS:
            rr = [by[(m, bud) + run_] for run_ in runs if (m, bud) + run_ in by]
            if not rr:
                continue
            steps = sorted({(r["search_steps"], r["finetune_steps"]) for r in rr})
            cell["methods"][m] = {k: interval([r[k] for r in rr]) for k in ("acc", "val_acc", "acc_before")} \
                | {"runs": len(rr)}
            out.append(f"| {bud} | {m} | {len(rr)} | {_cell([r['acc'] for r in rr])} | "
                       f"{_cell([r['val_acc'] for r in rr])} | {_cell([r['acc_before'] for r in rr])} | "
                       f"{', '.join(f'{a} + {b}' for a, b in steps)} |")
    out += ["", "importance (and ablations) − the best keep-weights baseline (chosen per budget by mean val "
            "accuracy over the runs both have), paired per run, points, mean ± 95% t-interval:", "",
            "| budget | method | best baseline (val) | runs | Δ test | Δ val |", "|---|---|---|---|---|---|"]
    for bud in budgets:
        cell = res["budgets"][str(bud)]
        for m in ("importance",) + ABLATIONS:
            # a latency budget's methods pair with its own keep-weights baseline (datafree-lat)
            bases_m = ("datafree-lat",) if m.endswith("-lat") else BASELINES
            if m in bases_m:
                continue
            found = protocol_rows.paired_diff(by, runs, bud, m, bases_m, ("acc", "val_acc"))
            if found is None:
                continue
            best, paired, d = found
            cell.setdefault("diff", {})[m] = {"baseline": best, "runs": len(paired),
                                              "test": interval(d["acc"]), "val": interval(d["val_acc"])}
            out.append(f"| {bud} | {m} | {best} | {len(paired)} | {_cell(d['acc'])} | "
                       f"{_cell(d['val_acc'])} |")
    res["runs"] = [list(r) for r in runs]
    return "\n".join(out), res | {"n_rows": len(rows), "n_runs": len(runs)}


def report() -> str:
    text, res = summary(load_rows())
    data = users_task()
    bases = [b for b in sorted({r["base"] for r in load_rows()}) if os.path.exists(base_path(b))]
    lines = []
    for b in bases:
        m = trained_base(data, b)
        acc = (accuracy(m, data["test"]), accuracy(m, data["val"]))
        res.setdefault("base_acc", {})[b] = acc
        lines.append(f"base {b}: test {100 * acc[0]:.2f}%, val {100 * acc[1]:.2f}%")
    head = f"W = {W} steps after the base; base {res['base_steps']} steps.\n"
    text = head + "\n".join(lines) + "\n\n" + text
    protocol_rows.write_results(RESULTS, text, res)
    return text


def main(argv=None) -> int:
    return protocol_rows.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
