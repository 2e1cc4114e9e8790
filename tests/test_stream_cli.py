"""``fxadapt adapt hf_dir -o out [--stream]``: ``--layers``, the refused / overwritten output folder, no half
checkpoint after a failure, the memory error and the progress bars (issue 26, items 3 and 5).

References are independent of the code under test: stock ``transformers`` loading (with its loading info),
``FlopCounterMode`` on the original and the loaded result, the source tensors read with ``safetensors``, the
bytes of the files left on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch
from safetensors import safe_open
from torch.utils.flop_counter import FlopCounterMode

transformers = pytest.importorskip("transformers")

import fxadapt  # noqa: E402
from fxadapt.cli import hf, main  # noqa: E402
from fxadapt.export import stream  # noqa: E402

IDS = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    """A tiny float32 Llama (2 layers) saved in several shards."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    d = str(tmp_path_factory.mktemp("llama"))
    transformers.LlamaForCausalLM(cfg).save_pretrained(d, max_shard_size="50KB")
    return d


def _flops(model) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as f:
        model(IDS)
    return f.get_total_flops()


def _tensors(d: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _files(d: str) -> dict[str, bytes]:
    out = {}
    for f in sorted(os.listdir(d)):
        with open(os.path.join(d, f), "rb") as h:
            out[f] = h.read()
    return out


def _adapt(*args: str) -> int:
    return main(["adapt", *args, "--budget", "0.5", "--max-shard-size", "50KB"])


def test_layers_uniform_loads_with_stock_from_pretrained(src, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)   # a terminal, but --quiet: no bars
    streamed, memory, default = (str(tmp_path / n) for n in ("s", "m", "d"))
    assert _adapt(src, "-o", streamed, "--stream", "--layers", "uniform", "--quiet") == 0
    assert _adapt(src, "-o", default, "--stream", "--quiet") == 0
    assert "write" not in capsys.readouterr().err
    assert _adapt(src, "-o", memory, "--layers", "uniform", "--quiet") == 0   # the in-memory path
    original = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    for d in (streamed, memory):
        model, info = transformers.AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
        assert type(model) is transformers.LlamaForCausalLM
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert model.config.hidden_size < 64 and model.config.intermediate_size < 172
        assert 0.4 < _flops(model.eval()) / _flops(original) <= 0.5 + 1e-3
        with torch.no_grad():
            assert torch.isfinite(model(IDS).logits).all()
    got, want = _tensors(streamed), _tensors(memory)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with open(os.path.join(default, "config.json")) as f:
        assert "fxadapt_recipe" in json.load(f)   # the default (--layers any) keeps per-layer widths


def test_non_empty_output_refused_unless_overwrite(src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    (out / "model-00001-of-00009.safetensors").write_bytes(b"stale")
    for extra in (["--stream"], []):   # streamed and in memory: refused before any work, one line
        assert _adapt(src, "-o", str(out), *extra, "--quiet") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not empty" in err and "--overwrite" in err
    assert sorted(os.listdir(out)) == ["model-00001-of-00009.safetensors", "tokenizer.json"]
    assert _adapt(src, "-o", str(tmp_path / "out" / "tokenizer.json"), "--stream") == 2
    assert "is a file" in capsys.readouterr().err
    assert _adapt(src, "-o", str(out), "--stream", "--overwrite", "--quiet") == 0
    left = sorted(os.listdir(out))
    assert "tokenizer.json" in left and "model-00001-of-00009.safetensors" not in left   # stale shard gone
    assert os.listdir(tmp_path) == ["out"]                                               # no temp folder
    assert fxadapt.from_pretrained(str(out)).config.hidden_size < 64


def test_failure_mid_write_leaves_no_checkpoint(src, tmp_path, monkeypatch):
    real, calls = stream._sliced, []

    def flaky(ckpt, key, edits):
        calls.append(key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(ckpt, key, edits)

    monkeypatch.setattr(stream, "_sliced", flaky)
    with pytest.raises(KeyboardInterrupt):
        fxadapt.adapt_checkpoint(src, 0.5, str(tmp_path / "new" / "deep" / "out"))
    assert os.listdir(tmp_path) == []   # no out, no temporary folder, no parent folders
    old = tmp_path / "old"               # an existing checkpoint, overwritten: untouched by the failure
    old.mkdir()
    (old / "config.json").write_text('{"a": 1}')
    (old / "model.safetensors").write_bytes(b"weights")
    before = _files(str(old))
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        fxadapt.adapt_checkpoint(src, 0.5, str(old), overwrite=True)
    assert _files(str(old)) == before and os.listdir(tmp_path) == ["old"]


def test_memory_and_disk_errors_name_the_bytes(src, tmp_path, monkeypatch, capsys):
    largest = max(t.numel() * t.element_size() for t in _tensors(src).values())
    total = sum(t.numel() * t.element_size() for t in _tensors(src).values())
    monkeypatch.setattr(stream, "available_memory", lambda: 1 << 20)
    assert _adapt(src, "-o", str(tmp_path / "o"), "--stream") == 2
    err = capsys.readouterr().err
    need = 2 * largest + (1 << 30)
    assert err.count("\n") == 1 and f"streaming needs 1.0 GiB ({need} bytes) of memory" in err
    assert "1.0 MiB (1048576 bytes) are available: close other programs" in err
    with pytest.raises(fxadapt.ResourceError, match=rf"needs up to .* \({total} bytes\) of disk .* "
                                                    rf"10 B \(10 bytes\) are available: free disk space"):
        monkeypatch.setattr(stream, "available_memory", lambda: None)
        monkeypatch.setattr(stream.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 90, 10))
        fxadapt.adapt_checkpoint(src, 0.5, str(tmp_path / "o"))
    assert os.listdir(tmp_path) == []


def test_bars_per_shard_and_layer_on_a_terminal(src, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert hf.sys.stderr.isatty()
    assert _adapt(src, "-o", str(tmp_path / "o"), "--stream") == 0
    err = capsys.readouterr().err
    shards = len([f for f in os.listdir(tmp_path / "o") if f.endswith(".safetensors")])
    assert shards > 1 and "write shards: 100%|" in err and f"{shards}/{shards} [" in err
    assert "write layers" in err and "2/2 [" in err   # the source's two decoder layers


def test_cli_streams_with_data_as_the_python_call_does(src, tmp_path):
    # --data's training part (ids, labels) -> the ids score the units, exactly as adapt_checkpoint(data=ids)
    ids = torch.randint(0, 128, (2, 4, 16), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "calib.py").write_text("import torch\n\ndef load():\n"
                                       f"    ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
                                       "    return (ids, ids), None\n")
    out_cli, out_py = str(tmp_path / "cli"), str(tmp_path / "py")
    assert main(["adapt", src, "--budget", "0.5", "-o", out_cli, "--stream", "--quiet",
                 "--data", f"{tmp_path / 'calib.py'}:load"]) == 0
    fxadapt.adapt_checkpoint(src, 0.5, out_py, data=ids)
    free = str(tmp_path / "free")
    fxadapt.adapt_checkpoint(src, 0.5, free)
    got, want, df = _tensors(out_cli), _tensors(out_py), _tensors(free)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in df.items()}   # data-free widths
    assert any(not torch.equal(got[k], df[k]) for k in got)                             # other units kept


def test_cli_stream_refuses_a_search_strategy(src, tmp_path, capsys):
    (tmp_path / "calib.py").write_text("import torch\n\ndef load():\n"
                                       "    return torch.zeros(2, 8).long(), None\n")
    code = main(["adapt", src, "--budget", "0.5", "-o", str(tmp_path / "o"), "--stream", "--strategy", "dna",
                 "--data", f"{tmp_path / 'calib.py'}:load"])
    assert code != 0
    assert "--strategy dna" in capsys.readouterr().err
