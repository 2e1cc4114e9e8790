"""Mixture of experts (transformers' Mixtral: a top-k router and 3-D expert weights run by the ``grouped_mm``
experts implementation): the router's expert channels, the 3-D tensors' expert axis and histc's bins are one
expert group (removed by params budgets, at least top_k kept, never grown), the hidden size and the experts'
intermediate width are prunable, the cost model agrees with the independent count, removing experts the
router never picks is exact, the adapted model is a ``MixtralForCausalLM`` again (``intermediate_dim``,
``num_experts``, config fields) that generates, and growth is function-preserving."""

from __future__ import annotations

import warnings

import pytest
import torch
from moe_models import E, H, I, K, V, ids, mixtral  # noqa: E402,F401,E741

import fxadapt
from fxadapt.analysis.count import count_macs
from fxadapt.planning.plan import make_plan

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "MixtralConfig") or not hasattr(
        transformers.models.mixtral.modeling_mixtral, "MixtralExperts"):
    pytest.skip("this transformers has no 3-D MixtralExperts", allow_module_level=True)

_mixtral, _ids = mixtral, ids



@pytest.fixture(scope="module")
def analysis():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxadapt.analyze(_mixtral(), {"input_ids": _ids()})


def _by_name(a, name):
    return [g for g in a.groups if g.name == name]


def test_router_experts_are_one_group(analysis):
    """Router rows, both expert tensors' axis 0 and histc's bins are one group of E whole experts, kept out of
    the MAC solvers (``Analysis.prunable``) and moved by a params solve (``params_as_macs``)."""
    a = analysis
    hidden, = _by_name(a, "model.embed_tokens")
    assert (hidden.width, hidden.prunable, hidden.granularity) == (H, True, 4)   # 16-byte runs of fp32
    experts = [g for g in a.groups if g.name.endswith("mlp.experts")]
    # gate|up runs of 4
    assert [(g.width, g.prunable, g.granularity) for g in experts] == [(2 * I, True, 8)] * 2
    routers = [g for g in a.groups if g.name.endswith("mlp.gate")]
    assert [(g.width, g.units, g.prunable, g.top_k) for g in routers] == [(E, E, True, K)] * 2
    for i, g in enumerate(routers):
        axis0 = {(m.target, m.axis) for m in g.members if m.kind == "param"}
        assert axis0 == {(f"model.layers.{i}.mlp.{t}", 0) for t in
                         ("gate.weight", "experts.gate_up_proj", "experts.down_proj")}
        assert [m.site.node_name for m in g.members if m.kind == "shape_arg"] \
                == ["histc" if i == 0 else "histc_1"]
    assert a.experts == routers and not set(map(id, routers)) & set(map(id, a.prunable))
    assert {g.id for g in a.params_as_macs().prunable} == {g.id for g in a.prunable} | {g.id for g in routers}
    assert a.fired["topk"] == 4 and a.fired["histc"] == 2 and a.fired["grouped_mm"] == 4
    assert a.fired["gather_like"] >= 6
    assert a.uncosted == ()


def test_experts_cost_params_not_macs(analysis):
    """Removing 2 experts of layer 0 saves their 3-D slices' parameters and the router's rows; the MACs lose
    only the router's ``T * H * 2`` (every token still runs top_k experts)."""
    a = analysis
    router = _by_name(a, "model.layers.0.mlp.gate")[0]
    expert_params = 2 * (2 * I * H + H * I) + 2 * H       # two experts' gate_up and down, two router rows
    assert a.params() - a.params(units={router.id: E - 2}) == expert_params
    assert a.macs() - a.macs(units={router.id: E - 2}) == 8 * H * 2
    with pytest.raises(ValueError, match="displaces another expert"):
        make_plan(a, {router.id: E + 1})


def test_macs_agree_with_the_independent_count(analysis):
    """Rows are ``T * top_k`` whatever the routing: the cost model's ``T * (top_k/E) * E * K * N`` per grouped
    product is the count of the run at any input."""
    model = _mixtral()
    assert analysis.macs() == count_macs(model, {"input_ids": _ids()})
    assert count_macs(model, {"input_ids": _ids(seed=1)}) == count_macs(model, {"input_ids": _ids(seed=2)})
    moe = 2 * 8 * K * (H * 2 * I + I * H)    # two layers, 8 tokens, gate_up and down
    assert sum(t.value(analysis.cost._n(None)) for t in analysis.cost.macs_terms
               if "grouped_mm" in t.node) == moe


def test_hidden_and_experts_slice_through_the_routing(analysis):
    """A plan that moves the hidden size (the solver may leave it) and each layer's experts differently:
    the sliced graph runs and costs what the cost model says, counted independently."""
    from fxadapt.passes.materialize import materialize

    from fxadapt.planning.plan import make_plan

    a = analysis
    hidden, = _by_name(a, "model.embed_tokens")
    ex0, ex1 = [g for g in a.groups if g.name.endswith("mlp.experts")]
    units = {hidden.id: 5, ex0.id: 3, ex1.id: 9}
    gm = materialize(a.gm, make_plan(a, units)).graph_module
    shapes = {n: tuple(p.shape) for n, p in gm.named_parameters() if "experts" in n}
    assert shapes["model.layers.0.mlp.experts.gate_up_proj"] == (E, 24, 20)
    assert shapes["model.layers.1.mlp.experts.down_proj"] == (E, 20, 36)
    assert count_macs(gm, (_ids(),)) == a.macs(units=units)


@pytest.mark.parametrize("layers", ["per-layer", "uniform"])
def test_shrink_writes_back_the_experts(layers):
    model, ids = _mixtral(), _ids()
    kw = {"layers": "uniform"} if layers == "uniform" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = fxadapt.transform(model, 0.5, {"input_ids": ids}, **kw)
    assert isinstance(small, transformers.MixtralForCausalLM)
    ratio = count_macs(small, {"input_ids": ids}) / count_macs(model, {"input_ids": ids})
    assert abs(ratio / 0.5 - 1) <= 0.01 + (0.02 if layers == "uniform" else 0)
    for layer in small.model.layers:
        ex = layer.mlp.experts
        assert ex.gate_up_proj.shape == (E, 2 * ex.intermediate_dim, ex.hidden_dim)
        assert ex.down_proj.shape == (E, ex.hidden_dim, ex.intermediate_dim)
        assert ex.intermediate_dim < I
    if layers == "uniform":
        assert small.config.intermediate_size == small.model.layers[0].mlp.experts.intermediate_dim
    out = small.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_growth_is_function_preserving():
    model, ids = _mixtral(), _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = fxadapt.transform(model, 1.5, {"input_ids": ids})
    assert isinstance(big, transformers.MixtralForCausalLM)
    ratio = count_macs(big, {"input_ids": ids}) / count_macs(model, {"input_ids": ids})
    assert abs(ratio / 1.5 - 1) <= 0.01
    assert all(layer.mlp.experts.intermediate_dim > I for layer in big.model.layers)
    other = _ids(seq=11, batch=2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(big(other).logits, model(other).logits, rtol=1e-4, atol=1e-5)
    prompt = ids[:, :4]
    torch.testing.assert_close(big.generate(prompt, max_new_tokens=4, do_sample=False),
                               model.generate(prompt, max_new_tokens=4, do_sample=False))


def test_sort_along_channels_freezes_with_its_reason():
    """``sort``/``topk`` along a channel axis name positions as data: those channels freeze, nothing else."""
    class Sorted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)

        def forward(self, x):
            h = self.a(x)
            return self.b(torch.sort(h, -1).values), torch.topk(h, 2, dim=0).values.sum()

    a = fxadapt.analyze(Sorted().eval(), (torch.randn(5, 4),))
    g, = [g for g in a.groups if g.name == "a"]
    assert not g.prunable and "sort along the channel axis" in g.reason


def _route_to_experts_0_and_1(model, batches):
    """Router rows set so that every token of ``batches`` has logits (8, 4, 0, 0): experts 2 and 3 are never
    picked (layer by layer: a router changes the hidden states of the layers after it)."""
    for layer in model.model.layers:
        seen = []
        hook = layer.mlp.gate.register_forward_pre_hook(lambda m, args,
                                                        seen=seen: seen.append(args[0].reshape(-1, H)))
        with torch.no_grad():
            for b in batches:
                model(b)
        hook.remove()
        x = torch.cat(seen).double()                       # [T, H], T <= H: exact solution
        w = (torch.linalg.pinv(x) @ torch.full((len(x),), 8.0, dtype=torch.float64)).float()
        with torch.no_grad():
            layer.mlp.gate.weight.copy_(torch.stack([w, w / 2, torch.zeros(H), torch.zeros(H)]))
    return model


def test_removing_unrouted_experts_is_exact():
    """Experts 2, 3 never picked: the plan keeping 2 experts per layer drops exactly them (lowest router-row
    norm), slices the router rows and the expert tensors, rebins histc, and the result equals the original —
    as a graph and written back into a ``MixtralForCausalLM`` — against tensors sliced by hand."""
    from fxadapt.passes.materialize import materialize

    from fxadapt import meta
    from fxadapt.writeback.build import Reference, write_back

    ids, other = _ids(), _ids(batch=2, seed=5)
    model = _route_to_experts_0_and_1(_mixtral(), [ids, other])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = fxadapt.analyze(model, {"input_ids": ids})
    routers = [g for g in a.groups if g.name.endswith("mlp.gate")]
    gm = materialize(a.gm, make_plan(a, {g.id: 2 for g in routers})).graph_module
    hist = [n for n in gm.graph.nodes if n.target == torch.ops.aten.histc.default]
    assert [n.args[1:4] for n in hist] == [(2, 0, 1)] * 2
    for i in range(2):
        for t in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"):
            name = f"model.layers.{i}.mlp.{t}"
            assert torch.equal(gm.get_parameter(name), model.get_parameter(name)[:2])
    with torch.no_grad():
        for x in (ids, other):
            torch.testing.assert_close(gm(x)[0], model(x).logits, rtol=0, atol=1e-5)
    inputs = a.gm.meta[meta.INPUTS]
    wb = write_back(model, make_plan(a, {g.id: 2 for g in routers}), inputs,
                    Reference(gm, a.gm, count_macs(gm, (ids,)), False))
    small = wb.module
    assert wb.reason is None and isinstance(small, transformers.MixtralForCausalLM)
    assert [(m.mlp.experts.num_experts, m.mlp.gate.num_experts, m.mlp.gate.top_k)
            for m in small.model.layers] \
        == [(2, 2, K)] * 2
    assert small.config.num_local_experts == 2
    with torch.no_grad():
        torch.testing.assert_close(small(other).logits, model(other).logits, rtol=0, atol=1e-5)
    prompt = ids[:, :4]
    torch.testing.assert_close(small.generate(prompt, max_new_tokens=4, do_sample=False),
                               model.generate(prompt, max_new_tokens=4, do_sample=False))


def _n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("layers", ["per-layer", "uniform"])
def test_params_budget_removes_experts(layers, tmp_path):
    """``Budget(params=0.3)``: counted independently the result lies in ``[0.99, 1] * 0.3`` of the original's
    parameters, experts are removed (never below top_k), every size attribute follows, and it generates; with
    uniform layers the stock config states the count and ``from_pretrained`` rebuilds it."""
    model, ids = _mixtral(), _ids()
    kw = {"layers": "uniform"} if layers == "uniform" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = fxadapt.transform(model, fxadapt.Budget(params=0.3), {"input_ids": ids}, **kw)
    assert isinstance(small, transformers.MixtralForCausalLM)
    ratio = _n_params(small) / _n_params(model)
    assert 0.99 * 0.3 <= ratio <= 0.3
    counts = []
    for layer in small.model.layers:
        ex, gate = layer.mlp.experts, layer.mlp.gate
        counts.append(ex.num_experts)
        assert ex.gate_up_proj.shape[0] == ex.down_proj.shape[0] == gate.weight.shape[0] == gate.num_experts
        assert gate.weight.shape[1] == ex.hidden_dim and gate.top_k == K
    assert min(counts) >= K and sum(counts) < 2 * E
    if layers == "uniform":
        assert small.config.num_local_experts == counts[0] == counts[1]
        small.save_pretrained(tmp_path)
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            torch.testing.assert_close(again(ids).logits, small(ids).logits)
    other = _ids(seq=11, batch=2, seed=3)
    with torch.no_grad():
        assert small(other).logits.shape == (2, 11, V)
    assert small.generate(ids[:, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_experts_floor_is_top_k(analysis):
    """The narrowest params solve keeps exactly top_k experts per layer (``solver.unit_bounds``)."""
    from fxadapt.planning.solver import SolveConfig, reachable, solve_widths

    view = analysis.params_as_macs()
    lo, _ = reachable(view, SolveConfig(align=1))
    n = solve_widths(view, lo, SolveConfig(align=1))
    assert [n[g.id] for g in analysis.experts] == [K, K]


def test_ids_read_elsewhere_freeze_the_experts():
    """Expert ids that reach anything but a one-bin-per-expert histc (here ``one_hot``) freeze the router."""
    class OneHot(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router, self.out = torch.nn.Linear(8, 4), torch.nn.Linear(4, 3)

        def forward(self, x):
            idx = torch.topk(self.router(x), 2, dim=-1).indices
            return self.out(torch.nn.functional.one_hot(idx, 4).sum(1).float())

    a = fxadapt.analyze(OneHot().eval(), (torch.randn(5, 8),))
    g, = _by_name(a, "router")
    assert not g.prunable and "expert ids reach aten.one_hot.default" in g.reason
