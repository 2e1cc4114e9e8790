"""Streaming a Hugging Face checkpoint: ``adapt_checkpoint(src, budget, out)`` never holds the whole model.

    model   = AutoModelForCausalLM's class built on the meta device (shapes, no values)
    plan    = transform's own capture, analyze and data-free plan steps on it; the L1 importance of a unit
              reads each producer weight from the checkpoint, one tensor at a time (``meta.WEIGHTS``):
              score_g[u] = sum_p  l1(W_p, axis_p)[u] / mean_u(...),  W_p read from its safetensors file
    config  = the write-back's recipe and config for that plan (``writeback.build.unchecked``: the same sizes,
              config fields and ``fxadapt_recipe`` as ``write_back``, with no values)
    W'_k    = W_k.index_select(axis_1, kept_1).index_select(axis_2, kept_2) ...   (the plan's param edits of
              tensor k, in the order ``passes.materialize`` applies them)

and every ``W'_k`` is written into sharded safetensors as soon as it is sliced, so at most one source tensor
and its slice are resident: peak memory ~ 1.5x the largest tensor (the embedding), whatever the depth. The
files are what ``save_pretrained`` of the in-memory ``transform`` result writes (``config.json``,
``generation_config.json``, ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``), with
the same tensors bit for bit: the plan is made by the same steps on the same values.

Scope: data-free MAC budgets that shrink a decoder-only causal LM whose class builds on the meta device
(Llama, Qwen2, Mistral: ``STREAMED``); anything else is a one-line ``InputError``. With ``data``
(calibration token ids) the widths are the same and the kept units are ranked by their mean |activation|
instead of L1, the model run one decoder layer resident at a time (``fxadapt.export.stream_score``).

Example:
    >>> import tempfile, torch, transformers
    >>> src, out = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    >>> transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    >>> res = adapt_checkpoint(src, 0.5, out)
    >>> 0.45 < res.macs_after / res.macs_before <= 0.5
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxadapt import meta
from fxadapt.analysis.count import run_counted
from fxadapt.checks import verify
from fxadapt.errors import InputError
from fxadapt.export.shards import (
    INDEX,
    Checkpoint,
    check_output,
    human,
    nbytes,
    numel,
    require,
    shard_bytes,
    shard_names,
    shards,
    staged,
    write_shards,
)
from fxadapt.export.stream_score import calibration, rescored
from fxadapt.passes.materialize import materialize
from fxadapt.passes.meta_run import to_meta
from fxadapt.passes.shape_check import shape_check
from fxadapt.pipeline.config import transform_config
from fxadapt.pipeline.runner import run_steps
from fxadapt.pipeline.transform import ANALYZE, CAPTURE, PLAN, Job
from fxadapt.writeback.build import Reference, unchecked
from fxadapt.writeback.widths import tensors_of

STREAMED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


@dataclass(frozen=True)
class Streamed:
    """What ``adapt_checkpoint`` wrote: the output folder, its files, the MACs before / after / targeted
    (counted on the meta graph), and the adapted model's config."""

    out: str
    files: tuple[str, ...]
    macs_before: float
    macs_after: float
    macs_target: float
    config: Any


def adapt_checkpoint(src: str, budget: Any, out: str, inputs: Any = None, layers: str = "any",
                     max_shard_size: int | str = "5GB", progress: bool = False, data: Any = None,
                     overwrite: bool = False) -> Streamed:
    """Adapt the checkpoint in folder ``src`` to ``budget`` (MACs; with ``data``, calibration token ids,
    the kept units are chosen by activation importance, ``export.stream_score``) and write the result into
    ``out`` shard by shard (see the module docstring). ``inputs``: the example inputs (default: input_ids of
    shape (2, 16), as the CLI's in-memory path uses); ``layers``: as ``TransformConfig.layers``;
    ``progress``: a tqdm bar per step and per shard and layer written. The files are written into a folder
    beside ``out`` that becomes ``out`` at the end (``shards.staged``: a failure leaves no half checkpoint);
    a non-empty ``out`` is refused unless ``overwrite`` (its weight files are then replaced)."""
    import transformers  # deferred: optional dependency, Hugging Face checkpoints only

    config = transformers.AutoConfig.from_pretrained(src)
    ckpt = Checkpoint(src)
    model = meta_model(config, ckpt)
    inputs = inputs if inputs is not None else example_ids(config)
    data = calibration(data, config.vocab_size) if data is not None else None   # refused before the plan
    check_output(out, overwrite)
    check_memory(ckpt, out)
    job, work, macs = plan_on_meta(model, ckpt, budget, inputs, layers, progress, data)
    with staged(out, overwrite) as tmp:
        files = write_checkpoint(ckpt, edits_by_key(job, model, ckpt), work, tmp, max_shard_size, progress)
        files += write_configs(work, src, tmp)
    files = [os.path.join(out, os.path.basename(f)) for f in files]
    a, goal = job.analysis, job.goal
    assert a is not None and goal is not None and goal.macs is not None
    return Streamed(out, tuple(files), a.macs(), macs, goal.macs, getattr(work, "config", None))


def meta_model(config, ckpt: Checkpoint) -> nn.Module:
    """The checkpoint's class built on the meta device, in the checkpoint's floating dtype."""
    import transformers  # deferred: optional dependency

    arch = (getattr(config, "architectures", None) or ["?"])[0]
    if arch not in STREAMED:
        raise InputError(f"streaming adapts {', '.join(STREAMED)} checkpoints; this one is {arch}: "
                         f"adapt it in memory (drop --stream)")
    floats = {e.dtype for e in ckpt.entries.values() if e.dtype.is_floating_point}
    dtype = floats.pop() if len(floats) == 1 else torch.float32
    with torch.device("meta"), _default_dtype(dtype):
        model = getattr(transformers, arch)(config)
    return model.eval()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    was = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(was)


def example_ids(config) -> dict[str, torch.Tensor]:
    """``input_ids`` of shape (2, 16) below ``min(vocab_size, 1000)``, seed 0 (the CLI's example inputs)."""
    gen = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, min(config.vocab_size, 1000), (2, 16), generator=gen)}


def plan_on_meta(model: nn.Module, ckpt: Checkpoint, budget: Any, inputs: Any, layers: str,
                 progress: bool, data: Any = None) -> tuple[Job, nn.Module, float]:
    """transform's capture, analyze and plan steps on the meta model, the weights read from ``ckpt``; the
    plan materialized on the meta graph (its MACs counted there) and written back without values."""
    if isinstance(budget, (int, float)) and budget > 1:   # refused before the capture; counts are after it
        raise InputError(_SHRINK_ONLY)
    bar = _tqdm(None, "plan (capture, analyze, plan)", progress, "step")
    cfg = transform_config(None, {"layers": layers, "progress": lambda name, *_: bar.update(1)}, None, None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"fxadapt\.capture: calling .* use_cache=False")
        job = run_steps((CAPTURE, ANALYZE), Job(model, inputs, budget, cfg), cfg.progress)
    if job.goal.macs is None or job.goal.latency is not None or job.goal.params is not None \
            or job.goal.macs > job.analysis.macs():
        raise InputError(_SHRINK_ONLY)
    job.analysis.gm.meta[meta.WEIGHTS] = _reader(model, ckpt)
    try:
        job = run_steps((PLAN,), job, cfg.progress)
        if data is not None:   # the same widths, the units kept by activation importance
            score_bar = _tqdm(None, "score (units run)", progress, "unit")
            job = rescored(job, model, ckpt, _checkpoint_keys(model, ckpt), data, lambda: score_bar.update(1))
            score_bar.close()
    finally:
        del job.analysis.gm.meta[meta.WEIGHTS]
        bar.close()
    plan = job.outcome.plan
    if any(e.new.any() for e in plan.edits) or plan.remove or plan.repeat:
        raise InputError("streaming writes plans that only slice tensors: adapt this budget in memory")
    gm = materialize(job.gm, plan).graph_module
    shape_check(gm, job.inputs, fake=True)   # the new shapes in meta['val'], as the pass runner records them
    mins = job.inputs.map(to_meta)
    macs, got = run_counted(gm, mins)
    verify.check_goal(job.goal, job.outcome, macs, job.analysis.macs(), gm, cfg.solve)
    ref = Reference(gm, job.gm, macs, False, expected=got, original=verify.recorded_outputs(job.analysis.gm))
    wb = unchecked(model, plan, mins, ref)
    if wb.module is None:
        raise InputError(f"the plan cannot be written back into {type(model).__name__}: {wb.reason}")
    return dataclasses.replace(job, gm=gm), wb.module, macs


_SHRINK_ONLY = "streaming takes a MAC budget that shrinks the model (e.g. 0.5): adapt other budgets in memory"


def _reader(model: nn.Module, ckpt: Checkpoint) -> Callable[[str], torch.Tensor]:
    """A graph tensor's values by its target (a name of the user's model, or of a tensor tied to it)."""
    keys = _checkpoint_keys(model, ckpt)

    def read(target: str) -> torch.Tensor:
        if target not in keys:
            raise InputError(f"the checkpoint holds no tensor for {target}: it does not match its config")
        return ckpt.read(keys[target], reuse=True)   # scored, then dropped before the next read

    return read


def _checkpoint_keys(model: nn.Module, ckpt: Checkpoint) -> dict[str, str]:
    """Every name of the model's tensors -> the checkpoint key holding it (tied names share one key)."""
    user = tensors_of(model)
    out = {}
    for name, t in user.items():
        key = name if name in ckpt.entries else \
            next((n for n, u in user.items() if u is t and n in ckpt.entries), None)
        if key is not None:
            out[name] = key
    return out


def edits_by_key(job: Job, model: nn.Module, ckpt: Checkpoint) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """checkpoint key -> the ``(axis, kept indices)`` edits of its tensor, in ``materialize``'s order (the
    first edit of every (tensor, axis))."""
    keys = _checkpoint_keys(model, ckpt)
    assert job.outcome is not None
    out: dict[str, list[tuple[int, torch.Tensor]]] = {}
    done = set()
    for edit in job.outcome.plan.edits:
        s = edit.site
        if s.kind != "param":
            continue
        if s.param not in keys:
            raise InputError(f"the plan edits {s.param}, which the checkpoint does not hold")
        if (keys[s.param], s.axis) in done:   # a tied tensor is edited once per axis, as its first site says
            continue
        done.add((keys[s.param], s.axis))
        out.setdefault(keys[s.param], []).append((s.axis, torch.as_tensor(edit.index)))
    return out


GiB = 1 << 30
OVERHEAD = 1 * GiB   # torch, transformers, the meta model, its graph and analysis (7B: ~0.7 GiB measured)


def check_memory(ckpt: Checkpoint, out: str) -> None:
    """Refuse, naming the memory needed, when the largest tensor and its slice (plus the overhead) do not fit
    in the memory available, or the output (at most the input's size) not on the output's disk."""
    largest = max(e.end - e.start for e in ckpt.entries.values())
    need, have = 2 * largest + OVERHEAD, available_memory()
    require(need, have, f"streaming needs {{need}} of memory (the largest tensor, {human(largest)}, twice, "
            f"plus {human(OVERHEAD)} for torch and the graph)", "close other programs or use more memory")
    parent = os.path.dirname(os.path.abspath(out)) or "."
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    free = shutil.disk_usage(parent).free
    require(ckpt.nbytes(), free, f"writing the adapted checkpoint needs up to {{need}} of disk at {out}",
            "free disk space there or choose another -o")


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def write_checkpoint(ckpt: Checkpoint, edits: dict, work: nn.Module, out: str, max_shard_size: int | str,
                     progress: bool) -> list[str]:
    """Every checkpoint tensor sliced by its edits, written shard by shard (one tensor resident at a time),
    with the index ``save_pretrained`` writes for several shards; the files written."""
    want = tensors_of(work)
    shapes = {}
    for k, e in sorted(ckpt.entries.items()):
        shape = list(e.shape)
        for axis, idx in edits.get(k, []):
            shape[axis] = len(idx)
        if k in want and tuple(want[k].shape) != tuple(shape):
            raise InputError(f"{k}: the plan slices it to {tuple(shape)}, the written-back model holds "
                             f"{tuple(want[k].shape)}")
        shapes[k] = (e.dtype, tuple(shape))
    sizes = {k: nbytes(d, s) for k, (d, s) in shapes.items()}
    parts = shards(sizes, shard_bytes(max_shard_size))
    names = shard_names(len(parts))
    os.makedirs(out, exist_ok=True)
    files = write_shards(out, dict(zip(names, parts)), shapes, lambda k: _sliced(ckpt, k, edits.get(k, [])),
                         progress)
    if len(parts) > 1:
        index = {"metadata": {"total_parameters": sum(numel(s) for _, s in shapes.values()),
                              "total_size": sum(sizes.values())},
                 "weight_map": {k: n for n, keys in zip(names, parts) for k in keys}}
        files.append(os.path.join(out, INDEX))
        with open(files[-1], "w") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def _sliced(ckpt: Checkpoint, key: str, edits: list) -> torch.Tensor:
    t = ckpt.read(key, reuse=True)   # written before the next read
    for axis, idx in edits:
        t = t.index_select(axis, idx)
    return t


def write_configs(work: Any, src: str, out: str) -> list[str]:
    """``config.json`` (the write-back's config, stamped with the class and dtype as ``save_pretrained``
    stamps it) and ``generation_config.json`` (the checkpoint's own, else the model's)."""
    import transformers  # deferred: optional dependency

    cfg = work.config
    cfg.architectures = [type(work).__name__]
    cfg.dtype = next(work.parameters()).dtype
    cfg.save_pretrained(out)
    files = [os.path.join(out, "config.json")]
    gen: Any = getattr(work, "generation_config", None)
    if os.path.isfile(os.path.join(src, "generation_config.json")):
        gen = transformers.GenerationConfig.from_pretrained(src)
    if gen is not None and work.can_generate():
        gen.save_pretrained(out)
        files.append(os.path.join(out, "generation_config.json"))
    return files


class _Null:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _tqdm(total: int | None, desc: str, enabled: bool, unit: str = "shard"):
    if not enabled:
        return _Null()
    from tqdm import tqdm  # deferred: progress bars load only when shown

    return tqdm(total=total, desc=desc, unit=unit)
