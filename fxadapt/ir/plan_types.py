"""The plan data the passes read (``passes/materialize``, ``rewire_blocks``): per site the new positions
(``SiteEdit``) and per group the kept units, with the blocks to remove or repeat (``Plan``). Plain data, so
the passes need nothing from ``fxadapt.planning``, which builds them (``make_plan``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fxadapt.ir.channels import Site


@dataclass(frozen=True, eq=False)
class SiteEdit:
    """New positions of one site: ``index[k]`` is the source position, ``new[k]`` marks a grown copy."""

    site: Site
    index: np.ndarray
    new: np.ndarray


@dataclass(frozen=True, eq=False)
class Plan:
    """Everything ``passes.materialize`` needs; built by ``fxadapt.planning.plan.make_plan`` from an
    ``Analysis``."""

    edits: tuple[SiteEdit, ...]
    units: dict[int, int]
    remove: frozenset = frozenset()
    repeat: dict = field(default_factory=dict)
    blocks: tuple = ()
