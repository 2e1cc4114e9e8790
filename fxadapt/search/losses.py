"""What an architecture step of the gradient searches minimises besides the task loss.

Budget loss (DMCP/TAS form) with a dead zone: ``r = E[MACs] / T``; zero when ``r`` lies in
``[1 - band, 1]`` (shrink targets) or ``[1, 1 + band]`` (growth targets), ``|log r|`` outside. The
optional decisiveness term is ``w * ramp * H(gates)``, ``H`` the mean binary entropy of the bins'
marginal keep probabilities (or of the Markov chains' conditional parameters) and of the depth gates.

>>> import torch
>>> round(float(budget_loss(torch.tensor(120.0), 100.0, False, 0.03)), 4)   # 20% over: |log 1.2|
0.1823
>>> float(budget_loss(torch.tensor(98.0), 100.0, False, 0.03))    # inside the dead zone
0.0
"""

from __future__ import annotations

from typing import Protocol

import torch

from fxadapt.errors import SearchConfigError
from fxadapt.search.supernet import Supernet


class PenaltyConfig(Protocol):
    """The options the penalty reads (``fxadapt.search.dna.SearchConfig`` has them)."""

    @property
    def budget_weight(self) -> float: ...
    @property
    def band(self) -> float: ...
    @property
    def entropy_weight(self) -> float: ...
    @property
    def entropy_of(self) -> str: ...


def gate_entropy(sn: Supernet, of: str = "marginals") -> torch.Tensor:
    """Mean binary entropy of the gates (differentiable): of the width bins' marginals ``P_k`` (the masks the
    network sees) or of the conditional parameters ``p_k`` (``of="alpha"``, what ``Supernet.entropy``
    reports), and of the depth gates."""
    if of not in ("marginals", "alpha"):
        raise SearchConfigError(f"SearchConfig.entropy_of must be 'marginals' or 'alpha', got {of!r}")
    ps = [g.marginals() if of == "marginals" else g.alpha for g in sn.width_gates().values()]
    ps += [g.beta.view(1) for g in sn.depth_gates().values()]
    if not ps:
        return torch.zeros(())
    p = torch.cat(ps).clamp(1e-4, 1 - 1e-4)
    return (-(p * p.log() + (1 - p) * (1 - p).log())).mean()


@torch.no_grad()
def harden_gates(sn: Supernet) -> None:
    """Set every gate to its hard value (Markov: bins whose marginal exceeds 0.5; sampled: the most likely
    width; blocks whose gate exceeds 0.5)."""
    for g in list(sn.width_gates().values()) + list(sn.depth_gates().values()):
        g.harden()


def arch_penalty(sn: Supernet, target: float, grow: bool, cfg: PenaltyConfig, ramp: float) -> torch.Tensor:
    """What an architecture step adds to the task loss: the budget loss and the ramped gate entropy."""
    loss = cfg.budget_weight * budget_loss(sn.expected_macs(), target, grow, cfg.band)
    return loss + cfg.entropy_weight * ramp * gate_entropy(sn, cfg.entropy_of) if cfg.entropy_weight else loss


def penalty(sn: Supernet, target: float | None, grow: bool, cfg: PenaltyConfig, ramp: float,
            extra) -> torch.Tensor:
    """``arch_penalty`` when there is a MAC target (zero otherwise), plus ``extra()`` when given."""
    loss = arch_penalty(sn, target, grow, cfg, ramp) if target else sn.expected_macs() * 0.0
    return loss + extra() if extra is not None else loss


def budget_loss(expected: torch.Tensor, target: float, grow: bool, band: float) -> torch.Tensor:
    """Zero inside the dead zone, ``|log(E/T)|`` outside (see module docstring)."""
    r = expected / target
    lo, hi = (1.0, 1.0 + band) if grow else (1.0 - band, 1.0)
    if lo <= float(r.detach()) <= hi:
        return expected * 0.0  # zero, still attached to the graph
    return torch.log(r).abs()
