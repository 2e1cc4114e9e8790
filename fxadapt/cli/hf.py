"""Hugging Face checkpoints on the command line: ``fxadapt adapt path/to/hf_dir --budget 0.5 -o out_dir``.

A ``MODEL`` that is a directory holding ``config.json`` is a local ``save_pretrained`` checkpoint (no hub
access): the class is ``config.architectures[0]`` from ``transformers`` (``AutoModel`` when the config names
none), loaded with ``from_pretrained`` (``fxadapt.from_pretrained`` when the checkpoint is itself an fxadapt
result with per-layer sizes). Example inputs, unless ``--input-shape`` names them, come from the config:

- vision (``image_size`` and ``num_channels``): ``pixel_values`` of shape ``(2, C, H, W)``;
- text (``vocab_size``): ``input_ids`` of shape ``(2, 16)`` below ``min(vocab_size, 1000)``, plus
  ``decoder_input_ids`` for encoder-decoders;
- anything else: ``--input-shape`` is required (the error says so).

``--input-shape`` values are passed positionally, as for factories. The result is written with the
model's own ``save_pretrained`` into ``-o`` (default ``<dir>-adapted``).

Streaming (``fxadapt.adapt_checkpoint``, ``fxadapt.export.stream``): with ``--stream``, or automatically
when the checkpoint's safetensors take more than ``STREAM_ABOVE`` (half) of the available memory (a model
that size cannot be held twice), a Llama / Qwen2 / Mistral checkpoint is adapted without loading it: the
model is built on the meta device, the weights are read one tensor at a time and the result is written shard
by shard (a bar per shard). With ``--data`` (token ids: a tensor, an ``(ids, labels)`` pair or a dict with
``input_ids``) the widths stay the data-free solve's and the data's activations, read one decoder layer at
a time, choose which units are kept (``fxadapt.export.stream_score``). Automatic streaming of another
architecture, or with ``--onnx`` or ``--plot``, falls back to the in-memory path with a note; ``--stream``
refuses them.

Example:
    >>> import tempfile, transformers, torch
    >>> d = tempfile.mkdtemp()
    >>> transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2,
    ...                                                      vocab_size=50)).save_pretrained(d)
    >>> model, inputs = load_dir(d, [])
    >>> type(model).__name__, {k: tuple(v.shape) for k, v in inputs.items()}
    ('GPT2LMHeadModel', {'input_ids': (2, 16)})
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
from torch import nn

import fxadapt
from fxadapt.cli.usage import CliError
from fxadapt.export.stream import STREAMED, Checkpoint, adapt_checkpoint, available_memory


def is_checkpoint(path: str | None) -> bool:
    return path is not None and bool(path) and os.path.isdir(path) and \
        os.path.isfile(os.path.join(path, "config.json"))


def load_dir(path: str, tensors: list[torch.Tensor]) -> tuple[nn.Module, Any]:
    """The checkpoint's model (eval mode) and its example inputs (see the module docstring)."""
    try:
        import transformers  # deferred: optional dependency, Hugging Face checkpoints only
    except ImportError as e:
        raise CliError(f"{path} is a Hugging Face checkpoint: pip install transformers to read it") from e
    transformers.logging.set_verbosity_error()
    config = transformers.AutoConfig.from_pretrained(path)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else transformers.AutoModel
    if cls is None:
        raise CliError(f"{path}/config.json names architecture {arch!r}, which transformers does not have")
    try:
        if getattr(config, "fxadapt_recipe", None):
            model = fxadapt.from_pretrained(path)
        else:
            model = cls.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - a broken checkpoint
        raise CliError(f"cannot load {path} with {getattr(cls, '__name__', cls)}.from_pretrained: "
                       f"{type(e).__name__}: "
                       f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    return model.eval(), (tuple(tensors) if tensors else config_inputs(config, path))


def config_inputs(config, path: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """Example inputs a config implies (see the module docstring)."""
    gen = torch.Generator().manual_seed(0)
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if isinstance(size, int) and isinstance(channels, int):
        return {"pixel_values": torch.randn(2, channels, size, size, generator=gen)}
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 1:
        ids = torch.randint(0, min(vocab, 1000), (2, 16), generator=gen)
        out = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False):
            out["decoder_input_ids"] = ids[:, :8].clone()
        return out
    raise CliError(f"cannot tell {path}'s inputs from its config: give --input-shape (e.g. 1,16000 for "
                   "audio)")


STREAM_ABOVE = 0.5   # stream a checkpoint bigger than this fraction of the available memory


def streams(args: argparse.Namespace) -> bool:
    """Whether ``adapt`` streams this checkpoint (see the module docstring); a note says why it does or, when
    it would have, why not."""
    if args.stream:
        if args.onnx or args.plot or args.fold_bn or args.input_shape:
            raise CliError("--stream writes the adapted checkpoint only: drop --onnx, --plot, --fold-bn and "
                           "--input-shape")
        if args.data and getattr(args, "strategy", "auto") not in ("auto", "importance"):
            raise CliError(f"--stream scores units on --data by their activations, not by "
                           f"--strategy {args.strategy}: drop --strategy or --stream")
        return True
    try:
        size = Checkpoint(args.model).nbytes()
    except fxadapt.FxAdaptError:
        return False
    have = available_memory()
    if have is None or size <= STREAM_ABOVE * have:
        return False
    import transformers  # deferred: optional dependency, Hugging Face checkpoints only

    arch = (getattr(transformers.AutoConfig.from_pretrained(args.model), "architectures", None) or ["?"])[0]
    why = ("its architecture streams" if arch in STREAMED else f"but {arch} does not stream")
    extra = args.onnx or args.plot or args.fold_bn or args.input_shape
    ok = arch in STREAMED and not extra
    print(f"note: the checkpoint ({size / 2**30:.1f} GiB) is over half the available memory "
          f"({have / 2**30:.1f} GiB), {why}: "
          + ("streaming it (--stream)" if ok else "adapting it in memory"
             + (" (--onnx/--plot/--fold-bn/--input-shape need the model)" if extra else "")))
    return ok


def adapt_streamed(args: argparse.Namespace, budget: Any, out: str, train: Any = None) -> int:
    """``fxadapt.adapt_checkpoint`` for the CLI: bars per step, shard and layer (on a terminal, without
    ``--quiet``), then the MACs and the files; ``train``: the training part of ``--data`` (token ids)."""
    data = token_ids(train) if train is not None else None
    if data is not None and not args.quiet:
        print("note: streamed with --data: the widths are the data-free solve's; the data's activations "
              "choose which units are kept (fxadapt.export.stream_score)")
    res = adapt_checkpoint(args.model, budget, out, layers=args.layers, max_shard_size=args.max_shard_size,
                           progress=not args.quiet and sys.stderr.isatty(), overwrite=args.overwrite,
                           data=data)
    if not args.quiet:
        print(f"MACs ratio {res.macs_after / res.macs_before:.4f} "
              f"(target {res.macs_target / res.macs_before:.4f}), counted on the meta graph")
        how = ("fxadapt.from_pretrained" if getattr(res.config, "fxadapt_recipe", None)
               else "transformers' from_pretrained or fxadapt.from_pretrained")
        print(f"saved {out} (streamed, {len(res.files)} files; load with {how})")
    return 0


def token_ids(train: Any) -> Any:
    """The token ids of ``--data``'s training part for a streamed checkpoint: a tensor as it is, the inputs
    of an ``(inputs, targets)`` pair, or a mapping's ``input_ids``; anything else is a one-line error."""
    if isinstance(train, torch.Tensor):
        return train
    if isinstance(train, (tuple, list)) and train and isinstance(train[0], torch.Tensor):
        return train[0]
    if isinstance(train, dict) and isinstance(train.get("input_ids"), torch.Tensor):
        return train["input_ids"]
    raise CliError(f"--stream with --data reads token ids: the data function's train part must be a tensor, "
                   f"an (ids, labels) pair or a dict with input_ids, got {type(train).__name__}")
