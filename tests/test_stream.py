"""Streaming a checkpoint (``fxadapt.adapt_checkpoint``) equals the in-memory transform + save_pretrained.

References are independent of the streaming code: the in-memory ``transform`` of the model loaded with
``from_pretrained``, its ``save_pretrained`` files (read back with ``safetensors.safe_open``), the stock
loader and the original's own config.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

import fxadapt  # noqa: E402
from fxadapt.cli import main  # noqa: E402

IDS = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))   # the CLI's example


def _tensors(d: str) -> dict[str, torch.Tensor]:
    files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
    out = {}
    for f in files:
        with safe_open(os.path.join(d, f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _config(d: str) -> dict:
    with open(os.path.join(d, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    """A tiny bf16 Llama saved in several shards."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    d = str(tmp_path_factory.mktemp("llama"))
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d, max_shard_size="50KB")
    assert len([f for f in os.listdir(d) if f.endswith(".safetensors")]) > 2
    return d


def _in_memory(src: str, out: str, layers: str):
    model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    small = fxadapt.transform(model, 0.5, {"input_ids": IDS}, layers=layers)
    small.save_pretrained(out, max_shard_size="50KB")
    return small


@pytest.mark.parametrize("layers", ["uniform", "any"])
def test_stream_equals_in_memory(src, tmp_path, layers):
    streamed, memory = str(tmp_path / "s"), str(tmp_path / "m")
    res = fxadapt.adapt_checkpoint(src, 0.5, streamed, layers=layers, max_shard_size="50KB")
    small = _in_memory(src, memory, layers)
    got, want = _tensors(streamed), _tensors(memory)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert _config(streamed) == _config(memory)
    assert sorted(os.listdir(streamed)) == sorted(os.listdir(memory))   # shards, index, configs
    with open(os.path.join(streamed, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(want)
    assert 0.45 < res.macs_after / res.macs_before <= 0.5
    uniform = layers == "uniform"
    assert ("fxadapt_recipe" in _config(streamed)) != uniform
    load = transformers.AutoModelForCausalLM.from_pretrained if uniform else fxadapt.from_pretrained
    again = load(streamed).eval()
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, small(IDS).logits)
        out = again.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    if uniform:
        assert type(again) is transformers.LlamaForCausalLM
        assert again.config.hidden_size < 64 and again.config.intermediate_size < 172


def test_stream_reads_one_tensor_at_a_time(src, tmp_path, monkeypatch):
    """The weights come from the files one tensor at a time; no whole state dict is loaded."""
    from fxadapt.export import shards

    reads: list[str] = []
    real = shards.Checkpoint.read
    monkeypatch.setattr(shards.Checkpoint, "read",
                        lambda self, k, reuse=False: (reads.append(k), real(self, k, reuse))[1])
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("streaming must not load the model")))
    fxadapt.adapt_checkpoint(src, 0.5, str(tmp_path / "s"))
    n = len(_tensors(src))
    assert set(reads) == set(_tensors(src)) and len(reads) < 3 * n   # scored once, written once (at most)


def test_stream_refuses_other_architectures_and_budgets(tmp_path):
    gpt = str(tmp_path / "gpt")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2,
                                                         vocab_size=50)).save_pretrained(gpt)
    with pytest.raises(fxadapt.InputError, match="streaming adapts LlamaForCausalLM"):
        fxadapt.adapt_checkpoint(gpt, 0.5, str(tmp_path / "o"))
    assert not os.path.exists(tmp_path / "o")


def test_stream_refuses_growth(src, tmp_path):
    with pytest.raises(fxadapt.InputError, match="shrinks"):
        fxadapt.adapt_checkpoint(src, 1.5, str(tmp_path / "o"))


def test_cli_streams_above_half_the_memory(src, tmp_path, capsys, monkeypatch):
    from fxadapt.cli import hf

    monkeypatch.setattr(hf, "available_memory", lambda: 1000)   # the checkpoint is over half of it: streamed
    out = str(tmp_path / "cli")
    assert main(["adapt", src, "--budget", "0.5", "-o", out, "--max-shard-size", "50KB"]) == 0
    text = capsys.readouterr()
    assert "is over half the available memory" in text.out and "streaming it" in text.out
    assert "MACs ratio" in text.out and f"saved {out} (streamed" in text.out
    assert "write shards" not in text.err                # bars only on a terminal (test_stream_cli.py)
    model = fxadapt.from_pretrained(out)
    assert model.config.hidden_size < 64
    bad = ["adapt", src, "--stream", "--onnx", str(tmp_path / "x.onnx"), "-o", str(tmp_path / "x")]
    assert main(bad) == 2
    assert "--stream writes the adapted checkpoint only" in capsys.readouterr().err


def test_memory_error_names_the_memory_needed(src, tmp_path, monkeypatch):
    from fxadapt.export import stream

    monkeypatch.setattr(stream, "available_memory", lambda: 1 << 20)
    with pytest.raises(fxadapt.ResourceError, match=r"streaming needs 1\.0 GiB \(\d+ bytes\) of memory"):
        fxadapt.adapt_checkpoint(src, 0.5, str(tmp_path / "o"))
