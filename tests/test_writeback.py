"""Write-back: ``transform`` returns the user's own class, checked here against independent references —
the original model (function-preserving growth, greedy tokens), the graph output mode, FlopCounterMode,
a stock ``from_pretrained`` — at the example inputs and at other batch sizes / sequence lengths."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.analysis.count import count_macs
from fxadapt.examples import EXAMPLE_INPUT_SHAPE, example_model

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _llama(kv=2):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))


def _quiet_transform(model, budget, inputs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fxadapt.transform(model, budget, inputs, **kw)


def test_cnn_keeps_its_class_and_runs_at_other_shapes_like_the_graph():
    model = example_model().eval()
    x = torch.randn(EXAMPLE_INPUT_SHAPE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = fxadapt.transform(model, 0.5, (x,))
    graph = fxadapt.transform(model, 0.5, (x,), output="graph")
    assert type(small) is type(model) and not isinstance(small, torch.fx.GraphModule)
    assert isinstance(graph, torch.fx.GraphModule)
    for k, v in model.state_dict().items():            # the caller's model is untouched
        assert torch.equal(v, before[k])
    for xs in (x, torch.randn(3, *x.shape[1:])):
        torch.testing.assert_close(small(xs), graph(xs), rtol=1e-5, atol=1e-5)
    big = torch.randn(2, 3, 48, 48)                     # another image size: the graph is not needed there
    assert small(big).shape == model(big).shape
    assert count_macs(small, (x,)) == fxadapt.report(small).macs_after
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.shape[0] == c.out_channels and c.weight.shape[1] * c.groups == c.in_channels
               for c in convs)
    assert sum(c.out_channels for c in convs) \
            < sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("budget", [0.5, 1.5])
def test_llama_result_is_a_working_llama(budget):
    model = _llama()
    out = _quiet_transform(model, budget, {"input_ids": IDS})
    assert type(out) is transformers.LlamaForCausalLM
    macs = count_macs(out, {"input_ids": IDS, "use_cache": False})
    assert abs(macs / count_macs(model, {"input_ids": IDS, "use_cache": False}) - budget) <= 0.011 * budget
    for shape in ((1, 7), (3, 40)):                     # sequence lengths the capture never saw
        ids = torch.randint(0, 96, shape)
        assert out(ids).logits.shape == (*shape, 96)
    ids = torch.randint(0, 96, (3, 12))
    loss = out(ids, labels=ids).loss
    loss.backward()                                      # trains with labels=
    assert torch.isfinite(loss) and out.model.layers[0].mlp.down_proj.weight.grad is not None
    gen = out.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False)
    assert gen.shape == (1, 11)
    if budget > 1:                                       # grown function-preservingly: the original's tokens
        assert torch.equal(gen, model.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False))
        torch.testing.assert_close(out(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_llama_kv_cache_decoding_matches_full_forward():
    out = _quiet_transform(_llama(), 0.5, {"input_ids": IDS})
    ids = IDS[:1, :9]
    full = out(ids).logits[:, -1]
    step = out(ids[:, :8], use_cache=True)
    last = out(ids[:, 8:], past_key_values=step.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(last, full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("budget", [0.5, 1.5])
def test_uniform_layers_round_trip_through_stock_from_pretrained(tmp_path, budget):
    cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    small = _quiet_transform(model, budget, {"input_ids": IDS}, layers="uniform")
    ups = {m.out_features for n, m in small.named_modules() if n.endswith("mlp.up_proj")}
    qs = {m.out_features for n, m in small.named_modules() if n.endswith("self_attn.q_proj")}
    assert len(ups) == 1 and len(qs) == 1                          # one width per repeated layer kind
    assert getattr(small.config, "fxadapt_recipe", None) is None   # the stock config states it all
    assert small.config.intermediate_size == ups.pop() != 128 or small.config.num_attention_heads != 4
    r = fxadapt.report(small)
    assert abs(r.macs_after / r.macs_before - budget) <= 0.011 * budget
    small.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()   # stock, no fxadapt
    ids = torch.randint(0, 96, (2, 11))
    torch.testing.assert_close(again(ids).logits, small(ids).logits, rtol=0, atol=1e-6)


def test_uniform_classes_tie_repeated_groups_only():
    from fxadapt.planning.uniform import classes

    a = fxadapt.analyze(_llama(), {"input_ids": IDS})
    tied = [c for c in classes(a, [g.id for g in a.prunable]) if len(c) > 1]
    assert len(tied) == 2 and all(len(c) == 2 for c in tied)        # heads and MLP of the 2 layers
    names = [{m.site.ref.target for m in a.groups[g].members if m.site.kind == "param"} for g in tied[0]]
    assert all(".0." in n for n in names[0]) and all(".1." in n for n in names[1])


def test_heterogeneous_widths_round_trip_through_the_recipe(tmp_path):
    small = _quiet_transform(_llama(), 0.5, {"input_ids": IDS})
    small.save_pretrained(tmp_path)
    again = fxadapt.from_pretrained(tmp_path)
    ids = torch.randint(0, 96, (2, 11))
    torch.testing.assert_close(again(ids).logits, small(ids).logits, rtol=0, atol=1e-6)
    fresh = fxadapt.apply(fxadapt.recipe_of(small), _llama())     # the recipe on any fresh instance
    fresh.load_state_dict(small.state_dict())
    torch.testing.assert_close(fresh(ids).logits, small(ids).logits, rtol=0, atol=1e-6)


def test_config_states_the_new_sizes():
    model = _llama()
    small = _quiet_transform(model, 0.5, {"input_ids": IDS})
    assert small.config.hidden_size == small.model.embed_tokens.weight.shape[1]
    assert model.config.hidden_size == 64                    # the original's config is its own
    for layer in small.model.layers:
        attn = layer.self_attn
        assert attn.q_proj.out_features == attn.o_proj.in_features
        assert attn.q_proj.out_features // attn.head_dim \
                == attn.k_proj.out_features // attn.head_dim * attn.num_key_value_groups


def test_fxadapt_save_load_of_a_module_result(tmp_path):
    model = example_model().eval()
    x = torch.randn(EXAMPLE_INPUT_SHAPE)
    small = fxadapt.transform(model, 0.5, (x,))
    fxadapt.save(small, tmp_path / "s.pt")
    again = fxadapt.load(tmp_path / "s.pt")              # the class rebuilt by its no-argument constructor
    assert type(again) is type(model)
    torch.testing.assert_close(again.eval()(x), small.eval()(x), rtol=0, atol=0)
    assert torch.load(tmp_path / "s.pt")["format"] == "fxadapt.module/1"   # weights_only=True reads it


class ConstantView(nn.Module):
    """A size baked into forward: the write-back cannot change it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).view(-1, 32))


def test_constant_in_forward_falls_back_to_the_graph_with_a_warning():
    x = torch.randn(2, 8)
    with pytest.warns(fxadapt.WriteBackWarning, match=r"ConstantView.*view\(-1, 32\)"):
        out = fxadapt.transform(ConstantView(), 0.5, (x,), solve=fxadapt.SolveConfig(align=1))
    assert isinstance(out, torch.fx.GraphModule)
    with pytest.raises(fxadapt.WriteBackError, match="ConstantView"):
        fxadapt.transform(ConstantView(), 0.5, (x,), solve=fxadapt.SolveConfig(align=1), write_back="strict")


def test_depth_removal_deletes_whole_layers_and_renumbers_layer_idx():
    from fxadapt.passes.materialize import apply_plan

    from fxadapt.ir.inputs import as_inputs
    from fxadapt.planning.plan import make_plan
    from fxadapt.writeback.build import Reference, write_back

    model = _llama()
    inputs = as_inputs({"input_ids": IDS})
    a = fxadapt.analyze(model, inputs)
    layer0 = [b.id for b in a.blocks if b.removable][:2]          # layer 0: its attention and MLP halves
    plan = make_plan(a, {}, remove=layer0)
    graph = apply_plan(a.gm, plan).graph_module
    macs = count_macs(graph, inputs)
    wb = write_back(model, plan, inputs, Reference(graph, a.gm, macs, False))
    assert wb.module is not None, wb.reason
    assert len(wb.module.model.layers) == 1 and wb.module.config.num_hidden_layers == 1
    assert wb.module.model.layers[0].self_attn.layer_idx == 0
    assert [o["op"] for o in wb.recipe.ops if o["op"] in ("delete", "insert", "zero")] == ["delete"]
    gen = wb.module.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 7)


def test_cli_adapts_a_save_pretrained_directory(tmp_path, capsys):
    from fxadapt.cli import main

    src, out = tmp_path / "llama", tmp_path / "small"
    _llama().save_pretrained(src)
    assert main(["inspect", str(src)]) == 0
    assert "input input_ids=2x16:int64" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert main(["adapt", str(src), "--budget", "0.5", "-o", str(out), "--quiet"]) == 0
    again = fxadapt.from_pretrained(out)
    assert type(again) is transformers.LlamaForCausalLM
    full = count_macs(_llama(), {"input_ids": IDS, "use_cache": False})
    assert abs(count_macs(again, {"input_ids": IDS, "use_cache": False}) / full - 0.5) <= 0.0055
    assert again.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_graph_output_has_a_free_sequence_axis():
    graph = _quiet_transform(_llama(), 0.5, {"input_ids": IDS}, output="graph")
    assert isinstance(graph, torch.fx.GraphModule)
    assert dict(fxadapt.report(graph).dynamic)["input_ids"] == (0, 1)
    module = _quiet_transform(_llama(), 0.5, {"input_ids": IDS})
    ids = torch.randint(0, 96, (3, 23))                 # neither the batch nor the length of the capture
    torch.testing.assert_close(graph(input_ids=ids).logits, module(ids, use_cache=False).logits,
                               rtol=1e-5, atol=1e-5)


def test_onnx_export_leaves_batch_and_image_axes_free(tmp_path):
    import numpy as np
    import onnxruntime as ort

    model = example_model().eval()
    x = torch.randn(EXAMPLE_INPUT_SHAPE)
    small = fxadapt.transform(model, 0.5, (x,))
    res = fxadapt.export_onnx(small, (x,), str(tmp_path / "s.onnx"))
    assert res.dynamic == ((0, 2, 3),) and res.folded_bn > 0
    sess = ort.InferenceSession(res.path, providers=["CPUExecutionProvider"])
    for shape in ((3, 3, 32, 32), (2, 3, 40, 24)):      # shapes the export never saw
        xs = torch.randn(shape)
        got = sess.run(None, {sess.get_inputs()[0].name: xs.numpy()})[0]
        np.testing.assert_allclose(got, small.eval()(xs).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_depth_growth_inserts_layers_that_generate_the_original_tokens():
    model = _llama()
    big = _quiet_transform(model, 2.5, {"input_ids": IDS}, grow_depth=True)
    assert type(big) is transformers.LlamaForCausalLM
    assert len(big.model.layers) == 4 and big.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in big.model.layers] == [0, 1, 2, 3]   # the KV cache's index
    ops = [o["op"] for o in fxadapt.recipe_of(big).ops]
    assert ops.count("insert") == 2
    prompt = IDS[:1, :5]
    torch.testing.assert_close(big(IDS).logits, model(IDS).logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(big.generate(prompt, max_new_tokens=6, do_sample=False),
                       model.generate(prompt, max_new_tokens=6, do_sample=False))


def test_depth_growth_of_a_cnn_adds_units_to_its_stages():
    model = example_model().eval()
    x = torch.randn(2, 3, 32, 32)
    big = fxadapt.transform(model, 2.0, (x,), grow_depth=True)
    assert type(big) is type(model)
    added = [n for n, _ in big.named_modules() if n.endswith("__rep1")]
    assert added and all(n.count(".") == 1 for n in added)        # whole units inside their Sequential stage
    torch.testing.assert_close(big(x), model(x), rtol=1e-4, atol=1e-5)
    assert count_macs(big, (x,)) == fxadapt.report(big).macs_after


@pytest.mark.parametrize("options, message", [
    ({"data": [1, 2, 3], "strategy": "dna"}, r"data must be \(inputs, targets\) tensors.*got a list of int"),
    ({"device": "cuda:7" if torch.cuda.is_available() else "cuda"}, r"CUDA device"),
    ({"device": "tpu9"}, r"TransformConfig.device: unknown device 'tpu9'"),
    ({"layers": "same"}, r"TransformConfig.layers must be one of 'any', 'uniform'; got 'same'"),
    ({"output": "onnx"},
     r"TransformConfig.output must be one of 'module', 'graph', 'exported_program'; got 'onnx'"),
    ({"write_back": "maybe"}, r"TransformConfig.write_back must be one of 'auto', 'strict'; got 'maybe'"),
    ({"precision": "fp16"}, r"TransformConfig.precision must be one of 'auto', 'bf16', 'fp32'; got 'fp16'"),
    ({"attention": "rows"},
     r"TransformConfig.attention must be one of 'auto', 'heads', 'head_dim'; got 'rows'"),
])
def test_bad_options_are_one_line_errors(options, message):
    data = options.pop("data", None)
    with pytest.raises(fxadapt.InputError, match=message) as e:
        fxadapt.transform(nn.Linear(4, 2), 0.5, (torch.randn(2, 4),), data=data, **options)
    assert "\n" not in str(e.value)


def test_failed_capture_keeps_torch_dumps_out_of_stderr(capfd):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else 2 * self.lin(x)

    with pytest.raises(fxadapt.CaptureError, match="data-dependent"):
        fxadapt.transform(Branchy(), 0.5, (torch.randn(2, 4),))
    assert "def forward" not in capfd.readouterr().err


def test_cli_leaves_no_process_wide_warnings_filter():
    from fxadapt.cli import main

    before = list(warnings.filters)
    assert main(["inspect", "--example", "--input-shape", "1,3,x"]) == 2
    assert warnings.filters == before


def test_fur_with_a_latency_only_budget_is_a_clear_error():
    """FUR searches MAC budgets; a latency-only budget says which strategies take it (DNA does:
    tests/test_latency_search.py)."""
    x = torch.randn(8, 3, 32, 32)
    with pytest.raises(fxadapt.BudgetError, match="strategy='dna'.*'datafree'"):
        fxadapt.transform(example_model(), fxadapt.Budget(latency=0.5), (x[:1],),
                          data=(x, torch.zeros(8).long()), strategy="fur")
