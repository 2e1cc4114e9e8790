"""Pass: insert elastic width and depth gates into a (grown) captured graph.

Width gate of a group (DMCP-style ordered Markov gate, on FLOPs-sensitive bins): the group's units are
ordered (original units first, by importance, then grown units); the first ``n_min`` are always on; the
rest are split into bins ``B_1..B_K`` (bins never straddle the original width). Bin ``k`` is kept with
probability ``p_k = clamp(a_k, 0, 1)`` given bin ``k-1`` is kept, so its marginal is
``P_k = prod_{i<=k} p_i`` and the unit mask is ``m_u = P_{bin(u)}``. Expected units:
``E[n] = n_min + sum_k |B_k| P_k`` — linear in the marginals, so expected MACs stay a polynomial.
``a_k`` starts at exactly 1 for bins inside the original width and 0 beyond, so at initialisation the
masks are exactly 1/0 and the gated supernet computes the original function (the clamp passes gradient
at its bounds, so the gates can still move either way).

The mask multiplies every producer of the group *after* its BatchNorm (a zero mask before BN would leak
``beta - gamma * mu / sigma``); element-wise partners and consumers then see zeros for dropped units.

Depth gate of a removable block: ``y = x + d * f(x)``, ``d = clamp(b, 0, 1)``, ``b`` = 1 for original
blocks and 0 for inserted (repeated) slots.

Sampled gates (``GateConfig(kind="gumbel" | "topk")``, FBNetV2 / MSG-DAS): the group chooses one of the
``K + 1`` widths ``n_min + |B_1| + ... + |B_j|`` (``j = 0..K``) with probabilities ``pi = softmax(theta)``.
Before every step the search draws Gumbel noise ``g`` (``resample``); the gate then computes
``y = softmax((theta + g) / tau)`` and, for ``"gumbel"``, the straight-through one-hot of its argmax
(``y_hard + tau * (y - y.detach())``: the forward is one discrete width, the gradient the relaxed one,
times ``tau`` so its scale does not grow as ``tau`` anneals and swamp the budget loss, whose gradient is
taken at ``tau = 1``); for ``"topk"`` the ``k`` largest perturbed choices with their relaxed weights
renormalised (multi-path; gradient also times ``tau``). Bin ``k``'s mask is ``P_k = sum_{j >= k} y_j``.
Expected units use the noise-free ``pi`` — by the Gumbel-max trick exactly the mean of the sampled width:
``E[n] = n_min + sum_k |B_k| sum_{j >= k} pi_j``. In eval mode (no noise) the mask is the argmax choice;
``theta`` starts uniform with a 1e-3 tie-break toward the original width, so the gated supernet in eval mode
still computes the original function. Sampled depth gates: ``d = 1[u < b] + b - b.detach()`` (straight-through
Bernoulli) for noise ``u ~ U(0, 1)``.

``strip_gates`` removes every gate node again (``x * m -> x``), leaving the plain graph with whatever
weights training gave it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from fxadapt import meta
from fxadapt.ops.registry import spec_of

GATE_ROOT = "fxadapt_gates"


def _bin_index(order: torch.Tensor, n_min: int, bins: list[int]) -> torch.Tensor:
    """Per unit, the gated bin it belongs to (``-1``: one of the ``n_min`` always-on units)."""
    bin_of = torch.full((len(order),), -1, dtype=torch.long)
    start = n_min
    for k, size in enumerate(bins):
        bin_of[order[start:start + size]] = k
        start += size
    return bin_of


class WidthGate(nn.Module):
    """Ordered Markov gate over ``units`` (see module docstring); ``forward()`` returns the unit mask."""

    bin_of: torch.Tensor    # buffers
    bin_size: torch.Tensor

    def __init__(self, order: torch.Tensor, n_min: int, bins: list[int], n_on: int):
        super().__init__()
        self.register_buffer("bin_of", _bin_index(order, n_min, bins))
        self.register_buffer("bin_size", torch.tensor(bins, dtype=torch.float32))
        self.n_min = n_min
        on = torch.tensor([float(sum(bins[: k + 1]) + n_min <= n_on) for k in range(len(bins))])
        self.alpha = nn.Parameter(on)

    def marginals(self) -> torch.Tensor:
        return torch.cumprod(self.alpha.clamp(0, 1), 0)

    def expected_units(self) -> torch.Tensor:
        return self.n_min + (self.bin_size * self.marginals()).sum()

    def hard_units(self) -> int:
        keep = (self.marginals() > 0.5).float()
        return int(self.n_min + (self.bin_size * keep).sum().item())

    @torch.no_grad()
    def harden(self) -> None:
        self.alpha.copy_((self.marginals() > 0.5).float())

    def forward(self) -> torch.Tensor:
        p = torch.cat([self.marginals(), self.alpha.new_ones(1)])
        return p[self.bin_of]


class SampledWidthGate(nn.Module):
    """Categorical width gate, Gumbel (one path) or Gumbel-top-k (``k`` paths); see module docstring."""

    bin_of: torch.Tensor    # buffers
    bin_size: torch.Tensor

    def __init__(self, order: torch.Tensor, n_min: int, bins: list[int], n_on: int, top_k: int = 1):
        super().__init__()
        self.register_buffer("bin_of", _bin_index(order, n_min, bins))
        self.register_buffer("bin_size", torch.tensor(bins, dtype=torch.float32))
        self.n_min, self.top_k, self.tau = n_min, top_k, 1.0
        j0 = sum(1 for k in range(len(bins)) if sum(bins[: k + 1]) + n_min <= n_on)
        theta = torch.zeros(len(bins) + 1)
        theta[j0] = 1e-3
        self.theta = nn.Parameter(theta)
        self.register_buffer("noise", torch.zeros(0), persistent=False)

    def resample(self, gen: torch.Generator | None) -> None:
        """Draw the Gumbel noise the next forwards use (``None``: no noise, the argmax choice)."""
        if gen is None:
            self.noise = torch.zeros(0, device=self.theta.device)
            return
        u = torch.rand(self.theta.shape, generator=gen).clamp(1e-9, 1 - 1e-9)
        self.noise = (-torch.log(-torch.log(u))).to(self.theta.device)

    def choice(self) -> torch.Tensor:
        """The relaxed one-hot (or top-k weights) over the ``K + 1`` widths the forward uses."""
        if self.noise.numel() == 0 or not self.training:
            return nn.functional.one_hot(self.theta.argmax(), len(self.theta)).to(self.theta.dtype)
        z = (self.theta + self.noise) / self.tau
        y = torch.softmax(z, 0)
        top = z.topk(min(self.top_k, len(z))).indices
        if self.top_k == 1:
            return torch.zeros_like(y).index_fill(0, top, 1.0) + self.tau * (y - y.detach())
        w = torch.zeros_like(y).index_fill(0, top, 1.0) * y
        w = w / w.sum()
        return w.detach() + self.tau * (w - w.detach())

    def _tail(self, y: torch.Tensor) -> torch.Tensor:
        return torch.flip(torch.cumsum(torch.flip(y, (0,)), 0), (0,))[1:]

    def marginals(self) -> torch.Tensor:
        """Noise-free ``P_k = sum_{j >= k} pi_j``: the probability that bin ``k`` is kept."""
        return self._tail(torch.softmax(self.theta, 0))

    def expected_units(self) -> torch.Tensor:
        return self.n_min + (self.bin_size * self.marginals()).sum()

    def hard_units(self) -> int:
        j = int(self.theta.argmax())
        return int(self.n_min + self.bin_size[:j].sum().item())

    @torch.no_grad()
    def harden(self) -> None:
        j = int(self.theta.argmax())
        self.theta.fill_(-1e4)
        self.theta[j] = 1e4

    def forward(self) -> torch.Tensor:
        p = torch.cat([self._tail(self.choice()), self.theta.new_ones(1)])
        return p[self.bin_of]


class _MaskMul(torch.autograd.Function):
    """``x * m`` (``m`` broadcast over ``x``) that keeps ``x`` in bfloat16 for the mask's gradient
    ``dL/dm = sum(g * x)`` over the broadcast axes: the gate step's extra activation memory halves, the
    forward and ``dL/dx = g * m`` stay exact (``bench/bench_search_step.py``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        keep = x.detach().to(torch.bfloat16) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(keep, m)
        return x * m

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        keep, m = ctx.saved_tensors
        gx = g * m if ctx.needs_input_grad[0] else None
        gm = None
        if keep is not None:
            dims = [d for d in range(g.dim()) if m.shape[d] == 1 and g.shape[d] != 1]
            gm = (g * keep.to(g.dtype)).sum(dims, keepdim=True).to(m.dtype) if dims \
                    else (g * keep.to(g.dtype))
        return gx, gm


class SiteMask(nn.Module):
    """``x * mask[index]`` broadcast on ``axis``; index -1 (another group's position) multiplies by 1."""

    index: torch.Tensor     # a buffer

    def __init__(self, index: torch.Tensor, axis: int, ndim: int):
        super().__init__()
        self.register_buffer("index", index.long())
        self.axis, self.ndim = axis, ndim

    def forward(self, x: torch.Tensor, unit_mask: torch.Tensor) -> torch.Tensor:
        full = torch.cat([unit_mask, unit_mask.new_ones(1)])[self.index]
        shape = [1] * x.dim()
        shape[self.axis - self.ndim + x.dim()] = -1
        if full.requires_grad and torch.is_grad_enabled():
            return _MaskMul.apply(x, full.view(shape))
        return x * full.view(shape)


class DepthGate(nn.Module):
    def __init__(self, on: bool):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(1.0 if on else 0.0))
        self.register_buffer("noise", torch.zeros(0), persistent=False)

    def resample(self, gen: torch.Generator | None) -> None:
        """Sampled mode: draw ``u ~ U(0, 1)`` for the next forwards (``None``: deterministic again)."""
        u = torch.rand((), generator=gen) if gen is not None else torch.zeros(0)
        self.noise = u.to(self.beta.device)

    def forward(self) -> torch.Tensor:
        b = self.beta.clamp(0, 1)
        if self.noise.numel() == 0 or not self.training:
            return b
        return (self.noise < b).to(b.dtype) - b.detach() + b

    @torch.no_grad()
    def harden(self) -> None:
        self.beta.fill_(float(self.beta > 0.5))


@dataclass(frozen=True, eq=False)
class WidthSpec:
    """How one group is gated: unit ``order`` (kept first = first), ``n_min`` always-on units, ``bins``
    (sizes of the gated bins after them) and ``n_on`` (units on at initialisation: the original width)."""

    order: torch.Tensor
    n_min: int
    bins: tuple[int, ...]
    n_on: int

    @property
    def units(self) -> int:
        return len(self.order)


@dataclass(frozen=True)
class GateSpec:
    """What to gate: per group a ``WidthSpec``; per removable block whether it starts on."""

    widths: dict   # group id -> WidthSpec
    depths: dict   # block id -> on (bool)


@dataclass(frozen=True)
class GateConfig:
    copy: bool = True      # work on a deep copy (the default) or in place (the caller's own copy)
    kind: str = "markov"   # "markov" (DMCP), "gumbel" (FBNetV2), "topk" (MSG-DAS Gumbel-top-k)
    top_k: int = 2         # paths per group for kind="topk"


def _width_gate(w, cfg: GateConfig) -> nn.Module:
    if cfg.kind == "markov":
        return WidthGate(w.order, w.n_min, list(w.bins), w.n_on)
    if cfg.kind in ("gumbel", "topk"):
        return SampledWidthGate(w.order, w.n_min, list(w.bins), w.n_on,
                                1 if cfg.kind == "gumbel" else cfg.top_k)
    raise ValueError(f"gate kind must be 'markov', 'gumbel' or 'topk', got {cfg.kind!r}")


def _after_norm(node: Node, gm: GraphModule) -> Node:
    """Follow a producer through its single-user BatchNorm (the mask goes after the affine)."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        spec = spec_of(user)
        if spec is not None and spec.fold == "affine":
            node = user
            continue
        break
    return node


class Analyzed(Protocol):
    """What the gates are placed from: ``fxadapt.analysis.Analysis`` is one (passes sit below analysis, so
    they name the shape they read rather than import it)."""

    groups: list   # Group: ``.members`` with ``.site`` (kind, role, node_name)
    blocks: list   # Block


def insert_gates(gm: GraphModule, analysis: Analyzed, spec: GateSpec,
                 cfg: GateConfig = GateConfig()) -> PassResult:
    """Insert width/depth gates (``gm`` is the analysed graph of ``analysis``; node names are shared)."""
    gm = copy.deepcopy(gm) if cfg.copy else gm
    gm.add_submodule(GATE_ROOT, nn.Module())
    nodes = {n.name: n for n in gm.graph.nodes}
    for gid, w in spec.widths.items():
        gname = f"{GATE_ROOT}.w{gid}"
        gm.add_submodule(gname, _width_gate(w, cfg))
        for k, m in enumerate(analysis.groups[gid].members):
            if m.site.kind != "param" or m.site.role not in ("out", "dw") or m.site.node_name not in nodes:
                continue
            _mask_site(gm, nodes, m, gname, f"{GATE_ROOT}.w{gid}_s{k}")
    for bid, on in spec.depths.items():
        b = analysis.blocks[bid]
        dname = f"{GATE_ROOT}.d{bid}"
        gm.add_submodule(dname, DepthGate(on))
        exit_ = nodes[b.exit]
        f = next(a for a in exit_.args[:2] if isinstance(a, Node) and a.name != b.entry)
        with gm.graph.inserting_before(exit_):
            d = gm.graph.call_module(dname, ())
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (f, d))
        scaled.meta[meta.GATE] = True
        exit_.replace_input_with(f, scaled)
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, bool(spec.widths or spec.depths))


def _mask_site(gm: GraphModule, nodes: dict, member, gate: str, name: str) -> None:
    producer = nodes[member.site.node_name]
    src = _after_norm(producer, gm)
    val = src.meta.get("val")
    ndim = val.dim() if isinstance(val, torch.Tensor) else 4
    track = producer.meta.get(meta.TRACK)
    axis = track.axes[-1] if track is not None and hasattr(track, "axes") else 1
    gm.add_submodule(name, SiteMask(torch.as_tensor(member.index), axis, ndim))
    users = list(src.users)
    with gm.graph.inserting_after(src):
        mask = gm.graph.call_module(gate, ())
    with gm.graph.inserting_after(mask):
        out = gm.graph.call_module(name, (src, mask))
    out.meta[meta.GATE] = True
    out.meta["val"] = val
    for u in users:
        u.replace_input_with(src, out)


def strip_gates(gm: GraphModule, cfg: GateConfig = GateConfig()) -> PassResult:
    """Remove every gate node (``mask(x) -> x``, ``x * d -> x``) and the gate modules."""
    gm = copy.deepcopy(gm) if cfg.copy else gm
    removed = 0
    for node in list(gm.graph.nodes):
        if node.meta.get(meta.GATE):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(GATE_ROOT) and not node.users:
            gm.graph.erase_node(node)
    if hasattr(gm, GATE_ROOT):
        delattr(gm, GATE_ROOT)
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, removed > 0)
