"""Where ``strategy="importance"``'s time goes, against the recovery fine-tune it must stay small beside
(issue 25: importance + allocation <= 0.2x the recovery fine-tune's wall time).

On the digits task of ``bench/quality.py --quick`` (its cached base of seed 0, its importance options: 120
distillation steps over 3 prunes, hybrid scores), in one process and interleaved, ``--repeats`` times:
``transform(..., strategy="importance")`` with the scores of ``--before`` (a git revision of
``fxadapt/search/scores.py`` and ``replay.py``, loaded beside the current ones), the same with the current
code (the two pruned models must be equal, weight for weight: same widths, same kept units), and the
recovery fine-tune of W = 240 steps (the quick protocol's W; ``fxadapt.finetune``, the protocol's
distillation recipe) of the pruned model. Per run: seconds (wall and process CPU) in the scores, the
allocation (``_prune``: allocation, alignment, repair), the distillation weight steps and the rest of
``importance``; ratios to the fine-tune's wall. Needs the cached base (run ``bench/quality.py --quick``
once).

    OMP_NUM_THREADS=1 python bench/bench_importance_speed.py --budget 0.25 --repeats 3 --before HEAD
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import os
import statistics
import subprocess
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402
import quality_methods  # noqa: E402
from quality_tasks import KINDS, trained_base  # noqa: E402

import fxadapt  # noqa: E402
import fxadapt.pipeline.strategies as strategies  # noqa: E402
import fxadapt.search.importance as imp  # noqa: E402
import fxadapt.search.scores as scores  # noqa: E402
from fxadapt.train.finetune import finetune  # noqa: E402

PARTS = {"score": "scores", "_prune": "allocation", "train": "distillation steps", "importance": "importance"}
CLOCK = collections.defaultdict(lambda: [0.0, 0.0])


def _timed(mod, name: str, f=None) -> None:
    f = f or getattr(mod, name)

    @functools.wraps(f)
    def g(*a, **k):
        w, c = time.perf_counter(), time.process_time()
        try:
            return f(*a, **k)
        finally:
            CLOCK[PARTS[name]][0] += time.perf_counter() - w
            CLOCK[PARTS[name]][1] += time.process_time() - c
    setattr(mod, name, g)


def _module_at(rev: str, path: str, name: str, **names) -> types.ModuleType:
    """The module at ``path`` as it was at git revision ``rev``, with ``names`` set after loading."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, check=True, capture_output=True,
                         text=True).stdout
    mod = types.ModuleType(name)
    sys.modules[name] = mod     # dataclasses look their module up
    exec(compile(src, f"{path}@{rev}", "exec"), mod.__dict__)
    mod.__dict__.update(names)
    return mod


def _score_at(rev: str):
    """``score`` as ``fxadapt/search/scores.py`` (with its ``replay.py``) was at git revision ``rev``."""
    replay = _module_at(rev, "fxadapt/search/replay.py", f"replay_{rev}")
    old = _module_at(rev, "fxadapt/search/scores.py", f"scores_{rev}", Replay=replay.Replay,
                     Calibration=scores.Calibration)    # the caller's calibration, as it is
    return old.score


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--before", default="HEAD", help="git revision of the scores to compare against")
    p.add_argument("--steps", type=int, default=240, help="fine-tune steps (the quick protocol's W)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ctx = quality.task_context("digits", "quick", "train", train_base=False)
    if ctx is None:
        raise SystemExit("no cached digits base: run python bench/quality.py --quick --tasks digits first")
    data, spe, kind = ctx["data"], ctx["spe"], KINDS["digits"]
    base = trained_base("digits", data, ctx["base_epochs"], 0)
    for name in ("_prune", "train"):
        _timed(imp, name)
    _timed(strategies, "importance")
    replays = {"before": _score_at(args.before), "after": scores.score}
    rows = collections.defaultdict(list)
    widths, models = {}, {}
    for rep in range(args.repeats):
        for which, score in replays.items():
            _timed(imp, "score", score)
            CLOCK.clear()
            model, _, _ = quality_methods.candidate("importance", base, data, args.budget, 0, ctx["opts"])
            widths[which] = fxadapt.report(model).history[-1]["widths"]
            models[which] = model.state_dict()
            rows[which].append({k: tuple(v) for k, v in CLOCK.items()})
        same = models["before"].keys() == models["after"].keys() and all(
            torch.equal(v, models["after"][k]) for k, v in models["before"].items())
        assert same, "the pruned models differ before / after"
        m = copy.deepcopy(model)
        w, c = time.perf_counter(), time.process_time()
        finetune(m, data["train"], args.steps // spe, teacher=copy.deepcopy(base),
                 cfg=kind.finetune_config(seed=0), loss_fn=kind.loss_fn)
        rows["finetune"].append({"finetune": (time.perf_counter() - w, time.process_time() - c)})
        print(f"repeat {rep}: " + "; ".join(f"{k} {v[-1]}" for k, v in rows.items()), flush=True)
    assert widths["before"] == widths["after"], widths
    ft = [r["finetune"] for r in rows["finetune"]]
    print(f"\ndigits, budget {args.budget}, {args.repeats} repeats, medians: seconds wall / cpu, and ratio "
          f"wall / cpu = (seconds / the same repeat's {args.steps}-step fine-tune seconds)")
    print(f"fine-tune {args.steps} steps: {statistics.median(f[0] for f in ft):.2f} / "
          f"{statistics.median(f[1] for f in ft):.2f}")
    for which in replays:
        for part in ("scores", "allocation", "distillation steps", "importance", "importance - steps"):
            got = [r["importance"] if part == "importance - steps" else r[part] for r in rows[which]]
            if part == "importance - steps":
                got = [(t[0] - r["distillation steps"][0], t[1] - r["distillation steps"][1])
                       for t, r in zip(got, rows[which])]
            med = [statistics.median(t[i] for t in got) for i in (0, 1)]
            ratio = [statistics.median(t[i] / f[i] for t, f in zip(got, ft)) for i in (0, 1)]
            print(f"{which:6s} {part:20s} {med[0]:7.2f} / {med[1]:6.2f}   "
                  f"ratio {ratio[0]:.3f} / {ratio[1]:.3f}")
    print("widths (identical before / after, and the pruned models weight for weight):", widths["after"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
