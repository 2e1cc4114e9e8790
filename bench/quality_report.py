"""Tables of the quality protocol (bench/quality.py) from its cached rows; every cell uses only rows whose
config hash is the current one.

Each task's metric is its ``Kind`` (bench/quality_tasks.py): accuracy is stored as a fraction and printed
in % (differences in points), PSNR is stored and printed in dB; higher is better for both, so the
reference of a paired difference is the baseline with the highest mean *validation* score in its cell.
"""

from __future__ import annotations

import math
import statistics

from quality_methods import BASELINES, GROW, SCRATCH, SHRINK
from quality_tasks import KINDS


def interval(v: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan for one value)."""
    from scipy import stats

    m = statistics.mean(v)
    if len(v) < 2:
        return m, float("nan")
    return m, float(stats.t.ppf(0.975, len(v) - 1)) * statistics.stdev(v) / math.sqrt(len(v))


def _ci(v: list[float], scale: float = 100.0) -> str:
    m, h = interval(v)
    return f"{scale * m:.2f} ± {scale * h:.2f}"


def _diff(v: list[float], scale: float = 100.0) -> str:
    m, h = interval(v)
    return f"{scale * m:+.2f} ± {scale * h:.2f}"


def score(row: dict, which: str = "") -> float:
    """The row's metric: ``which`` "" (test), "val" or "before" (test, before the fine-tune)."""
    k = KINDS[row["task"]].key
    return row[{"": k, "val": f"val_{k}", "before": f"{k}_before_ft"}[which]]


def _scale(cell: tuple) -> float:
    return KINDS[cell[0]].scale


def current(rows, ctxs, seeds) -> list[dict]:
    keep = {(c["task"], m): h for c in ctxs for m, h in c["hashes"].items()}
    return [r for r in rows if r["seed"] in seeds
            and keep.get((r["task"], r["method"])) == r.get("config_hash")]


def _cells(rows, which: str = ""):
    """{(task, budget): {method: {seed: value}}} (the base's row counts in every cell of its task)."""
    out = {}
    for r in rows:
        if r["method"] != "base":
            out.setdefault((r["task"], r["budget"]), {}).setdefault(r["method"],
                                                                    {})[r["seed"]] = score(r, which)
    for r in rows:
        if r["method"] == "base":
            for (t, _), cell in out.items():
                if t == r["task"]:
                    cell.setdefault("base", {})[r["seed"]] = score(r, which)
    return dict(sorted(out.items(), key=lambda kv: (kv[0][0], -kv[0][1])))


def reference(val_cell: dict, baselines) -> str | None:
    """The baseline with the highest mean validation score (never the test split)."""
    means = {m: statistics.mean(val_cell[m].values()) for m in baselines if val_cell.get(m)}
    return max(means, key=means.get) if means else None


def _methods(cells) -> list[str]:
    present = {m for c in cells.values() for m in c}
    return [m for m in ("base",) + tuple(dict.fromkeys(SHRINK + GROW)) if m in present]


def _table(title: str, cells, methods, cell) -> str:
    cols = list(cells)
    out = [f"| {title} | " + " | ".join(f"{t} {b}x" for t, b in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    out += [f"| {m} | " + " | ".join(cell(m, c) for c in cols) + " |" for m in methods]
    return "\n".join(out)


def _units(cells) -> str:
    units = {t: f"{KINDS[t].name} {KINDS[t].unit}" for t, _ in cells}
    return ", ".join(f"{t}: {u}" for t, u in units.items())


def metric_table(cells) -> str:
    return _table(f"method (test; {_units(cells)})", cells, _methods(cells), lambda m, c: (
        f"{_ci(list(cells[c][m].values()), _scale(c))} ({len(cells[c][m])})" if cells[c].get(m) else ""))


def paired_table(cells, val_cells, baselines) -> str:
    refs = {c: reference(val_cells[c], baselines) for c in cells}

    def cell(m, c):
        ref, a = cells[c].get(refs[c], {}), cells[c].get(m, {})
        d = [a[s] - ref[s] for s in sorted(set(a) & set(ref))]
        return "reference" if m == refs[c] and d else (f"{_diff(d, _scale(c))} ({len(d)})" if d else "")

    head = "method − reference; reference per cell: " + ", ".join(f"{t} {b}x {refs[(t, b)]}"
                                                                  for t, b in cells)
    return head + "\n\n" + _table(f"method − reference (test; {_units(cells)})", cells, _methods(cells), cell)


def arch_table(cells) -> str:
    def cell(_, c):
        a, u = cells[c].get("dna-scratch", {}), cells[c].get("uniform", {})
        d = [a[s] - u[s] for s in sorted(set(a) & set(u))]
        return f"{_diff(d, _scale(c))} ({len(d)})" if d else ""
    return _table("architecture only", cells, ["dna-scratch − uniform"], cell)


def steps_table(rows) -> str:
    """Per task and method: search + fine-tune = weight steps after the base (scratch: from
    initialisation)."""
    tasks = sorted({r["task"] for r in rows})
    out = ["| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for m in _methods(_cells(rows))[1:]:
        cells = []
        for t in tasks:
            v = sorted({(r["search_steps"], r["finetune_steps"], r["steps_after_base"], r["steps_from_init"])
                        for r in rows if r["task"] == t and r["method"] == m})
            cells.append("; ".join(
                f"from scratch: {i} = {i - a} (the base's) + {a}" if m in SCRATCH else
                f"{s} search + {f} fine-tune = {a} ({i} from init)" for s, f, a, i in v))
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _bases(rows, ctxs) -> list[str]:
    lines = []
    for c in ctxs:
        kind, b = KINDS[c["task"]], [r for r in rows if r["method"] == "base" and r["task"] == c["task"]]
        if b:
            ref = (f"; bicubic / reference: test {kind.reference(c['data']['test']):.2f} {kind.unit}"
                   if kind.reference else "")
            lines.append(f"- {c['task']}: {c['base_epochs']} epochs x {c['spe']} steps (val {kind.unit} "
                         "ladder "
                         + ", ".join(f"{e} ep: {kind.scale * a:.2f}" for e, a in c["ladder"])
                         + f"); test {_ci([score(r) for r in b], kind.scale)} over {len(b)} seeds{ref}")
    return lines


def summary(rows, ctxs, seeds) -> str:
    stale = len([r for r in rows if r["seed"] in seeds]) - len(rows := current(rows, ctxs, seeds))
    lines = ["## Bases"] + _bases(rows, ctxs)
    commits = sorted({r.get("commit", "")[:10] for r in rows})
    dirty = {r.get("dirty") for r in rows if r.get("dirty")}
    lines.append(f"- rows from commit {', '.join(commits)} ({len(dirty)} distinct uncommitted diffs of the "
                 f"library and protocol files among them); {stale} cached rows of these seeds have another "
                 f"config hash (stale, or other options such as --search-val) and are left out")
    cells, val_cells = _cells(rows), _cells(rows, "val")
    inherited = tuple(m for m in BASELINES if m != "uniform")
    return "\n\n".join([
        "\n".join(lines), "## Weight-update steps (search + fine-tune = after the base)", steps_table(rows),
        "## Test metric, mean ± 95% t-interval (n seeds)", metric_table(cells),
        "## Paired difference vs the best equal-training baseline (chosen on val), mean ± 95% t-interval",
        paired_table(cells, val_cells, BASELINES),
        "## Paired difference vs the best inherited-weight baseline (tp-uniform, tp-global, datafree; on "
        "val)", paired_table(cells, val_cells, inherited),
        "## Architecture only: DNA's widths vs uniform widths, both trained from scratch the same steps",
        arch_table(cells),
        "## Search wall time / one fine-tuning run's wall time", time_table(rows),
        "## Measured MACs ratio (test metric before fine-tuning)", macs_table(rows)])


def _per_method(rows, title: str, methods, fmt) -> str:
    cells = {}
    for r in rows:
        if r["method"] in methods:
            cells.setdefault((r["task"], r["budget"]), {}).setdefault(r["method"], []).append(r)
    cells = dict(sorted(cells.items(), key=lambda kv: (kv[0][0], -kv[0][1])))
    return _table(title, cells, [m for m in methods if any(m in c for c in cells.values())],
                  lambda m, c: fmt(cells[c][m]) if m in cells[c] else "")


def time_table(rows) -> str:
    return _per_method(rows, "search s / fine-tune s",
                       ("tp-uniform", "tp-global", "datafree", "fur-bernoulli", "fur", "dna-markov", "dna"),
                       lambda rs:
                       f"{statistics.mean(r['search_s'] / max(r['finetune_s'], 1e-9) for r in rs):.2f} "
                       f"({statistics.mean(r['search_s'] for r in rs):.1f} s / "
                       f"{statistics.mean(r['finetune_s'] for r in rs):.1f} s)")


def macs_table(rows) -> str:
    return _per_method(rows, "MACs / base (before FT metric)", tuple(dict.fromkeys(SHRINK + GROW)),
                       lambda rs:
                       f"{statistics.mean(r['macs_ratio'] for r in rs):.3f} "
                       f"({KINDS[rs[0]['task']].scale * statistics.mean(score(r, 'before') for r in rs):.1f}"
                       ")")
