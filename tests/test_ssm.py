"""State-space models: the selective scan's channels (``d_inner``) form one prunable group.

Hugging Face Mamba (slow path on CPU) computes ``dt = dt_proj.weight @ time_step^T`` (a weight on the *left*
of a matmul), ``A = -exp(A_log.float())`` (a parameter read element-wise), the outer products
``delta[:, :, :, None] * B[:, None, :, :]`` (``d_inner`` on axis 1, ``d_state`` on axis 3) and an initial
state ``zeros([B, d_inner, d_state])``. The rules under test: the left-weight matmul produces channels,
element-wise parameters and factories follow the channels (``const`` / ``shape_arg`` sites), and an outer
product of two channel spaces carries the larger one and freezes the other with a reason naming it.
"""

from __future__ import annotations

import pytest
import torch
from ruletools import analyze, group_with, groups_with, param_members
from torch import nn

import fxadapt
from fxadapt.analysis.count import count_macs

transformers = pytest.importorskip("transformers")

IDS = dict(vocab_size=256, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
           pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {"mamba": ("MambaConfig", "MambaForCausalLM"),
            "falcon_mamba": ("FalconMambaConfig", "FalconMambaForCausalLM")}


def _build(family: str):
    config, model = (getattr(transformers, n) for n in FAMILIES[family])
    torch.manual_seed(0)
    return model(config(**IDS)).eval()


def _ids(batch: int = 1, seq: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    model = _build(request.param)
    return request.param, model, fxadapt.analyze(model, {"input_ids": _ids()})


def test_d_inner_is_one_prunable_group(family):
    name, model, a = family
    mixer = "backbone.layers.0.mixer"
    g = group_with(a, f"{mixer}.A_log", 0)
    assert g.prunable and (g.width, g.granularity) == (256, 2)  # unit: channel i of x and of the gate z
    assert {(f"{mixer}.{p}", ax, role) for p, ax, role in [
        ("in_proj.weight", 0, "out"), ("conv1d.weight", 0, "dw"), ("x_proj.weight", 1, "in"),
        ("dt_proj.weight", 0, "out"), ("dt_proj.bias", 0, "const"), ("A_log", 0, "const"), ("D", 0, "const"),
        ("out_proj.weight", 1, "in")]} <= param_members(g)
    assert sum(m.site.kind == "shape_arg" for m in g.members) == 1  # the zero initial state's d_inner entry
    dt_rank = group_with(a, f"{mixer}.dt_proj.weight", 1)
    assert dt_rank.prunable and dt_rank.width == 4
    state = [g for g in groups_with(a, f"{mixer}.x_proj.weight", 0) if g.width == 8]
    assert len(state) == 2 and not any(g.prunable for g in state)  # d_state rows of B and C
    assert any("outer product of two channel spaces (8 channels on axes (3,), 128 on axes (1,))" in g.reason
               for g in state)
    assert sum(g.prunable for g in a.groups) == 5  # hidden, and d_inner and dt_rank of each layer
    assert a.fired["matmul"] == 18 and a.fired["blocked"] == 0


def test_cost_model_equals_count(family):
    _, model, a = family
    assert a.macs() == count_macs(model, {"input_ids": _ids()})


def test_shrink_lands_in_window_and_generates(family):
    _, model, a = family
    ex = {"input_ids": _ids()}
    out = fxadapt.transform(model, 0.5, ex)
    assert type(out) is type(model)
    assert abs(count_macs(out, ex) / count_macs(model, ex) - 0.5) <= 0.01
    assert out.backbone.layers[0].mixer.A_log.shape[0] < 128  # d_inner moved, not only the hidden size
    with torch.no_grad():
        logits = out(input_ids=_ids(3, 11, seed=1)).logits
    assert logits.shape == (3, 11, 256) and torch.isfinite(logits).all()
    gen = out.generate(_ids()[:, :4], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 7)


def test_growth_is_function_preserving(family):
    _, model, _ = family
    ex = {"input_ids": _ids()}
    out = fxadapt.transform(model, 1.5, ex)
    assert out.backbone.layers[0].mixer.A_log.shape[0] > 128
    assert abs(count_macs(out, ex) / count_macs(model, ex) - 1.5) <= 0.015
    x = _ids(2, 9, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(out(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=1e-5)


# --- the rules on small modules ---------------------------------------------------------------------------
class LeftWeight(nn.Module):
    """``W @ x`` with ``x`` [B, K, L]: W's rows are new channels, its columns read x's."""

    def __init__(self):
        super().__init__()
        self.inp, self.w, self.out = nn.Linear(6, 5), nn.Parameter(torch.randn(7, 5)), nn.Linear(7, 3)

    def forward(self, x):
        y = self.w @ self.inp(x).transpose(1, 2)
        return self.out(y.transpose(1, 2))


def test_left_weight_matmul_produces_channels():
    a = analyze(LeftWeight(), torch.randn(2, 4, 6))
    g = group_with(a, "w", 0)
    assert g.prunable and g.width == 7 and ("out.weight", 1, "in") in param_members(g)
    assert ("w", 1, "in") in param_members(group_with(a, "inp.weight", 0))
    assert a.macs() == count_macs(a.gm, (torch.randn(2, 4, 6),))


class Scan(nn.Module):
    """A one-step selective scan: outer product of ``d_inner`` (5) and ``d_state`` (3) channels."""

    def __init__(self):
        super().__init__()
        self.x, self.b = nn.Linear(4, 5), nn.Linear(4, 3)
        self.a_log, self.d = nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(5))
        self.out = nn.Linear(5, 2)

    def forward(self, u):
        x, b = self.x(u), self.b(u)                                    # [N, 5], [N, 3]
        a = -torch.exp(self.a_log.float())
        state = torch.zeros(u.shape[0], self.x.out_features, self.b.out_features)
        state = torch.exp(a[None] * x[:, :, None]) * state + x[:, :, None] * b[:, None, :]
        y = (state @ b[:, :, None])[:, :, 0] + x * self.d[None]
        return self.out(y)


def test_outer_product_carries_the_larger_space():
    u = torch.randn(2, 4)
    a = analyze(Scan(), u)
    inner, state = group_with(a, "x.weight", 0), group_with(a, "b.weight", 0)
    assert inner.prunable and {("a_log", 0, "const"), ("d", 0, "const")} <= param_members(inner)
    assert [m.site.index for m in inner.members if m.site.kind == "shape_arg"] == [1]
    assert not state.prunable and "outer product of two channel spaces (3 channels on axes (2,), 5 on axes " \
        "(1,))" in state.reason
    assert a.macs() == count_macs(a.gm, (u,))
    target = a.macs(channels={inner.id: 4}) / a.macs()  # one d_inner channel less
    small = fxadapt.transform(Scan(), target, (u,))
    assert type(small) is Scan and small.x.out_features < 5 and small(torch.randn(3, 4)).shape == (3, 2)


class FixedOperand(nn.Module):
    """A buffer reaching the channels through a non-element-wise op (``cumsum``) keeps them fixed."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.register_buffer("c", torch.randn(5))

    def forward(self, u):
        return self.lin(u) * torch.cumsum(self.c, 0)


def test_other_fixed_operands_freeze_with_a_reason():
    a = analyze(FixedOperand(), torch.randn(2, 4))
    g = group_with(a, "lin.weight", 0)
    assert not g.prunable and "combined with fixed-size tensor cumsum" in g.reason
