"""The import-layering contract (issue 24): fxadapt's packages import only downward.

A module may import its own layer and any layer below it, never one above. Layers, lowest first:

====  ==========  ========================================================================================
rank  layer       what it holds
====  ==========  ========================================================================================
0     core        ``fxadapt.errors``, ``.meta``, ``.options``, ``.dist``, ``.examples``, ``.frames``,
                  ``fxadapt.ir.inputs``
1     ir          capture, ATen calls, channel references
2     ops         the one op registry (channel rules, costs, latency keys, lifts)
3     passes      the top-level ``passes/`` folder, installed as ``fxadapt.passes``
4     analysis    groups, blocks, the cost model
5     hw          measurement (targets, benches, lookup tables); beside planning but below it: planning
                  may import hw, hw never imports planning or anything above
6     planning    budgets, the solver, plans
7     train       batches and fine-tuning; sits with search, one step below it: search trains its gates
                  on ``train.data`` batches, train never imports search
8     search      supernet, DNA, FUR
9     checks      verification
10    writeback   applying a plan to the user's model
11    pipeline    the orchestrator (``transform``)
12    export      ONNX, save/load, reports
13    (root)      ``fxadapt/__init__.py``, the public façade: nothing inside the library imports it
14    cli         the command line (and ``fxadapt.__main__``)
====  ==========  ========================================================================================

What is checked, over every ``.py`` under ``fxadapt/`` and ``passes/`` with ``ast`` (nothing is imported):

(a) no import goes upward: top-level, function-level and ``if TYPE_CHECKING:`` imports all count;
(b) no import cycle between layers or between modules, counting the imports that run at import time
    (top-level, not under ``TYPE_CHECKING``);
(c) no import of a private ``_name`` from another module;
(d) every function-level import of an fxadapt module or of a heavy optional dependency carries a
    ``# deferred: <reason>`` comment on one of its lines.

``from fxadapt import meta`` counts as an import of the module ``fxadapt.meta``, not of the package;
``from fxadapt.planning import Budget`` counts as an import of ``fxadapt.planning`` (its ``__init__``).

The allowlists below are the violations that existed when the contract was written. They only shrink: a
new violation fails ``test_layering``, and an entry that no longer matches anything fails
``test_allowlists_shrink`` (delete the entry). import-linter is not used: its graph builder walks the
``fxadapt/`` folder, so ``fxadapt.passes`` (the top-level ``passes/`` folder, mapped by setuptools
``package-dir``) is invisible to it (``lint-imports`` 2.17: "Missing layer 'fxadapt.passes': module
fxadapt.passes does not exist"); this test is the contract, and CI runs it with pytest.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CORE = {"fxadapt.errors", "fxadapt.meta", "fxadapt.options", "fxadapt.dist", "fxadapt.examples",
        "fxadapt.frames", "fxadapt.ir.inputs"}
RANK = {"core": 0, "ir": 1, "ops": 2, "passes": 3, "analysis": 4, "hw": 5, "planning": 6, "train": 7,
        "search": 8, "checks": 9, "writeback": 10, "pipeline": 11, "export": 12, "(root)": 13, "cli": 14}
HEAVY = {"onnx", "onnxscript", "onnxsim", "onnxruntime", "transformers", "matplotlib", "tqdm", "networkx",
         "scipy", "sklearn", "pytorchcv", "torch_pruning", "huggingface_hub", "safetensors", "accelerate"}

# (a) upward imports that exist today, (from_module, to_module). Only ever delete entries.
UPWARD_ALLOWED: set[tuple[str, str]] = {
    # (empty: every entry was removed; never add one)
}

# (b) import-time edges that close a cycle today (both ends in one strongly connected set).
CYCLE_ALLOWED: set[tuple[str, str]] = {
}

# (c) private names imported across modules today: (from_module, to_module, name).
PRIVATE_ALLOWED: set[tuple[str, str, str]] = {
    # (empty: every entry was removed; never add one)
}

# (d) function-level imports without a ``# deferred:`` reason today: (from_module, to_module).
DEFERRED_ALLOWED: set[tuple[str, str]] = {
    # (empty: every entry was removed; never add one)
}


@dataclass(frozen=True)
class Imp:
    src: str          # importing module
    dst: str          # imported module (an fxadapt module, or the top-level name of a third-party one)
    name: str | None  # the name taken by ``from ... import name``
    line: int
    in_function: bool
    type_only: bool   # under ``if TYPE_CHECKING:``
    reason: bool      # a ``# deferred:`` comment on one of the statement's lines


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[0] == "passes":
        parts = ["fxadapt", "passes", *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_files(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for d in ("fxadapt", "passes") for p in sorted((root / d).rglob("*.py"))
            if "__pycache__" not in p.parts}


def layer(module: str) -> str:
    if module in CORE:
        return "core"
    if module == "fxadapt":
        return "(root)"
    if module == "fxadapt.__main__":
        return "cli"
    return module.split(".")[1]


def imports_of(module: str, source: str, modules: set[str], is_package: bool = False) -> list[Imp]:
    """Every import in ``source`` of an fxadapt module or a heavy optional dependency."""
    lines = source.splitlines()
    out: list[Imp] = []

    def known(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or "fxadapt"

    def add(dst: str, name: str | None, node: ast.stmt, in_function: bool, type_only: bool) -> None:
        text = "\n".join(lines[node.lineno - 1:(node.end_lineno or node.lineno)])
        out.append(Imp(module, dst, name, node.lineno, in_function, type_only, "# deferred:" in text))

    def visit(node: ast.AST, in_function: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    top = alias.name.partition(".")[0]
                    if top == "fxadapt":
                        add(known(alias.name), None, child, in_function, type_only)
                    elif top in HEAVY:
                        add(top, None, child, in_function, type_only)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    package = module if is_package else module.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}" if base else package
                top = base.partition(".")[0]
                if top == "fxadapt":
                    for alias in child.names:
                        full = f"{base}.{alias.name}"
                        dst = full if full in modules else known(base)
                        add(dst, alias.name, child, in_function, type_only)
                elif top in HEAVY:
                    add(top, None, child, in_function, type_only)
            fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            tc = type_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            visit(child, fn, tc)

    visit(ast.parse(source), False, False)
    return out


def all_imports(root: Path = ROOT) -> list[Imp]:
    files = source_files(root)
    modules = set(files)
    return [imp for m, p in files.items()
            for imp in imports_of(m, p.read_text(), modules, is_package=p.name == "__init__.py")]


def upward(imps: list[Imp]) -> set[tuple[str, str]]:
    return {(i.src, i.dst) for i in imps if i.dst.startswith("fxadapt")
            and RANK.get(layer(i.dst), -1) > RANK.get(layer(i.src), -1)}


def strongly_connected(edges: set[tuple[str, str]]) -> list[set[str]]:
    """Tarjan's strongly connected components with more than one member."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in list(graph):
        if v not in index:
            connect(v)
    return out


def cycle_edges(imps: list[Imp]) -> tuple[set[tuple[str, str]], list[set[str]], list[set[str]]]:
    """Import-time edges inside a cycle of modules or of layers; the cycles of modules and of layers.

    A cycle of layers always holds an upward import, which (a) flags too; its other edges are listed here so
    that an allowlisted upward import cannot close a new cycle unnoticed. A submodule importing its own
    package's ``__init__`` is not counted.
    """
    edges = {(i.src, i.dst) for i in imps if i.dst.startswith("fxadapt") and not i.in_function
             and not i.type_only and i.src != i.dst and not i.src.startswith(i.dst + ".")}
    module_sccs = strongly_connected(edges)
    layer_sccs = strongly_connected({(layer(a), layer(b)) for a, b in edges if layer(a) != layer(b)})
    inside = {(a, b) for a, b in edges for c in module_sccs if a in c and b in c}
    inside |= {(a, b) for a, b in edges for c in layer_sccs
               if layer(a) != layer(b) and layer(a) in c and layer(b) in c}
    return inside, module_sccs, layer_sccs


def private(imps: list[Imp]) -> set[tuple[str, str, str]]:
    return {(i.src, i.dst, i.name) for i in imps if i.name and i.name.startswith("_")
            and not i.name.startswith("__") and i.src != i.dst}


def undeferred(imps: list[Imp]) -> set[tuple[str, str]]:
    return {(i.src, i.dst) for i in imps if i.in_function and not i.reason}


def _found() -> dict[str, tuple[set, set]]:
    imps = all_imports()
    cycles, _, _ = cycle_edges(imps)
    return {"upward": (upward(imps), set(UPWARD_ALLOWED)), "cycle": (cycles, set(CYCLE_ALLOWED)),
            "private": (private(imps), set(PRIVATE_ALLOWED)),
            "undeferred": (undeferred(imps), set(DEFERRED_ALLOWED))}


def test_layering():
    found = _found()
    new = {kind: sorted(got - allowed) for kind, (got, allowed) in found.items()}
    counts = ", ".join(f"{kind}: {len(got)} found, {len(allowed)} allowed, {len(new[kind])} new"
                       for kind, (got, allowed) in found.items())
    if any(new.values()):
        imps = all_imports()
        line = {}
        for i in imps:
            line.setdefault((i.src, i.dst), i.line)
            line.setdefault((i.src, i.dst, i.name), i.line)
        detail = "\n".join(f"  {kind}: {entry}  (line {line.get(entry)})"
                           for kind, entries in new.items() for entry in entries)
        _, module_sccs, layer_sccs = cycle_edges(imps)
        cycles = "\n".join(f"  cycle: {sorted(c)}" for c in layer_sccs + module_sccs)
        raise AssertionError(f"new import-layering violations ({counts}); see tests/test_layering.py's "
                             f"docstring for the contract:\n{detail}\n{cycles}")


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in source_files() if layer(m) not in RANK)
    assert not unplaced, f"modules in no layer (add them to CORE or their package to RANK): {unplaced}"


def test_allowlists_shrink():
    found = _found()
    stale = {kind: sorted(allowed - got) for kind, (got, allowed) in found.items()}
    detail = "\n".join(f"  {kind}: {entry}" for kind, entries in stale.items() for entry in entries)
    counts = ", ".join(f"{kind}: {len(entries)} stale" for kind, entries in stale.items())
    assert not any(stale.values()), f"fixed violations still allowlisted ({counts}); delete:\n{detail}"


def test_contract_catches_an_upward_import_a_cycle_a_private_name_and_an_undeferred_import(tmp_path):
    for rel, text in {
        "fxadapt/__init__.py": "",
        "fxadapt/meta.py": "",
        "fxadapt/ir/__init__.py": "",
        "fxadapt/ir/capture.py": "from fxadapt.planning import plan\n",            # upward
        "fxadapt/planning/__init__.py": "",
        "fxadapt/planning/plan.py": "from fxadapt.planning.solver import _bounds\n",  # private, cycle
        "fxadapt/planning/solver.py": ("import fxadapt.planning.plan\n"
                                       "def f():\n    import onnx\n"                     # undeferred
                                       "def g():\n    import onnx  # deferred: heavy, export only\n"),
        "fxadapt/ops/__init__.py": "",
        "fxadapt/ops/core.py": "from fxadapt.ir import capture\n",                     # ir <- ops ...
        "fxadapt/planning/align.py": "import fxadapt.ops.core\n",                      # ... <- planning <- ir
        "passes/__init__.py": "",
        "passes/fold_bn.py": "from fxadapt import meta\nfrom fxadapt import capture\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    imps = all_imports(tmp_path)
    assert upward(imps) == {("fxadapt.ir.capture", "fxadapt.planning.plan"),
                            ("fxadapt.passes.fold_bn", "fxadapt")}
    assert cycle_edges(imps)[0] == {("fxadapt.planning.plan", "fxadapt.planning.solver"),
                                    ("fxadapt.planning.solver", "fxadapt.planning.plan"),
                                    ("fxadapt.ir.capture", "fxadapt.planning.plan"),
                                    ("fxadapt.planning.align", "fxadapt.ops.core"),
                                    ("fxadapt.ops.core", "fxadapt.ir.capture")}
    assert private(imps) == {("fxadapt.planning.plan", "fxadapt.planning.solver", "_bounds")}
    assert undeferred(imps) == {("fxadapt.planning.solver", "onnx")}
    assert {i.dst for i in imps if i.src == "fxadapt.passes.fold_bn"} == {"fxadapt.meta", "fxadapt"}
