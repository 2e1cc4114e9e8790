"""A search must follow the data: a two-branch model where one branch reads only noise.

Task (seeded, built here): ``x = [x_a, x_b]`` with ``x_a, x_b ~ N(0, I_8)`` independent; the labels are
``argmax(relu(s T1) T2)`` of a random teacher (``T1``: 8x64, ``T2``: 64x4) on ONE half, ``s = x_a`` or
``s = x_b`` (``signal``), so the other half is pure noise. Model ``TwoBranch``:
``head(cat(relu(a(x_a)), relu(b(x_b))))`` with 32 hidden units per branch, trained briefly (Adam) to a
realistic base. Both branches cost the same MACs per unit (``8 + 4``: their input row and their head
column), so at a 0.5 MAC budget the data-free solver (one global scale) keeps 16 + 16, and moving units
between the branches keeps the MACs exactly.

Predicate (``follows``): the noise branch keeps strictly fewer units than data-free gives it and fewer than
the signal branch. The swap test asks it for both assignments of the signal on the same architecture: a
width choice that does not look at the data (``blind``, data-free widths with units moved at random
between the branches) cannot satisfy both, whereas it does satisfy the older check "widths differ from
data-free" (the negative control). Units are read from the returned module's layer shapes.

Measured (seeds 0-2, signal on a / b): FUR (library defaults, bar the progress bar) keeps 25 / 7 and
7 / 25 in all six cases; DNA with its default Gumbel-top-2 gates keeps 16 / 16 in five of six (17 / 15 in
one): the budget loss pulls both branches from the sqrt-scaled start (1.33x the target) down to the target
symmetrically and the task loss does not separate them afterwards; with Markov gates DNA follows the signal
in all six (by 3 to 7 units). The default gates are not asserted here (no expected failures in the suite);
the finding is part of the search-quality work (issue 15).
The fine-tuned validation loss is the weaker witness: DNA's 16 / 16 model also fine-tunes below data-free's
(its weights were trained during the search; data-free's L1-ranked slices start far off), so only FUR's
loss is asserted, beside its units.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.pipeline.transform import TransformConfig
from fxadapt.search.dna import SearchConfig
from fxadapt.search.fur import FurConfig
from fxadapt.search.supernet import SupernetConfig
from fxadapt.train.finetune import FinetuneConfig

D, W, CLASSES, N = 8, 32, 4, 2048
SEEDS = (0, 1, 2)
CASES = [(s, sig) for s in SEEDS for sig in "ab"]
BUDGET = 0.5


class TwoBranch(nn.Module):
    """Branch ``a`` reads features ``[:8]``, branch ``b`` features ``[8:]``; a linear head on both."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, W), nn.Linear(D, W)
        self.head = nn.Linear(2 * W, CLASSES)

    def forward(self, x):
        return self.head(torch.cat([torch.relu(self.a(x[:, :D])), torch.relu(self.b(x[:, D:]))], 1))


def task(seed: int, signal: str) -> tuple[tuple, tuple]:
    """``(train, val)`` tensors; the labels depend only on the ``signal`` half of the features."""
    g = torch.Generator().manual_seed(seed)
    t1, t2 = torch.randn(D, 64, generator=g), torch.randn(64, CLASSES, generator=g)
    x = torch.randn(2 * N, 2 * D, generator=g)
    s = x[:, :D] if signal == "a" else x[:, D:]
    y = (torch.relu(s @ t1) @ t2).argmax(1)
    return (x[:N], y[:N]), (x[N:], y[N:])


def train_base(data: tuple, seed: int, steps: int = 400) -> TwoBranch:
    torch.manual_seed(seed)
    model, g = TwoBranch(), torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        i = torch.randint(0, N, (128,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(data[0][i]), data[1][i]).backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def val_loss(model: nn.Module, data: tuple) -> float:
    return float(nn.functional.cross_entropy(model.eval()(data[0]), data[1]))


def units(model: nn.Module) -> dict[str, int]:
    """Kept units per branch, from the module's own layer shapes."""
    assert model.head.in_features == model.a.out_features + model.b.out_features
    return {"a": model.a.out_features, "b": model.b.out_features}


def follows(kept: dict[str, int], datafree: dict[str, int], signal: str) -> bool:
    noise = "b" if signal == "a" else "a"
    return kept[noise] < datafree[noise] and kept[noise] < kept[signal]


def blind(datafree: dict[str, int], rng: random.Random) -> dict[str, int]:
    """A data-blind "search": data-free widths with 1-8 units moved at random between the branches (the
    same MACs: both branches cost the same per unit)."""
    k = rng.randint(1, 8) * rng.choice((-1, 1))
    return {"a": datafree["a"] + k, "b": datafree["b"] - k}


def transformed(case: dict, strategy: str, **cfg) -> nn.Module:
    data = case["train"] if strategy != "datafree" else None
    return fxadapt.transform(case["base"], BUDGET, (case["train"][0][:1],), data=data, strategy=strategy,
                             config=TransformConfig(**cfg))


@pytest.fixture(scope="module")
def cases() -> dict:
    out = {}
    for seed, signal in CASES:
        train, val = task(seed, signal)
        case = {"train": train, "val": val, "base": train_base(train, seed)}
        out[seed, signal] = case | {"datafree": units(transformed(case, "datafree"))}
    return out


FUR = dict(fur=FurConfig(progress=False))                       # library defaults, no progress bar
# kd=0.0: task-loss weight steps (the default distils from the original since issue 25; with it the Markov
# search misses seed 0 / signal b: 20 / 12 kept, bench note in tests/test_recovery.py's report)
DNA_MARKOV = dict(search=SearchConfig(progress=False, supernet=SupernetConfig(gates="markov"), kd=0.0))


def test_base_learns_and_datafree_is_symmetric(cases):
    for (seed, signal), case in cases.items():
        assert val_loss(case["base"], case["val"]) < 0.4, (seed, signal)    # chance: ln 4 = 1.39
        assert case["datafree"] == {"a": 16, "b": 16}, (seed, signal)      # one global scale, equal MACs


@pytest.mark.parametrize("seed", SEEDS)
def test_fur_follows_the_signal_when_it_is_swapped(cases, seed):
    kept = {sig: units(transformed(cases[seed, sig], "fur", **FUR)) for sig in "ab"}
    for sig in "ab":
        assert follows(kept[sig], cases[seed, sig]["datafree"], sig), (sig, kept)
    assert kept["a"]["a"] - kept["a"]["b"] >= 8 and kept["b"]["b"] - kept["b"]["a"] >= 8, kept


@pytest.mark.parametrize("seed", SEEDS)
def test_fur_fine_tunes_below_datafree(cases, seed):
    """After the same fine-tune (the library's recipe, two epochs), FUR's model has the lower val loss."""
    for sig in "ab":
        case = cases[seed, sig]
        losses = {}
        for strategy, cfg in (("fur", FUR), ("datafree", {})):
            model = fxadapt.finetune(transformed(case, strategy, **cfg), case["train"], epochs=2,
                                     cfg=FinetuneConfig(batch_size=64))
            losses[strategy] = val_loss(model, case["val"])
        assert losses["fur"] < losses["datafree"], (sig, losses)


def test_dna_markov_follows_the_signal_when_it_is_swapped(cases):
    for seed, sig in CASES:
        kept = units(transformed(cases[seed, sig], "dna", **DNA_MARKOV))
        assert follows(kept, cases[seed, sig]["datafree"], sig), (seed, sig, kept)


def test_data_blind_widths_fail_the_swap_predicate(cases):
    """Negative control: the old check ("widths differ from data-free") accepts a data-blind perturbation;
    the swap predicate rejects it, because its choice cannot depend on which branch carries the signal."""
    rng = random.Random(0)
    for seed in SEEDS:
        df = cases[seed, "a"]["datafree"]
        kept = blind(df, rng)                       # chosen without the data, so the same for both tasks
        assert kept != df                           # the old predicate passes
        assert sum(kept.values()) == sum(df.values())
        assert not (follows(kept, df, "a") and follows(kept, cases[seed, "b"]["datafree"], "b"))
