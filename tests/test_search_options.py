"""Search options and guarantees: no silent no-op (steps <= warmup shrinks the warm-up and says so; no
steps is an error), the history says how far each gate moved, the sandwich rule runs and lands on budget,
and sharded batches reassemble the global batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from models import ResNetTiny

import fxadapt
from fxadapt.errors import FxAdaptError
from fxadapt.pipeline.transform import TransformConfig
from fxadapt.search.dna import SearchConfig, SearchConfigError, effective_warmup
from fxadapt.search.supernet import SupernetConfig
from fxadapt.train.data import Batches

X1 = torch.randn(1, 3, 8, 8)
gen = torch.Generator().manual_seed(0)
DATA = (torch.randn(64, 3, 8, 8, generator=gen), torch.randint(0, 5, (64,), generator=gen))
# the Markov gates in the grown supernet: the sandwich rule, alpha entropies and the max-net = init-net
# check are theirs
FAST = SearchConfig(steps=8, warmup=3, batch_size=16, progress=False, supernet=SupernetConfig(gates="markov"),
                    elastic_when_shrinking=True)


@pytest.fixture(scope="module")
def model():
    return ResNetTiny().eval()


def _ratio(out) -> float:
    rep = fxadapt.report(out)
    return rep.macs_after / rep.macs_before


def test_steps_at_or_below_warmup_shrink_the_warmup_with_a_note(model):
    cfg = TransformConfig(search=dataclasses.replace(FAST, steps=8, warmup=50))
    out = fxadapt.transform(model, 0.5, (X1,), data=DATA, strategy="dna", config=cfg)
    hist = fxadapt.report(out).history
    assert "warm-up shrunk to 2" in hist[-1]["note"]
    assert sum(h["val_loss"] == h["val_loss"] for h in hist[:-1]) == 6      # 6 gate steps ran (not NaN)
    assert effective_warmup(FAST) == (3, None)


def test_no_steps_is_an_error():
    with pytest.raises(SearchConfigError, match="steps must be at least 1") as e:
        effective_warmup(dataclasses.replace(FAST, steps=0))
    assert isinstance(e.value, FxAdaptError) and "\n" not in str(e.value)


def test_history_says_how_far_each_gate_moved(model):
    out = fxadapt.transform(model, 0.5, (X1,), data=DATA, strategy="dna", config=TransformConfig(search=FAST))
    rep = fxadapt.report(out)
    gates = rep.history[-1]["gates"]
    assert {g["group"] for g in gates} and all({"initial", "final", "chosen"} <= set(g) for g in gates)
    assert any(g["final"] != g["initial"] for g in gates)           # the budget loss moved some gate
    assert rep.history[-1]["depth_gates"] and "gates" in rep.to_dict()["history"][-1]


def test_fur_history_lists_width_moves(model):
    from fxadapt.search.fur import FurConfig

    fur = FurConfig(iterations=2, train_steps=2, batch_size=16, draws=1, val_samples=32, progress=False)
    out = fxadapt.transform(model, 0.5, (X1,), data=DATA, strategy="fur", config=TransformConfig(fur=fur))
    moves = fxadapt.report(out).history[-1]["widths"]
    assert all({"initial", "final"} <= set(m) for m in moves)


def test_sandwich_rule_lands_on_budget_and_trains_weights(model):
    cfg = TransformConfig(search=dataclasses.replace(FAST, sandwich=True))
    out = fxadapt.transform(model, 0.5, (X1,), data=DATA, strategy="dna", config=cfg)
    assert 0.495 <= _ratio(out) <= 0.5
    plain = fxadapt.transform(model, 0.5, (X1,), data=DATA, strategy="dna",   # task-loss weight steps (kd=0)
                              config=TransformConfig(search=dataclasses.replace(FAST, kd=0.0)))
    # max net = init net (the sandwich's max net takes the task loss)
    assert fxadapt.report(out).history[0]["loss"] == fxadapt.report(plain).history[0]["loss"]
    assert fxadapt.report(out).history[-2]["loss"] != fxadapt.report(plain).history[-2]["loss"]


@pytest.mark.parametrize("world", [2, 3])
def test_shards_reassemble_the_global_batch(world):
    full = Batches(DATA, 16, 5)
    ds = torch.utils.data.TensorDataset(*DATA)

    class Plain(torch.utils.data.Dataset):                  # a map-style dataset read item by item
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return ds[i][0], int(ds[i][1])

    for step in (0, 3, 7):
        for src in (DATA, Plain(), torch.utils.data.DataLoader(ds, batch_size=16)):
            parts = [Batches(src, 16, 5, r, world).batch(step) for r in range(world)]
            torch.testing.assert_close(torch.cat([p[1] for p in parts]), full.batch(step)[1], rtol=0, atol=0)


def test_hardened_gates_end_decisive_and_entropy_penalty_lowers_entropy(model):
    """``harden``: the last fraction of steps trains with 0/1 gates (entropy ~0 at the end); a ramped
    entropy penalty ends with lower gate entropy than the defaults; both land on the budget."""
    def run(**over):
        cfg = TransformConfig(search=dataclasses.replace(FAST, steps=12, **over))
        out = fxadapt.transform(model, 0.5, (X1,), data=DATA, strategy="dna", config=cfg)
        steps = [h for h in fxadapt.report(out).history if "step" in h]
        return out, steps[-1]["entropy"]

    hard, h_hard = run(harden=0.25)
    _, h_default = run()
    _, h_pen = run(entropy_weight=20.0)
    assert h_hard < 0.01 < h_default and h_pen < h_default
    assert 0.45 <= _ratio(hard) <= 0.5
    with pytest.raises(SearchConfigError):
        run(discretize_by="median")


def test_arch_every_skips_gate_steps_and_refuses_zero(model):
    import math

    cfg = TransformConfig(search=dataclasses.replace(FAST, steps=12, arch_every=3))
    out = fxadapt.transform(model, 0.5, (X1,), data=DATA, strategy="dna", config=cfg)
    gated = [h["step"] for h in fxadapt.report(out).history if "step" in h and not math.isnan(h["val_loss"])]
    assert gated == [3, 6, 9] and 0.495 <= _ratio(out) <= 0.5
    with pytest.raises(SearchConfigError, match="arch_every"):
        fxadapt.transform(model, 0.5, (X1,), data=DATA, strategy="dna",
                          config=TransformConfig(search=dataclasses.replace(FAST, arch_every=0)))


class _TinyAttention(torch.nn.Module):
    """q/k/v projections, softmax attention, an MLP: what ``w_optimizer="auto"`` must recognise."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.fc = torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)
        return self.fc(self.out(a @ v) + x).mean(1)


@pytest.mark.parametrize("kind,expect", [("auto", "AdamW"), ("sgd", "SGD"), ("adamw", "AdamW")])
def test_weight_optimizer_follows_the_graph(model, kind, expect):
    from fxadapt.search.dna import weight_optimizer
    from fxadapt.search.supernet import build_supernet

    att = build_supernet(fxadapt.analyze(_TinyAttention().eval(), (torch.randn(1, 4, 8),)))
    cnn = build_supernet(fxadapt.analyze(model, (X1,)))
    cfg = dataclasses.replace(FAST, w_optimizer=kind)
    opt, lr = weight_optimizer(att, cfg)
    assert type(opt).__name__ == expect and lr == (cfg.adamw_lr if expect == "AdamW" else cfg.w_lr)
    assert type(weight_optimizer(cnn, cfg)[0]).__name__ == ("AdamW" if kind == "adamw" else "SGD")
    with pytest.raises(SearchConfigError, match="w_optimizer"):
        fxadapt.transform(model, 0.5, (X1,), data=DATA, strategy="dna",
                          config=TransformConfig(search=dataclasses.replace(FAST, w_optimizer="lion")))
