"""``benchmark``: adapt a model to several budgets and measure every result on several targets.

For each budget the model is adapted (``fxadapt.transform`` for MAC/params budgets, with the first target's
alignment, falling back to finer ones where the budget needs them; latency budgets too), then the original and
every adapted model are compiled for every target (onnxruntime CPU, torch CPU, and CUDA when present by
default) and timed there in interleaved rounds (``fxadapt.hw.target.interleaved``, the target's clock). Each
row holds the budget, MACs (``FlopCounterMode``), parameters, the latency per target and its ratio to the
original, and the top-1 accuracy when ``eval_data=(inputs, labels)`` (tensors, or an iterable of such batches)
is given. ``BenchResult.table()`` prints them, ``.to_json(path)`` writes them, ``.plot(path)`` draws latency
against MACs per target with the original, every adapted point and their Pareto front, and, with accuracy,
accuracy against latency per target.

With ``data=BenchData(train, val, options, finetune_epochs)`` the MAC budgets are also adapted by one search
for all of them (``fxadapt.transform(model, [b_1, ...], data=...)``: one supernet, a model per budget) and
listed beside the data-free models of the same budgets (``"dna 0.5"``, ``"datafree 0.5"``); accuracy is
measured on ``val``; ``finetune_epochs`` fine-tunes every adapted model alike (``fxadapt.finetune`` with the
original as teacher) so the comparison is at equal training after the search.

>>> import torch
>>> from fxadapt.examples import example_model, EXAMPLE_INPUT_SHAPE
>>> res = benchmark(example_model().eval(), (torch.randn(EXAMPLE_INPUT_SHAPE),), [0.75],
...                 targets=[Target(runtime="torch")], runs=3, progress=False)
>>> [r["budget"] for r in res.rows], res.rows[1]["macs"] < res.rows[0]["macs"]
(['original', '0.75'], True)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fxadapt.analysis.count import count_macs
from fxadapt.export.report import table
from fxadapt.hw.target import Target, interleaved
from fxadapt.pipeline.transform import transform
from fxadapt.planning.budget import Budget
from fxadapt.train.finetune import finetune


@dataclass
class BenchResult:
    rows: list = field(default_factory=list)
    targets: list = field(default_factory=list)

    def table(self) -> str:
        heads = ["budget", "GMACs", "MACs ratio", "params"]
        for t in self.targets:
            heads += [f"{t} ms", f"{t} ratio"]
        if any("accuracy" in r for r in self.rows):
            heads.append("top-1")
        rows = []
        for r in self.rows:
            row = [r["budget"], f"{r['macs'] / 1e9:.3f}", f"{r['macs_ratio']:.3f}", f"{r['params']:,}"]
            for t in self.targets:
                row += [f"{r['latency'][t] * 1e3:.3f}", f"{r['latency_ratio'][t]:.3f}"]
            if "accuracy" in r:
                row.append(f"{100 * r['accuracy']:.2f}%")
            rows.append(row)
        return table(heads, rows)

    def to_json(self, path: str) -> str:
        Path(path).write_text(json.dumps({"targets": self.targets, "rows": self.rows}, indent=2))
        return path

    def plot(self, path: str) -> str:
        import matplotlib  # deferred: optional dependency, plots only

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # deferred: optional dependency, plots only

        acc = all("accuracy" in r for r in self.rows)
        fig, axes = plt.subplots(2 if acc else 1, len(self.targets),
                                 figsize=(5 * len(self.targets), 8 if acc else 4), squeeze=False)
        if acc:
            for ax, t in zip(axes[1], self.targets):
                _accuracy_panel(ax, self.rows, t)
        for ax, t in zip(axes[0], self.targets):
            pts = sorted((r["macs"] / 1e9, r["latency"][t] * 1e3, r["budget"]) for r in self.rows)
            front, best = [], float("inf")
            for x, y, _ in pts:
                if y < best:
                    front.append((x, y))
                    best = y
            ax.plot([p[0] for p in front], [p[1] for p in front], "-", color="0.7", label="Pareto front")
            for x, y, lab in pts:
                ax.plot(x, y, "*" if lab == "original" else "o", ms=10 if lab == "original" else 6)
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.set(xlabel="GMACs", ylabel="latency (ms)", title=t)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _accuracy_panel(ax, rows: list, t: str) -> None:
    """Top-1 accuracy against latency on ``t``, one marker per method (original, searched, data-free)."""
    marks = {"original": "*", "datafree": "s"}
    for r in rows:
        kind = r.get("method", "original" if r["budget"] == "original" else "adapted")
        ax.plot(r["latency"][t] * 1e3, 100 * r["accuracy"], marks.get(kind, "o"),
                ms=10 if kind == "original" else 6)
        ax.annotate(r["budget"], (r["latency"][t] * 1e3, 100 * r["accuracy"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set(xlabel="latency (ms)", ylabel="top-1 (%)", title=f"accuracy vs latency, {t}")
    ax.grid(alpha=0.3)


def default_targets() -> list[Target]:
    """onnxruntime CPU and torch CPU (one thread each), plus torch CUDA when a GPU is present."""
    out = [Target(), Target(runtime="torch")]
    if torch.cuda.is_available():
        out.append(Target(runtime="torch", device="cuda"))
    return out


def _label(b) -> str:
    if isinstance(b, Budget):
        parts = [f"{k}={v}" for k, v in (("macs", b.macs), ("params", b.params), ("latency", b.latency)) if v]
        return ",".join(parts)
    return str(b)


def _adapt(model, budget, inputs, target: Target, progress: bool):
    """``fxadapt.transform`` with the budget on ``target`` (its alignment, falling back to finer ones where
    the budget needs them; latency measured there)."""
    if isinstance(budget, Budget):
        budget = dataclasses.replace(budget, target=budget.target or target)
    elif isinstance(budget, (int, float)):
        budget = Budget(macs=budget, target=target)
    return transform(model, budget, inputs)


def accuracy(model, eval_data) -> float:
    """Top-1 accuracy on ``(inputs, labels)`` or an iterable of such batches."""
    batches = [eval_data] if isinstance(eval_data, (tuple, list)) and torch.is_tensor(eval_data[0]) \
            else eval_data
    right = total = 0
    model.eval()
    with torch.no_grad():
        for x, y in batches:
            right += int((model(x).argmax(-1) == y).sum())
            total += int(y.numel())
    return right / max(total, 1)


@dataclass(frozen=True)
class BenchData:
    """Data for ``benchmark``: ``train`` (searches, fine-tuning), ``val`` (accuracy; ``train`` when None), the
    ``transform`` options of the search (``strategy``, ``search``, ``device`` ...) and ``finetune_epochs``
    every adapted model gets (the same for all, searched or data-free)."""

    train: Any
    val: Any = None
    options: dict = field(default_factory=dict)
    finetune_epochs: int = 0


def _adapt_all(model, budgets: list, inputs, target: Target, data: BenchData | None, progress: bool) -> dict:
    """Every budget adapted: data-free; with ``data`` the MAC budgets also by one search for all of them
    (``fxadapt.transform`` with a list), the data-free models kept beside them for comparison."""
    out = {}
    for b in budgets:
        out[_label(b) if data is None
            else f"datafree {_label(b)}"] = ("datafree", _adapt(model, b, inputs, target, progress))
    macs = [b for b in budgets if not (isinstance(b, Budget) and b.latency is not None)]
    if data is not None and macs:
        searched = transform(model, macs, inputs, data=data.train, val_data=data.val, **data.options)
        strategy = data.options.get("strategy", "dna")
        out |= {f"{strategy} {_label(b)}": (strategy, m) for b, m in zip(macs, searched)}
    if data is not None and data.finetune_epochs:
        for name, (kind, m) in out.items():
            out[name] = (kind, finetune(m, data.train, data.finetune_epochs, teacher=model))
    return {"original": ("original", model.eval())} | {k: (kind, m.eval()) for k, (kind, m) in out.items()}


def benchmark(model, example_inputs: Any, budgets: list, targets: list[Target] | None = None,
              eval_data: Any = None, runs: int = 20, progress: bool = True, data: BenchData | None = None
              ) -> BenchResult:
    """Adapt ``model`` to every budget and measure all results on every target (module docstring); with
    ``data`` also searched models (and accuracy on ``data.val`` unless ``eval_data`` is given)."""
    targets = targets or default_targets()
    models = _adapt_all(model, budgets, example_inputs, targets[0], data, progress)
    if eval_data is None and data is not None:
        eval_data = data.val if data.val is not None else data.train
    rows = []
    base_macs = count_macs(model, example_inputs)
    for name, (kind, m) in models.items():
        macs = count_macs(m, example_inputs)
        row = {"budget": name, "method": kind, "macs": macs, "macs_ratio": macs / base_macs,
               "params": sum(p.numel() for p in m.parameters()), "latency": {}, "latency_ratio": {}}
        if eval_data is not None:
            row["accuracy"] = accuracy(m, eval_data)
        rows.append(row)
    for t in tqdm(targets, desc="timing", disable=not progress):
        fns = {name: t.compile(m, example_inputs) for name, (_, m) in models.items()}
        med = interleaved(fns, runs, 3, clock=t.clock)
        for row in rows:
            row["latency"][t.name()] = med[row["budget"]]
            row["latency_ratio"][t.name()] = med[row["budget"]] / med["original"]
    return BenchResult(rows, [t.name() for t in targets])
