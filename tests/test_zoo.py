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

ENTRIES = {e.factory: e for e in zh.zoo_entries()} if zh.ZOO_TSV.exists() else {}
QUICK = ("resnet20_cifar10", "mobilenetv2_w1", "shufflenetv2_w1", "densenet40_k12_cifar10")
QUICK_ORACLE = ("resnet20_cifar10", "mobilenetv2_w1")
needs_zoo = pytest.mark.skipif(not ENTRIES, reason=f"zoo list not found at {zh.ZOO_TSV}")

# Where fxadapt's partition of conv/linear output channels differs from Torch-Pruning's, and why.
# Categories (see zoo_harness.classify):
#   "ours-finer": a module's output channels are concatenated/split into several of our groups, each a
#       slice we can prune on its own; merging our groups that share a module gives TP's partition.
#   "tp-overlap": TP's groups are not a partition (a module's output channels are in several TP groups,
#       TP double-prunes them; its pruning fails on these models in the zoo list).
KNOWN_DIFFERENCES = {
    "darts": "ours-finer",               # FactorizedReduce: cat(conv1(x), conv2(x')) -> two slices
    "shufflenet_g3_w1": "tp-overlap",    # grouped 1x1 convs + channel shuffle
    "dpn68": "ours-finer",               # dual path: split(conv3 out) into residual / dense parts
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
    pytest.importorskip("pytorchcv")
    model, x = zh.build(ENTRIES[factory])
    return model, x, zh.check_model(factory, model, x)


def _assert_sweep(r: zh.ZooResult) -> None:
    assert r.captured and r.analyzed, r.failure
    assert r.cost_ok, f"{r.name}: {r.failure}"
    assert r.groups_ok, [g for g in r.analysis.groups if not g.prunable and not g.reason]
    assert r.untouched, f"{r.name}: the caller's model changed (weights or training flag)"
    assert (r.n_prunable == 0) == (r.name in NOTHING_PRUNABLE), [g.reason for g in r.analysis.groups]


def _assert_oracle(factory: str) -> None:
    pytest.importorskip("torch_pruning")
    model, x, r = _zoo_result(factory)
    assert r.analyzed, r.failure
    o = zh.oracle(factory, model, x, r.analysis)
    if factory in TP_FAILS:
        assert not o.ok and TP_FAILS[factory] in o.failure, "Torch-Pruning builds now: compare it"
        return
    assert o.ok, o.failure
    assert o.category == KNOWN_DIFFERENCES.get(factory, "agree"), (o.only_ours[:3], o.only_tp[:3], o.unmatched)


@needs_zoo
@pytest.mark.parametrize("factory", QUICK)
def test_zoo_quick(factory):
    _assert_sweep(_zoo_result(factory)[2])


@needs_zoo
@pytest.mark.parametrize("factory", QUICK_ORACLE)
def test_oracle_quick(factory):
    _assert_oracle(factory)


@needs_zoo
@pytest.mark.slow
@pytest.mark.parametrize("factory", list(ENTRIES))
def test_zoo_model(factory):
    """The whole zoo (``-m slow``): every sweep check, then the oracle comparison, model by model."""
    _assert_sweep(_zoo_result(factory)[2])
    _assert_oracle(factory)


def test_known_differences_are_zoo_models():
    assert set(KNOWN_DIFFERENCES) | set(NOTHING_PRUNABLE) | set(TP_FAILS) <= set(ENTRIES) or not ENTRIES


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
