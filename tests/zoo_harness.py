"""Zoo sweep harness shared by ``tests/test_zoo.py`` and ``bench/zoo_report.py``.

For one model and example input it records how far fxadapt gets (captured / analysed / cost within 1% of
``FlopCounterMode`` / every group prunable or explained / caller's model untouched), and compares the
coupled conv/linear output-channel partition with Torch-Pruning's ``DependencyGraph`` (the oracle).

Partitions: a group is the set of conv/linear module paths whose *output* channels it slices. Ours: every
fxadapt ``Group`` member with role ``out`` (a producer) or ``dw`` (a depthwise conv, which carries its
input's labels). Torch-Pruning's: ``get_all_groups`` over conv/linear roots, each dependency whose handler
prunes output channels. The partitions are compared on the modules both sides group; ``classify`` names
the kind of difference, and modules grouped by one side only are counted apart (``unmatched``).
"""

from __future__ import annotations

import copy
import importlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import fxadapt

ZOO_TSV = Path(__file__).resolve().parents[2] / "shared" / "zoo" / "pytorchcv.tsv"
COST_TOL = 0.01


@dataclass(frozen=True)
class ZooEntry:
    module: str
    factory: str
    shape: tuple[int, ...]
    tp: str           # what Torch-Pruning 1.6.1 did with it (the list's last column)


def zoo_entries(path: Path = ZOO_TSV) -> list[ZooEntry]:
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        module, factory, shape, tp = (line.split("\t") + [""])[:4]
        rows.append(ZooEntry(module, factory, tuple(int(s) for s in shape.split("x")), tp))
    return rows


def build(entry: ZooEntry) -> tuple[nn.Module, torch.Tensor]:
    """Random-init pytorchcv model in eval mode (never through ``model_provider``: it imports torchvision)."""
    mod = importlib.import_module("pytorchcv.models." + entry.module)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(mod, entry.factory)(pretrained=False).eval()
    return model, torch.randn(*entry.shape)


def reference_macs(model: nn.Module, x: torch.Tensor) -> float:
    """``FlopCounterMode`` total / 2, on the unfused paths it can see.

    On CPU, ``scaled_dot_product_attention`` runs a fused kernel FlopCounterMode has no formula for, and
    ``nn.TransformerEncoderLayer``'s eval fast path is one fused op: both would count 0. The math SDPA
    backend (two ``bmm``) and the slow MHA path compute the same function and are counted.
    """
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return fc.get_total_flops() / 2


@dataclass
class ZooResult:
    name: str
    captured: bool = False
    analyzed: bool = False
    cost_ok: bool = False
    groups_ok: bool = False
    untouched: bool = False
    macs: float = 0.0
    ref_macs: float = 0.0
    n_groups: int = 0
    n_prunable: int = 0
    seconds: float = 0.0
    failure: str = ""
    analysis: object = field(default=None, repr=False)


def _snapshot(model: nn.Module) -> tuple[dict, dict]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, {n: m.training for n, m in model.named_modules()}


def _same(model: nn.Module, snap: tuple[dict, dict]) -> bool:
    state, modes = snap
    now = model.state_dict()
    if now.keys() != state.keys() or modes != {n: m.training for n, m in model.named_modules()}:
        return False
    return all(now[k].shape == v.shape and torch.equal(now[k], v) for k, v in state.items())


def check_model(name: str, model: nn.Module, x: torch.Tensor) -> ZooResult:
    """Capture + analyse ``model``; record every property the zoo sweep asserts (never raises)."""
    r = ZooResult(name)
    snap = _snapshot(model)
    t0 = time.perf_counter()
    try:
        gm = fxadapt.capture(model, (x,))
        r.captured = True
        a = fxadapt.analyze(gm)
        r.analyzed, r.analysis = True, a
        r.macs = a.macs()
        r.n_groups, r.n_prunable = len(a.groups), len(a.prunable)
        r.groups_ok = all(g.prunable or (g.reason or "").strip() for g in a.groups)
    except Exception as e:  # noqa: BLE001 - recorded as the failure reason
        r.failure = (f"{'analyze' if r.captured else 'capture'}: {type(e).__name__}: "
                     f"{str(e).splitlines()[0][:200] if str(e) else ''}")
    r.seconds = time.perf_counter() - t0
    r.untouched = _same(model, snap)
    if r.analyzed:
        r.ref_macs = reference_macs(model, x)
        r.cost_ok = abs(r.macs - r.ref_macs) <= COST_TOL * max(r.ref_macs, 1.0)
        if not r.cost_ok:
            r.failure = f"cost: ours {r.macs:.4g} vs FlopCounterMode {r.ref_macs:.4g} MACs"
        elif not r.groups_ok:
            r.failure = "a frozen group has no reason"
    if not r.untouched:
        r.failure = (r.failure + "; " if r.failure else "") + "input model was mutated"
    return r


# ------------------------------------------------------------------------------------------------
# Oracle: Torch-Pruning's coupled groups
# ------------------------------------------------------------------------------------------------
Partition = set[frozenset[str]]


def our_partition(a, model: nn.Module | None = None) -> Partition:
    """For every fxadapt group, the conv/linear modules whose output channels it slices.

    With ``model``, paths are renamed to the module's first name in ``model.named_modules()`` (as
    Torch-Pruning names them): a module shared by several call sites is named after its last use by
    ``torch.export``.
    """
    canon = {m: n for n, m in reversed(list(model.named_modules(remove_duplicate=False)))} if model else {}
    out: Partition = set()
    for g in a.groups:
        paths = {m.site.ref.module_path for m in g.members if m.site.role in ("out", "dw") and m.site.ref}
        mods = frozenset(canon.get(_module(model, p), p) if model else p for p in paths
                         if isinstance(_module(a.gm, p), (nn.modules.conv._ConvNd, nn.Linear)))
        if mods:
            out.add(mods)
    return out


def _module(root: nn.Module, path: str):
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def tp_partition(model: nn.Module, x: torch.Tensor) -> Partition:
    """Torch-Pruning 1.6.1's coupled groups of conv/linear output channels (raises if TP cannot trace)."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    names = {m: n for n, m in model.named_modules()}
    out: Partition = set()
    for group in dg.get_all_groups(root_module_types=(nn.modules.conv._ConvNd, nn.Linear)):
        mods = frozenset(names[dep.target.module] for dep, _ in group
                         if dg.is_out_channel_pruning_fn(dep.handler)
                         and isinstance(dep.target.module, (nn.modules.conv._ConvNd, nn.Linear)))
        if mods:
            out.add(mods)
    return out


@dataclass
class OracleResult:
    name: str
    ok: bool = False                       # TP built its graph
    category: str = ""                     # see classify()
    only_ours: list = field(default_factory=list)   # groups in our partition and not TP's
    only_tp: list = field(default_factory=list)
    compared: int = 0                      # conv/linear modules both sides group
    unmatched: tuple[int, int] = (0, 0)    # modules only we / only TP group (left out of the comparison)
    failure: str = ""

    @property
    def agree(self) -> bool:
        return self.category == "agree"


def _overlaps(p: Partition) -> bool:
    return sum(len(g) for g in p) != len(set().union(*p)) if p else False


def classify(ours: Partition, theirs: Partition) -> str:
    """``agree``; ``tp-overlap`` (TP's groups are not a partition); ``ours-finer`` (each of our groups lies
    inside one TP group: we split a TP group into slices); ``ours-coarser`` (each TP group lies inside one of
    ours: we couple more); else ``differ``."""
    if ours == theirs:
        return "agree"
    if _overlaps(theirs):
        return "tp-overlap"
    if all(any(g <= t for t in theirs) for g in ours):
        return "ours-finer"
    if all(any(t <= g for g in ours) for t in theirs):
        return "ours-coarser"
    return "differ"


def compare(name: str, ours: Partition, theirs: Partition) -> OracleResult:
    """Compare partitions restricted to modules both sides see."""
    common = set().union(*ours) & set().union(*theirs) if ours and theirs else set()
    a = {frozenset(g & common) for g in ours if g & common}
    b = {frozenset(g & common) for g in theirs if g & common}
    unmatched = (len(set().union(*ours) - common), len(set().union(*theirs) - common))
    category = classify(a, b) if theirs else "tp-empty"   # TP found no group at all
    if category == "agree" and unmatched != (0, 0):
        category = "agree-on-common"   # the modules both group agree; some are grouped by one side only
    return OracleResult(name, True, category, sorted(map(sorted, a - b)), sorted(map(sorted, b - a)),
                        len(common), unmatched)


def oracle(name: str, model: nn.Module, x: torch.Tensor, analysis) -> OracleResult:
    try:
        theirs = tp_partition(model, x)
    except Exception as e:  # noqa: BLE001 - TP's own limits are reported, not ours
        return OracleResult(name, failure=f"torch_pruning: {type(e).__name__}: {str(e)[:120]}")
    return compare(name, our_partition(analysis, model), theirs)
