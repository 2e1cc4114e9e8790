"""An MLP latency predictor over an architecture encoding, trained on sampled sub-networks timed end to end.

**Encoding.** A sub-network is its kept units per prunable group; its encoding is the vector of width
ratios ``r_g = n_g / N_g`` (block presences, when given, are appended), plus ``log(M(n) / M(n0))`` (the
MAC ratio from the cost model, free to compute). **Target**: ``y = log(L(n) / L0)``.

**Model.** ``y_hat = w * log_macs + b + MLP(encoding)``: a linear term in the log MAC ratio (latency roughly
follows MACs) plus a two-layer tanh MLP (32 units) for what MACs miss (alignment, memory-bound layers);
inputs standardised, Adam with weight decay, full batch. It is differentiable in the ratios
(``LatencyPredictor.torch_predict``), so a search can use it as a latency loss.

**Data.** ``sample_units`` draws a global scale ``s ~ U(s_min, 1)`` and per group a jitter ``U(1 - j, 1 + j)``
(``SampleConfig``), snapped to the group's aligned ladder; ``collect`` materialises and times each sample on
the target (``fxadapt.planning.latency.Measurer``). ``cross_validate`` reports the relative error
``|L_hat / L - 1|`` of every sample when held out (k-fold): its mean, 95th percentile and the share within
10%.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> X = rng.uniform(0.3, 1.0, (40, 3))
>>> lm = np.log(X.mean(1))
>>> y = 1.1 * lm + 0.05 * np.sin(3 * X[:, 0])
>>> err = cross_validate(X, lm, y, folds=4, steps=300)
>>> summary(err)["mean"] < 0.05
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from fxadapt.planning.align import ladder

if TYPE_CHECKING:
    from fxadapt.analysis.analyze import Analysis


class LatencyPredictor:
    """``y_hat = w * log_macs + b + MLP(x)`` (module docstring); ``fit`` then ``predict``."""

    def __init__(self, hidden: int = 32, steps: int = 1500, lr: float = 1e-2, weight_decay: float = 1e-3,
                 seed: int = 0):
        self.hidden, self.steps, self.lr, self.wd, self.seed = hidden, steps, lr, weight_decay, seed

    def _inputs(self, X, lm) -> torch.Tensor:
        Z = np.column_stack([X, lm])
        return torch.as_tensor((Z - self.mu) / self.sd, dtype=torch.float32)

    def fit(self, X: np.ndarray, log_macs: np.ndarray, y: np.ndarray) -> LatencyPredictor:
        torch.manual_seed(self.seed)
        Z = np.column_stack([X, log_macs])
        self.mu, self.sd = Z.mean(0), Z.std(0) + 1e-6
        self.net = torch.nn.Sequential(torch.nn.Linear(Z.shape[1], self.hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(self.hidden, 1))
        self.lin = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
        zi, lm_t = self._inputs(X, log_macs), torch.as_tensor(log_macs, dtype=torch.float32)
        yt = torch.as_tensor(y, dtype=torch.float32)
        opt = torch.optim.Adam([*self.net.parameters(), self.lin], lr=self.lr, weight_decay=self.wd)
        for _ in range(self.steps):
            opt.zero_grad()
            loss = ((self._forward(zi, lm_t) - yt) ** 2).mean()
            loss.backward()
            opt.step()
        return self

    def _forward(self, z: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
        return self.lin[0] * lm + self.lin[1] + self.net(z).squeeze(-1)

    def predict(self, X: np.ndarray, log_macs: np.ndarray) -> np.ndarray:
        """Predicted ``log(L / L0)``."""
        with torch.no_grad():
            return self._forward(self._inputs(X, log_macs),
                                 torch.as_tensor(log_macs, dtype=torch.float32)).numpy()

    def torch_predict(self, ratios: torch.Tensor, log_macs: torch.Tensor) -> torch.Tensor:
        """Differentiable ``log(L / L0)`` from width ratios and the log MAC ratio (tensors)."""
        z = (torch.cat([ratios, log_macs[..., None]], -1) - torch.as_tensor(self.mu, dtype=torch.float32)) \
            / torch.as_tensor(self.sd, dtype=torch.float32)
        return self._forward(z, log_macs)


def cross_validate(X: np.ndarray, log_macs: np.ndarray, y: np.ndarray, folds: int = 5, **kw) -> np.ndarray:
    """Relative latency error of every sample predicted by a predictor trained without it (k-fold)."""
    idx = np.random.default_rng(0).permutation(len(y))
    err = np.empty(len(y))
    for f in range(folds):
        test = idx[f::folds]
        train = np.setdiff1d(idx, test)
        pred = LatencyPredictor(**kw).fit(X[train], log_macs[train], y[train]).predict(X[test],
                                                                                       log_macs[test])
        err[test] = np.abs(np.exp(pred - y[test]) - 1)
    return err


def summary(err: np.ndarray) -> dict:
    """Mean, 95th percentile and share within 10% of relative errors.

    >>> summary(np.array([0.01, 0.02, 0.2]))["within_10"]
    0.6666666666666666
    """
    return {"mean": float(err.mean()), "p95": float(np.percentile(err, 95)),
            "within_10": float((err <= 0.10).mean()), "n": int(len(err))}


@dataclass(frozen=True)
class SampleConfig:
    """How ``sample_units`` draws: the global scale ``s ~ U(s_min, 1)``, the per-group jitter ``j``, and the
    narrowest kept fraction of a group (``min_ratio``, as ``SolveConfig.min_ratio``)."""

    s_min: float = 0.3
    jitter: float = 0.25
    min_ratio: float = 0.1


def sample_units(a: Analysis, k: int, align: int = 1, seed: int = 0,
                 cfg: SampleConfig = SampleConfig()) -> list[dict]:
    """``k`` random sub-networks (kept units per prunable group) on the aligned ladders (module docstring).

    >>> import torch, fxadapt
    >>> a = fxadapt.analyze(torch.nn.Sequential(torch.nn.Conv2d(3, 64, 1), torch.nn.Conv2d(64, 4, 1)),
    ...                     (torch.randn(1, 3, 4, 4),))
    >>> all(u[0] % 16 == 0 for u in sample_units(a, 5, align=16))
    True
    """
    rng = np.random.default_rng(seed)
    s_min, jitter, min_ratio = cfg.s_min, cfg.jitter, cfg.min_ratio
    out = []
    for _ in range(k):
        s = rng.uniform(s_min, 1.0)
        n = {}
        for g in a.prunable:
            rungs = ladder(g.units, g.granularity, max(1, int(np.ceil(min_ratio * g.units))), g.units, align)
            want = s * g.units * rng.uniform(1 - jitter, 1 + jitter)
            n[g.id] = int(rungs[np.argmin(np.abs(rungs - want))])
        out.append(n)
    return out


def encode(a: Analysis, units: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Width ratios per prunable group and the log MAC ratio of every sample."""
    gids = [g.id for g in a.prunable]
    X = np.array([[u.get(g, a.groups[g].units) / a.groups[g].units for g in gids] for u in units],
                 dtype=float)
    base = a.cost.macs()
    lm = np.log(np.array([a.cost.macs(u) / base for u in units]))
    return X, lm


def collect(a: Analysis, units: list[dict], measure, progress: bool = True) -> np.ndarray:
    """``log(L / L0)`` of every sample, timed by ``measure(units) -> seconds`` (``measure({})`` = ``L0``)."""
    base = measure({})
    return np.log(np.array([measure(u) / base for u in tqdm(units, desc="sub-networks", disable=not progress,
                                                                leave=False)]))
