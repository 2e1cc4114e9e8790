"""Streamed scoring on calibration data (``fxadapt.export.stream_score``): the statistics gathered with one
unit's weights resident equal hooks on the fully loaded model, and the streamed plan keeps the units those
reference statistics rank first."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import fxadapt  # noqa: E402
from fxadapt.errors import InputError  # noqa: E402
from fxadapt.export.shards import Checkpoint  # noqa: E402
from fxadapt.export.stream import _checkpoint_keys, adapt_checkpoint, meta_model  # noqa: E402
from fxadapt.export.stream_score import Probe, activation_stats, units  # noqa: E402

LAYERS = 2


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    path = str(tmp_path_factory.mktemp("src"))
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def data() -> torch.Tensor:
    return torch.randint(0, 64, (3, 2, 12), generator=torch.Generator().manual_seed(1))


def reference(path: str) -> dict[tuple[str, bool], np.ndarray]:
    """Mean |activation| per position over every token, by hooks on the fully loaded model."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    sums: dict = {}

    def add(key, x):
        x = x.detach().reshape(-1, x.shape[-1]).double()
        s, n = sums.get(key, (0, 0))
        sums[key] = (s + x.abs().sum(0), n + x.shape[0])

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_pre_hook(lambda _m, i, k=(name, True): add(k, i[0]))
        if isinstance(mod, torch.nn.Embedding):
            mod.register_forward_hook(lambda _m, _i, o, k=(name, False): add(k, o))
    with torch.no_grad():
        for ids in data():
            model(input_ids=ids, use_cache=False)
    return {k: (s / n).numpy() for k, (s, n) in sums.items()}


def test_units_are_layers_and_weighted_leaves(src):
    model = meta_model(transformers.AutoConfig.from_pretrained(src), Checkpoint(src))
    names = [n for n, _ in units(model)]
    assert names == ["model.embed_tokens", *[f"model.layers.{i}" for i in range(LAYERS)], "model.norm",
                     "lm_head"]


def test_streamed_statistics_equal_the_loaded_model(src):
    ckpt = Checkpoint(src)
    model = meta_model(transformers.AutoConfig.from_pretrained(src), ckpt)
    ref = reference(src)
    probes = [Probe(0, name, inp, np.zeros(0, dtype=np.int64)) for name, inp in ref]
    resident, runs = [], []
    for name, mod in model.named_modules():   # while a layer's Linear runs, the tensors not on meta are its
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            mod.register_forward_pre_hook(lambda *_, i=name.split(".")[2]: resident.append(
                {n.split(".")[2] for n, p in model.named_parameters() if not p.is_meta} == {i}))
    got = activation_stats(model, ckpt, _checkpoint_keys(model, ckpt), probes, data(),
                           lambda: runs.append(1))
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-9, err_msg=str(k))
    assert len(resident) == LAYERS * 7 and all(resident)
    assert all(p.is_meta for p in model.parameters())   # every unit put back on meta
    assert len(runs) == LAYERS + 2   # embedding, layers, norm once (one chunk): the logits are never needed


def kept_rows(orig: torch.Tensor, new: torch.Tensor) -> list[int]:
    """Rows of ``orig`` that ``new`` holds, in order (rows are distinct random vectors)."""
    return [int(torch.nonzero((orig == r).all(1)).flatten()[0]) for r in new]


def test_streamed_plan_keeps_the_most_active_units_and_generates(src, tmp_path):
    ref = reference(src)
    out = str(tmp_path / "out")
    res = adapt_checkpoint(src, 0.5, out, data=data())
    assert 0.4 < res.macs_after / res.macs_before <= 0.5
    a, b = Checkpoint(src), Checkpoint(out)
    for i in range(LAYERS):
        w = f"model.layers.{i}.mlp.gate_proj.weight"
        kept = kept_rows(a.read(w), b.read(w))
        top = np.sort(np.argsort(-ref[(f"model.layers.{i}.mlp.down_proj", True)], kind="stable")[:len(kept)])
        assert kept == top.tolist()
        heads = ref[(f"model.layers.{i}.self_attn.o_proj", True)].reshape(2, -1).sum(1)   # 2 kv groups
        w = f"model.layers.{i}.self_attn.k_proj.weight"
        kv = sorted({r // 8 for r in kept_rows(a.read(w), b.read(w))})
        assert kv == np.sort(np.argsort(-heads, kind="stable")[:len(kv)]).tolist()
    free = str(tmp_path / "free")
    adapt_checkpoint(src, 0.5, free)
    assert Checkpoint(free).entries.keys() == b.entries.keys()   # the same widths as without data
    assert all(Checkpoint(free).entries[k].shape == b.entries[k].shape for k in b.entries)
    load = fxadapt.from_pretrained if getattr(res.config, "fxadapt_recipe", None) else \
        transformers.AutoModelForCausalLM.from_pretrained
    model = load(out).eval()
    ids = data()[0]
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape == (2, 15)


def test_bad_data_is_refused_before_the_plan(src, tmp_path):
    with pytest.raises(InputError, match="token ids"):
        adapt_checkpoint(src, 0.5, str(tmp_path / "o"), data=torch.rand(2, 8))
    with pytest.raises(InputError, match="vocab_size"):
        adapt_checkpoint(src, 0.5, str(tmp_path / "o"), data=torch.full((2, 8), 64))
