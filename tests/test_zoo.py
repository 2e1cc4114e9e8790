"""Zoo sweep: every pytorchcv model of ``../shared/zoo/pytorchcv.tsv`` captures, analyses, costs within 1% of
``FlopCounterMode``, explains every frozen group and leaves the caller's model untouched; and its coupled
conv/linear groups agree with Torch-Pruning 1.6.1's ``DependencyGraph`` (the oracle), up to the known and
justified differences listed in ``KNOWN_DIFFERENCES``.

The default run covers a few small models plus two hand-written ones (pixel shuffle, transformer encoder);
``pytest -m slow tests/test_zoo.py`` sweeps the whole zoo. ``bench/zoo_report.py`` prints the same checks as
a table with totals.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
import zoo_harness as zh
from torch import nn

# A missing or empty zoo list is an error, not a skip: ``test_zoo_list_is_present`` fails and every zoo test
# fails with the same message (the slow sweep would otherwise be an empty, silently skipped parametrization).
ENTRIES = {e.factory: e for e in zh.zoo_entries()} if zh.ZOO_TSV.is_file() else {}
QUICK = ("resnet20_cifar10", "mobilenetv2_w1", "shufflenetv2_w1", "densenet40_k12_cifar10")
QUICK_ORACLE = ("resnet20_cifar10", "mobilenetv2_w1", "diapreresnet20_cifar10")  # the last shares modules
MISSING = f"zoo list missing or empty: {zh.ZOO_TSV} (the checkout's ../shared/zoo/pytorchcv.tsv)"

# Where fxadapt's partition of conv/linear output channels differs from Torch-Pruning's, and why.
# Categories (see zoo_harness.classify / compare):
#   "ours-finer": each of our groups lies inside one TP group. A module's output channels that are split
#       or concatenated land in several of our groups, one per slice, each prunable on its own (sites
#       record the split/cat sizes); TP prunes the whole concatenation as one group.
#   "tp-overlap": TP's groups are not a partition: a module's output channels sit in several TP groups.
#   "tp-empty": TP's graph holds no conv/linear group at all.
#   "agree-on-common": the modules both sides group are grouped alike; some modules only one side groups.
KNOWN_DIFFERENCES = {
    # FactorizedReduce: cat(conv1(x), conv2(x[..., 1:, 1:])) -> one slice group per conv.
    "darts": "ours-finer",
    # Dual path blocks split conv3's output into a residual part and a growing dense (cat) part.
    "dpn68": "ours-finer",
    # MixConv: chunks of the channels go through convs of different kernel sizes and are concatenated.
    "mixnet_s": "ours-finer",
    # CBAM's spatial gate conv has ONE output channel, broadcast over the C channels it scales: TP couples
    # it into the trunk group (treats the broadcast multiply as element-wise); we keep it apart (frozen).
    "cbam_resnet50": "ours-finer",
    # Grouped 1x1 convs around a channel shuffle: TP's groups overlap (its pruning crashes: RuntimeError
    # in the zoo list). Ours: the grouped conv keeps the same positions in every group, which composed
    # with the shuffle's interleave chains all positions of each compress conv into one unit (frozen).
    "shufflenet_g3_w1": "tp-overlap",
    # Every conv is followed by ReLU(inplace=True): TP reads grad_fn after the in-place op and sees no
    # conv at all (its macs ratio is 1.0 in the zoo list).
    "nin_cifar10": "tp-empty",
    # OctConv calls F.conv2d(x, self.weight[:oc, :ic]): we freeze the 11 convs whose weight is computed
    # at run time (no group); TP groups them. The modules both group agree.
    "octresnet10_ad2": "agree-on-common",
}

# Models where every group is frozen, and why (each group still carries its reason).
NOTHING_PRUNABLE = {
    "octresnet10_ad2": "OctConv slices its weights at run time: F.conv2d(x, self.weight[:oc, :ic])",
}


# Models Torch-Pruning cannot build its dependency graph for (also failing in the zoo list's TP column).
TP_FAILS = {
    "shufflenetv2_w1": "ZeroDivisionError",
    "shufflenetv2b_w1": "ZeroDivisionError",
}


@functools.lru_cache(maxsize=4)
def _zoo_result(factory: str) -> tuple:
    assert ENTRIES, MISSING
    assert factory in ENTRIES, f"{factory} is not in {zh.ZOO_TSV}"
    model, x = zh.build(ENTRIES[factory])
    return model, x, zh.check_model(factory, model, x)


def _assert_sweep(r: zh.ZooResult) -> None:
    assert r.captured and r.analyzed, r.failure
    assert r.cost_ok, f"{r.name}: {r.failure}"
    assert r.groups_ok, [g for g in r.analysis.groups if not g.prunable and not g.reason]
    assert r.untouched, f"{r.name}: the caller's model changed (weights or training flag)"
    assert (r.n_prunable == 0) == (r.name in NOTHING_PRUNABLE), [g.reason for g in r.analysis.groups]


def _assert_oracle(factory: str) -> None:
    model, x, r = _zoo_result(factory)
    assert r.analyzed, r.failure
    o = zh.oracle(factory, model, x, r.analysis)
    if factory in TP_FAILS:
        assert not o.ok and TP_FAILS[factory] in o.failure, "Torch-Pruning builds now: compare it"
        return
    assert o.ok, o.failure
    assert o.category \
            == KNOWN_DIFFERENCES.get(factory, "agree"), (o.only_ours[:3], o.only_tp[:3], o.unmatched)


@pytest.mark.parametrize("factory", QUICK)
def test_zoo_quick(factory):
    _assert_sweep(_zoo_result(factory)[2])


@pytest.mark.parametrize("factory", QUICK_ORACLE)
def test_oracle_quick(factory):
    _assert_oracle(factory)


@pytest.mark.slow
@pytest.mark.parametrize("factory", list(ENTRIES) or ["<zoo list missing>"])
def test_zoo_model(factory):
    """The whole zoo (``-m slow``): every sweep check, then the oracle comparison, model by model."""
    _assert_sweep(_zoo_result(factory)[2])
    _assert_oracle(factory)


def test_zoo_list_is_present():
    assert ENTRIES, MISSING
    assert len(ENTRIES) >= 50, f"only {len(ENTRIES)} models in {zh.ZOO_TSV}"
    assert set(QUICK) | set(QUICK_ORACLE) <= set(ENTRIES)


def test_known_differences_are_zoo_models():
    assert ENTRIES, MISSING
    named = set(KNOWN_DIFFERENCES) | set(NOTHING_PRUNABLE) | set(TP_FAILS)
    assert named <= set(ENTRIES), sorted(named - set(ENTRIES))


def test_zoo_packages_import():
    """pytorchcv (the zoo) and torch_pruning (the oracle) are test requirements: a missing one fails here."""
    from importlib.metadata import version

    import pytorchcv.models.resnet  # noqa: F401  (``pip install --no-deps pytorchcv``, see README)
    import torch_pruning  # noqa: F401

    assert version("torch-pruning") == "1.6.1"  # the oracle's differences below were recorded with 1.6.1


# ------------------------------------------------------------------------------------------------
# Two models beside the zoo: super-resolution with pixel shuffle, and a transformer encoder
# ------------------------------------------------------------------------------------------------
class SuperRes(nn.Module):
    """ESPCN-style: features, a residual conv, conv to ``C * r^2``, pixel shuffle, conv to RGB."""

    def __init__(self, c: int = 16, mid: int = 8, r: int = 2):
        super().__init__()
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Conv2d(c, c, 3, padding=1)
        self.up = nn.Conv2d(c, mid * r * r, 3, padding=1)
        self.shuffle = nn.PixelShuffle(r)
        self.tail = nn.Conv2d(mid, 3, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.head(x))
        h = h + F.relu(self.body(h))
        return self.tail(F.relu(self.shuffle(self.up(h))))


class Encoder(nn.Module):
    """Token embedding, two ``nn.TransformerEncoderLayer`` (d_model 32, 4 heads), mean-pool, linear head."""

    def __init__(self, vocab: int = 50, d: int = 32, ffn: int = 64, classes: int = 5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, ffn, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids)).mean(1))


def _by_name(a) -> dict:
    return {g.name: g for g in a.groups}


def test_pixel_shuffle_model():
    torch.manual_seed(0)
    r = zh.check_model("superres", SuperRes().eval(), torch.randn(1, 3, 16, 16))
    _assert_sweep(r)
    groups = _by_name(r.analysis)
    assert r.macs == r.ref_macs
    assert (groups["head"].width, groups["head"].prunable) == (16, True)
    up = groups["up"]
    assert (up.width, up.units, up.granularity, up.prunable) == (32, 8, 4, True)
    assert {m.target for m in up.members if m.site.role == "in"} == {"tail.weight"}
    assert not groups["tail"].prunable and "output" in groups["tail"].reason
    assert r.analysis.fired["pixel_shuffle"] == 1


def test_transformer_encoder():
    torch.manual_seed(0)
    model = Encoder().train()
    r = zh.check_model("encoder", model, torch.randint(0, 50, (1, 10)))
    _assert_sweep(r)
    assert model.training and r.analysis.gm.training
    a = r.analysis
    assert abs(r.macs - r.ref_macs) <= 1e-6 * r.ref_macs
    assert a.fired["sdpa"] == 2 and a.fired["blocked"] == 0
    groups = _by_name(a)
    stream = groups["emb"]      # the residual stream: embedding, both out_proj and linear2 outputs, norms
    outs = {m.site.ref.module_path for m in stream.members if m.site.role == "out"}
    assert {f"enc.layers.{i}.{n}" for i in (0, 1) for n in ("self_attn.out_proj", "linear2")} <= outs
    assert (stream.width, stream.prunable) == (32, True)
    for i in (0, 1):
        ffn = groups[f"enc.layers.{i}.linear1"]
        assert (ffn.width, ffn.granularity, ffn.prunable) == (64, 1, True)
        attn = groups[f"enc.layers.{i}.self_attn"]   # in_proj: q, k, v x 4 heads share head_dim units
        assert (attn.width, attn.units) == (96, 8)
    assert not groups["head"].prunable


# ------------------------------------------------------------------------------------------------
# Regressions the sweep found, on small models
# ------------------------------------------------------------------------------------------------
class HeadSplit(nn.Module):
    """``view(B * heads, ...)``: export sizes the axis ``4*s0``; at batch 1 it is 4, not 1."""

    def __init__(self):
        super().__init__()
        self.proj, self.out = nn.Linear(16, 32), nn.Linear(8, 3)

    def forward(self, x):
        h = self.proj(x)                                   # [B, T, 32]
        h = h.view(x.shape[0] * 4, x.shape[1], 8)          # [4B, T, 8]: 4 heads of 8
        return self.out(h).mean(0)


def test_symbolic_sizes_are_evaluated_at_the_example_batch():
    r = zh.check_model("headsplit", HeadSplit().eval(), torch.randn(1, 6, 16))
    _assert_sweep(r)
    a = r.analysis
    assert r.macs == r.ref_macs == 6 * 16 * 32 + 4 * 6 * 8 * 3
    assert a.fired["blocked"] == 0 and a.fired["sym_arith"] >= 1    # 4 * s0 is SymInt arithmetic
    proj = _by_name(a)["proj"]
    assert (proj.width, proj.units, proj.prunable) == (32, 8, True)   # head_dim units, shared by the heads


class SlicedWeight(nn.Module):
    """OctConv-style: the conv weight is a slice of a parameter, computed at run time."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.weight = nn.Parameter(torch.randn(16, 8, 3, 3))

    def forward(self, x):
        return F.conv2d(self.stem(x), self.weight[:12])


def test_cost_counts_convs_with_computed_weights():
    r = zh.check_model("sliced", SlicedWeight().eval(), torch.randn(1, 3, 12, 12))
    assert r.cost_ok and r.macs == r.ref_macs == 100 * 8 * 27 + 64 * 12 * 72
    stem = _by_name(r.analysis)["stem"]
    assert not stem.prunable and "computed at run time" in stem.reason
