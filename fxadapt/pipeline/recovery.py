"""``transform(..., data=..., recovery=W)``: a budget of ``W`` weight steps in all, the search's own included,
the rest a fine-tune of the adapted graph distilled from the original; the recovered model comes back.

    S = the strategy's weight steps     importance ``ImportanceConfig.steps``; dna ``SearchConfig.steps``
                                        (0 with ``weights="frozen"``); fur ``iterations * train_steps``;
                                        datafree 0
    R = W - S                           fine-tune steps (``fxadapt.train.finetune.train_for``)
    loss = (1 - kd) CE(s, y) + kd T^2 KL(p_T(t) || p_T(s))     kd 0.5, T 4, ``t`` the original (its captured
                                        graph); without labels the KL term alone (``RecoveryConfig``)

One learning-rate schedule across search and recovery: DNA's weight steps run their cosine over ``W``
(``SearchConfig.schedule_steps = W``, set by ``checked_recovery``) and the fine-tune continues it from step
``S`` with the same peak and optimizer, ``lr_s = peak * 0.5 (1 + cos(pi s / W))`` for ``s = S .. W - 1``.
Importance and FUR step at a constant learning rate of their own (SGD 0.02), no schedule to continue: the
fine-tune is ``fxadapt.finetune``'s cosine from 0.05 over the remaining ``R`` steps (a constant phase, then
a cosine). Measured on the quality protocol's digits task at 0.25x MACs, importance, W = 240, 3 seeds:
peak 0.05 gives val / test 94.8 / 97.0 %, in every seed the accuracies of ``transform`` + a separate
``fxadapt.finetune`` of the 180 steps (distilled, same seed); continuing at the search's 0.02: 93.9 / 95.4 %.
Data-free (and DNA with ``weights="frozen"``): one cosine over ``W``, SGD at 0.05, or AdamW at
``SearchConfig.adamw_lr`` where DNA would choose it (a graph with attention). ``RecoveryConfig.lr`` set:
that peak, always.

The ``recover`` step runs after BatchNorm re-estimation and before ``fold_bn`` / ``verify`` / ``write_back``,
on a copy of the materialised graph: the recovered graph is what is verified (MACs, the budget) and written
back into the user's class. The original is a frozen copy of the captured graph for the fine-tune only (not
kept afterwards); the user's model is never trained. A re-planned data-free run (``transform``'s retries)
recovers again.

>>> RecoveryConfig(steps=300).kd, as_recovery(300).steps
(0.5, 300)
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch.nn import functional as F

from fxadapt import dist
from fxadapt.errors import InputError, InternalError
from fxadapt.options import Options
from fxadapt.search.dna import optimizer_kind
from fxadapt.search.loop import teacher_of
from fxadapt.train.finetune import FinetuneConfig, Schedule, train_for

if TYPE_CHECKING:
    from fxadapt.analysis.analyze import Analysis
    from fxadapt.pipeline.config import TransformConfig
    from fxadapt.pipeline.job import Job

FINETUNE_LR = FinetuneConfig().lr     # 0.05, fxadapt.finetune's (the quality protocol's recipe)


@dataclass(frozen=True)
class RecoveryConfig(Options):
    """The recovery budget of ``transform`` (``recovery=W`` is ``RecoveryConfig(steps=W)``)."""

    steps: int = 0                  # weight steps in all, the search's included (0: no recovery)
    lr: float | None = None         # peak learning rate (None: DNA's w_lr / adamw_lr, else 0.05)
    kd: float = 0.5                 # distillation weight with labels (without labels: 1)
    temperature: float = 4.0
    batch_size: int = 64
    seed: int = 0
    loss_fn: Callable | None = None   # the task loss (None: the strategy's; cross-entropy for data-free)

    def __post_init__(self):
        super().__post_init__()
        self.check(isinstance(self.steps, int) and self.steps >= 0, "steps", "an int >= 0 (weight steps)")
        self.check(self.lr is None or self.lr > 0, "lr", "None or above 0")
        self.check(0.0 <= self.kd <= 1.0, "kd", "in [0, 1] (the distillation loss's weight)")
        self.check(self.temperature > 0, "temperature", "above 0")
        self.check(self.batch_size >= 1, "batch_size", "at least 1")


def as_recovery(value: Any) -> RecoveryConfig:
    """``TransformConfig.recovery`` as a ``RecoveryConfig`` (an int is its ``steps``)."""
    if isinstance(value, RecoveryConfig):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"recovery must be a number of weight steps (an int) or a fxadapt.RecoveryConfig; "
                         f"got {value!r}")
    return RecoveryConfig(steps=value)


def search_steps(cfg: TransformConfig) -> int:
    """The weight steps the strategy of ``cfg`` takes itself (module docstring)."""
    if cfg.strategy == "importance":
        return cfg.importance.steps
    if cfg.strategy == "dna":
        return cfg.search.steps if cfg.search.weights == "train" else 0
    if cfg.strategy == "fur":
        return cfg.fur.iterations * cfg.fur.train_steps
    return 0


def checked_recovery(cfg: TransformConfig, data: Any) -> TransformConfig:
    """``cfg`` (strategy resolved) with its recovery checked against the data and the search's steps, and
    DNA's cosine stretched over the whole budget (``SearchConfig.schedule_steps``)."""
    rc = as_recovery(cfg.recovery)
    if rc.steps == 0:
        return dataclasses.replace(cfg, recovery=rc)
    if data is None:
        raise InputError(f"recovery={rc.steps} fine-tunes on data: pass data=(inputs, targets) (or inputs "
                         f"alone: it then distils from the original), or leave recovery out")
    s = search_steps(cfg)
    if s > rc.steps:
        where = {"importance": "importance=fxadapt.ImportanceConfig(steps=...)",
                 "dna": "search=fxadapt.SearchConfig(steps=...)",
                 "fur": "fur=fxadapt.FurConfig(iterations=..., train_steps=...)"}[cfg.strategy]
        raise InputError(f"recovery={rc.steps} is fewer weight steps than the {cfg.strategy} search takes "
                         f"itself ({s}): pass recovery >= {s}, or fewer search steps with {where}")
    if cfg.strategy == "dna" and cfg.search.weights == "train":
        cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, schedule_steps=rc.steps))
    return dataclasses.replace(cfg, recovery=rc)


def recovering(job: Job) -> bool:
    """Whether ``recover`` runs: data and a recovery budget."""
    return job.data is not None and as_recovery(job.cfg.recovery).steps > 0


def recover(job: Job) -> Job:
    """The ``W - S`` distillation steps on a copy of the job's graph (module docstring); the outcome no
    longer function-preserving, the job's ``recovered`` the record the report shows."""
    cfg, rc = job.cfg, as_recovery(job.cfg.recovery)
    if job.gm is None or job.analysis is None or job.outcome is None:
        raise InternalError("recover runs after plan and materialize (the job has no graph or outcome)")
    s = search_steps(cfg)
    peak, schedule, kind = _schedule(cfg, job.analysis, s, rc)
    record = {"search_steps": s, "recovery_steps": schedule.steps, "total": s + schedule.steps,
              "lr": peak, "optimizer": schedule.optimizer, "schedule": kind, "kd": rc.kd,
              "temperature": rc.temperature}
    if schedule.steps == 0:
        return dataclasses.replace(job, recovered=record)
    gm = copy.deepcopy(job.gm)        # the graph may share tensors with the user's model (copy-on-write)
    training = gm.training
    ft = FinetuneConfig(lr=peak, momentum=_momentum(cfg), weight_decay=_weight_decay(cfg),
                        batch_size=rc.batch_size, kd=rc.kd, temperature=rc.temperature, seed=rc.seed,
                        device=cfg.device, precision=cfg.precision)
    teacher = teacher_of(job.analysis, dist.setup(cfg.device, cfg.precision))
    train_for(gm, job.data, schedule, teacher, ft, _loss_fn(cfg, rc))
    del teacher
    gm.to("cpu").train(training)
    outcome = dataclasses.replace(job.outcome, preserving=False) if job.outcome.preserving else job.outcome
    return dataclasses.replace(job, gm=gm, outcome=outcome, recovered=record)


def _schedule(cfg: TransformConfig, a: Analysis, s: int, rc: RecoveryConfig) -> tuple[float, Schedule, str]:
    """The fine-tune's peak learning rate, its ``Schedule`` and a phrase saying what it continues."""
    r, search = rc.steps - s, cfg.search
    kind = optimizer_kind(search, a.gm)     # DNA's choice
    if cfg.strategy == "dna" and search.weights == "train":
        peak = search.adamw_lr if kind == "adamw" else search.w_lr
        return (rc.lr or peak, Schedule(r, s, kind),
                f"one cosine over {rc.steps} steps: the search's first {s}, the fine-tune's last {r}")
    if cfg.strategy in ("importance", "fur"):    # their constant lr is no schedule to continue: the recipe's
        return (rc.lr or FINETUNE_LR, Schedule(r),
                f"the search's {s} steps at its constant lr, then the fine-tune's cosine over {r}")
    peak = search.adamw_lr if kind == "adamw" else FINETUNE_LR
    return rc.lr or peak, Schedule(r, 0, kind), f"one cosine over the fine-tune's {r} steps"


def _momentum(cfg: TransformConfig) -> float:
    return cfg.search.w_momentum if cfg.strategy == "dna" else 0.9


def _weight_decay(cfg: TransformConfig) -> float:
    return cfg.search.weight_decay if cfg.strategy == "dna" else 5e-4


def _loss_fn(cfg: TransformConfig, rc: RecoveryConfig) -> Callable | None:
    """The fine-tune's task loss: the recovery's, else the strategy's; None for cross-entropy."""
    loss = rc.loss_fn or getattr(getattr(cfg, {"dna": "search"}.get(cfg.strategy, cfg.strategy), None),
                                 "loss_fn", None)
    return None if loss is None or loss is F.cross_entropy else loss
