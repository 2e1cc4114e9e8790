"""A write killed mid-checkpoint (SIGKILL: no cleanup runs) leaves its hidden ``.NAME.partial-*`` folder; the
next write into the same ``out`` removes it when its writer is gone, and keeps it when the writer still runs,
when no marker says who wrote it, or when it belongs to another output name (issue 26, item 3).

The folders are made by real processes: a child enters ``staged`` and is SIGKILLed (or sleeps), so what is
left on disk is what a killed ``fxadapt adapt`` leaves; the next write is the public
``fxadapt.adapt_checkpoint`` on a tiny Llama, checked against stock ``from_pretrained``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fxadapt  # noqa: E402

# A writer: enters ``staged(out)`` for each out given, prints each staged folder, then dies by SIGKILL
# ("kill") or sleeps until killed ("sleep").
WRITER = """
import contextlib, os, signal, sys, time
from fxadapt.export.shards import staged
with contextlib.ExitStack() as stack:
    for out in sys.argv[2:]:
        print(stack.enter_context(staged(out)), flush=True)
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(300)
"""


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    d = str(tmp_path_factory.mktemp("llama"))
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _writer(mode: str, *outs: str) -> tuple[subprocess.Popen, list[str]]:
    """A child process in ``staged`` for each of ``outs``; its staged folders, once all exist."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, mode, *outs], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    folders = [proc.stdout.readline().strip() for _ in outs]
    assert all(os.path.isdir(f) for f in folders), folders
    return proc, folders


def _written(out: str) -> None:
    """``out`` holds a checkpoint that stock transformers loads, and nothing of the staging."""
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size < 64
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]


def test_killed_write_is_removed_by_the_next(src, tmp_path):
    out, other = str(tmp_path / "out"), str(tmp_path / "out2")
    proc, (left, left_other) = _writer("kill", out, other)
    assert proc.wait(timeout=120) == -signal.SIGKILL
    assert os.path.basename(left).startswith(".out.partial-") and os.listdir(left)   # what a kill leaves
    fxadapt.adapt_checkpoint(src, 0.5, out)
    assert not os.path.exists(left)
    assert os.path.isdir(left_other)   # another output's leftover: not this write's to remove
    _written(out)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(left_other), "out"]
    fxadapt.adapt_checkpoint(src, 0.5, other)   # its own next write removes it
    assert sorted(os.listdir(tmp_path)) == ["out", "out2"]


def test_folder_of_a_running_writer_is_kept(src, tmp_path):
    out = str(tmp_path / "out")
    proc, (live,) = _writer("sleep", out)
    try:
        before = {name: open(os.path.join(live, name)).read() for name in os.listdir(live)}
        assert any(str(proc.pid) in text for text in before.values())   # the marker names the writer
        fxadapt.adapt_checkpoint(src, 0.5, out)
        assert proc.poll() is None
        assert {name: open(os.path.join(live, name)).read() for name in os.listdir(live)} == before
    finally:
        proc.kill()
        proc.wait(timeout=60)
    _written(out)


def test_folder_without_marker_is_kept(src, tmp_path):
    out = str(tmp_path / "out")
    foreign = tmp_path / ".out.partial-abcd1234"   # named like ours, but nothing says who wrote it
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"someone's")
    fxadapt.adapt_checkpoint(src, 0.5, out)
    assert os.listdir(foreign) == ["model.safetensors"]
    assert (foreign / "model.safetensors").read_bytes() == b"someone's"
    _written(out)
