"""The input model is never mutated, and the result shares its unchanged tensors copy-on-write (issue 26).

``transform`` no longer deep-copies the user's model (capture, materialize and write-back hold
copy-on-write clones, ``fxadapt.ir.share``): these tests pin that sharing is invisible — training either
model leaves the other's outputs and tensors as they were — and that the meta-device fast paths
(``passes.meta_run``, ``writeback.shapes_at``) give what the fake-tensor / real runs gave.
"""

from __future__ import annotations

import copy

import pytest
import torch
from fxadapt.passes.meta_run import run_on_meta
from fxadapt.passes.shape_check import shape_check
from torch import nn

import fxadapt
from fxadapt.examples import EXAMPLE_INPUT_SHAPE, example_model
from fxadapt.ir.inputs import as_inputs
from fxadapt.ir.share import lazy_clone, shared_copy
from fxadapt.writeback.shapes_at import original_outputs

COW = hasattr(torch, "_lazy_clone")


def _train(model: nn.Module, x, steps: int = 3) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        (out.logits if hasattr(out, "logits") else out).float().pow(2).mean().backward()
        opt.step()
    model.eval()


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(model: nn.Module, saved: dict) -> None:
    now = model.state_dict()
    assert now.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(now[k], v), k


def test_training_the_result_leaves_the_input_unchanged_and_back():
    torch.manual_seed(0)
    model = example_model().eval()
    x = torch.randn(EXAMPLE_INPUT_SHAPE)
    before, y = _state(model), model(x).detach()
    small = fxadapt.transform(model, 0.5, (x,))
    assert not any(p is q for p in small.parameters() for q in model.parameters())
    _train(small, x)
    _assert_same(model, before)
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)
    saved_small, y_small = _state(small), small(x).detach()
    _train(model, x)                       # and the user training the input leaves the result as it was
    _assert_same(small, saved_small)
    torch.testing.assert_close(small(x), y_small, rtol=0, atol=0)


@pytest.mark.skipif(not COW, reason="torch without _lazy_clone: shared_copy clones")
def test_unchanged_tensors_are_shared_copy_on_write():
    torch.manual_seed(0)
    model = example_model().eval()
    x = torch.randn(EXAMPLE_INPUT_SHAPE)
    small = fxadapt.transform(model, 0.5, (x,))
    mine, theirs = small.state_dict(), model.state_dict()
    same = [k for k, v in mine.items() if k in theirs and v.shape == theirs[k].shape]
    assert same, "some tensor keeps its shape"
    assert all(torch._C._is_cow_tensor(mine[k]) for k in same if mine[k].numel())


def test_hf_tied_embeddings_stay_tied_and_the_input_is_not_mutated():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 8))
    before, y = _state(model), model(ids).logits.detach()
    small = fxadapt.transform(model, 0.5, {"input_ids": ids})
    assert small.lm_head.weight is small.model.embed_tokens.weight
    _train(small, ids)
    _assert_same(model, before)
    torch.testing.assert_close(model(ids).logits, y, rtol=0, atol=0)


def test_shared_copy_keeps_ties_and_given_tensors():
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, lin)
    keep = nn.Parameter(torch.zeros(3))
    w = shared_copy(model, {id(lin.bias): keep})
    assert w[0] is w[1] and w[0].weight is not lin.weight and w[0].bias is keep
    assert torch.equal(lazy_clone(lin.weight), lin.weight)


def test_meta_shape_check_records_what_the_fake_check_records():
    torch.manual_seed(0)
    x = torch.randn(EXAMPLE_INPUT_SHAPE)
    a = fxadapt.analyze(example_model().eval(), (x,))
    gm = copy.deepcopy(a.gm)
    assert run_on_meta(gm, [torch.randn(3, *x.shape[1:])])
    on_meta = {n.name: (tuple(n.meta["val"].shape), n.meta["val"].dtype) for n in gm.graph.nodes
               if isinstance(n.meta.get("val"), torch.Tensor)}
    from fxadapt.passes import shape_check as sc

    with sc._fake_mode() as mode, torch.no_grad():
        sc._Recorder(gm).run(*[mode.from_tensor(torch.randn(3, *x.shape[1:]))], enable_io_processing=False)
    on_fake = {n.name: (tuple(n.meta["val"].shape), n.meta["val"].dtype) for n in gm.graph.nodes
               if isinstance(n.meta.get("val"), torch.Tensor)}
    assert on_meta == on_fake and len(on_meta) > 10
    assert shape_check(gm, (x,), fake=True).graph_module is gm


def test_meta_run_declines_what_it_cannot_run():
    class Item(nn.Module):
        def forward(self, x):
            return x * x.sum().item()

    gm = torch.fx.symbolic_trace(Item())
    assert not run_on_meta(gm, [torch.randn(2, 3)])


def test_original_outputs_meta_shapes_and_size_errors():
    fixed = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(6), nn.Flatten())   # runs at 8x8 only
    out, exact = original_outputs(fixed, as_inputs(torch.randn(2, 3, 8, 8)), exact=False)
    assert out.is_meta and tuple(out.shape) == (2, 4) and not exact
    assert original_outputs(fixed, as_inputs(torch.randn(2, 3, 6, 6)), exact=False)[0] is None
    real, exact = original_outputs(fixed, as_inputs(torch.randn(2, 3, 8, 8)), exact=True)
    assert not real.is_meta and exact
