"""The checks ``transform`` runs on the model and its data before any work, each a one-line ``InputError``
naming the input at fault.

``check_model``: no parameter or buffer on the meta device (weights never loaded). ``check_data(model,
example_inputs, data)``: the data's tensors have one length, there are at least ``MIN_SAMPLES`` samples, its
first batch maps onto the example inputs (``fxadapt.train.data.Layout``) with the example's sizes past the
batch axis (the captured graph fixes them), the model runs on it, integer labels lie in the output's classes
and a torch loss runs on the output. It decides what the targets are (``Layout.task``):

- labels as given; for per-token labels of a model whose ``forward`` takes ``labels``, its own loss says
  whether they are next-token labels (``"causal"``: the loss matching the shifted cross-entropy) or per-token
  classes;
- token batches without labels, of a model predicting one row over at least its ids per token: next-token
  targets (``"causal"``);
- anything else without labels: calibration data (``"none"``); the searches distil from the original.

Example:
    >>> import torch
    >>> m = torch.nn.Linear(3, 4)
    >>> check_data(m, torch.randn(1, 3), (torch.randn(8, 3), torch.randint(0, 4, (8,)))).layout.task
    'labels'
    >>> check_data(m, torch.randn(1, 3), (torch.randn(8, 3), torch.tensor([0, 1, 9, 2] * 2)))
    Traceback (most recent call last):
    fxadapt.errors.InputError: data: labels lie in [0, 9] but Linear's output has 4 classes: labels must lie \
in [0, 4) (-100: ignored)
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fxadapt.errors import InputError
from fxadapt.ir.capture import as_called
from fxadapt.ir.inputs import Inputs, as_inputs
from fxadapt.train.data import (
    Batch,
    Batches,
    Data,
    Layout,
    as_mapping,
    as_tensors,
    is_batch_list,
    is_map_style,
    prediction,
    task_loss,
)

MIN_SAMPLES = 2   # a search's BatchNorm in training mode needs two samples per batch
PROBE = 2         # samples of a tensor / dataset source the checks read (a DataLoader: its first batch)


def check_model(model: Any) -> None:
    """A model whose weights exist: none on the meta device."""
    if not isinstance(model, nn.Module):
        return
    meta = next((n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if meta is not None:
        raise InputError(f"model: {type(model).__name__}.{meta} is on the meta device (its weights were "
                         "never loaded): load them first (from_pretrained without device_map='meta', or "
                         f"to_empty() and load_state_dict())")


def check_data(model: Any, example_inputs: Any, data: Any, name: str = "data",
               loss_fn: Callable | None = F.cross_entropy) -> Data | None:
    """``data`` checked against ``model`` and the example inputs (module docstring), as ``Data`` with its
    ``Layout``; ``loss_fn=None``: no label or loss check (data read for BatchNorm statistics only)."""
    if data is None or isinstance(data, Data):
        return data
    example = as_inputs(example_inputs)
    layout = Layout(example)
    samples = _samples(name, data)
    try:
        batch = Batches(data, PROBE, 0, layout=layout).get(0)
    except InputError as e:
        raise InputError(f"{name}: {e}") from None
    _check_sizes(name, batch, example, layout)
    module = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    pred = _run(name, module, batch)
    task = _task(module, batch, pred)
    if loss_fn is not None:
        scored = Batch(batch.inputs, _targets(task, batch, pred), task == "causal", pred)
        if scored.targets is not None and loss_fn is F.cross_entropy:
            _check_classes(name, module, data, layout, scored, pred)
        _check_loss(name, scored, pred, loss_fn)
    return Data(data, Layout(example, task), samples)


def checked_batches(model: nn.Module, data: Any, loss_fn: Callable | None = F.cross_entropy) -> Any:
    """``data`` for a loop over ``model`` itself (``fxadapt.finetune``): batch lists, dicts of tensors and
    DataLoaders checked against the model with their first batch's inputs as the example (so Hugging Face
    batches get their targets' meaning, ``Layout.task``); tensors and datasets as given (labels as they are).

    >>> checked_batches(torch.nn.Linear(3, 2), [(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))]).layout.task
    'labels'
    """
    if isinstance(data, Data) or as_tensors(data) is not None or is_map_style(data):
        return data
    first = Batches(data, PROBE, 0).batch(0)
    return check_data(model, Layout().batch(first).inputs, data, "data", loss_fn)


def _samples(name: str, data: Any) -> int | None:
    """The number of samples (None: unknown), refusing tensors of different lengths and too little data."""
    tensors = as_tensors(data) or (tuple(as_mapping(data).values()) if as_mapping(data) else None)
    if tensors is not None:
        lengths = [len(t) for t in tensors]
        if len(set(lengths)) > 1:
            raise InputError(f"{name}: its tensors have different lengths ({', '.join(map(str, lengths))}): "
                             f"give one target per input (every tensor with the same first dimension)")
        n = lengths[0]
    elif is_map_style(data):
        n = len(data)
    elif isinstance(data, torch.utils.data.DataLoader):
        n = len(data.dataset) if is_map_style(data.dataset) else None
    elif is_batch_list(data):
        n = None
    else:
        raise InputError(f"{name} must be (inputs, targets) tensors, inputs alone, a dict of tensors, a "
                         f"torch Dataset, a DataLoader or a list of batches; got {type(data).__name__}")
    if n is not None and n < MIN_SAMPLES:
        raise InputError(f"{name} has {n} sample(s): a search needs at least {MIN_SAMPLES}")
    return n


def _check_sizes(name: str, batch: Batch, example: Inputs, layout: Layout) -> None:
    """Every input of the batch has the example's sizes past the batch axis."""
    for where, key in layout.slots():
        ex = example.args[key] if where == "arg" else example.kwargs[key]
        got = batch.inputs.args[key] if where == "arg" else batch.inputs.kwargs[key]
        if tuple(got.shape[1:]) != tuple(ex.shape[1:]):
            what = f"input {key}" if where == "arg" else repr(key)
            raise InputError(f"{name}: its {what} has shape {tuple(got.shape)} but the example input's is "
                             f"{tuple(ex.shape)}: the captured model takes the example's sizes past the "
                             "batch axis; give example_inputs of the data's sizes (e.g. part of its first "
                             "batch)")


@contextlib.contextmanager
def _evaluating(module: nn.Module):
    """``module`` in eval mode, every submodule's mode restored afterwards (the caller's model is
    untouched)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _device(module: nn.Module):
    return next((t.device for t in [*module.parameters(), *module.buffers()]), None)


def _run(name: str, module: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's prediction on ``batch``; a failure is the batch's (one line)."""
    batch = batch.to(_device(module))
    try:
        with _evaluating(module):
            return prediction(as_called(module, batch.inputs).call(module)).float()
    except Exception as e:  # noqa: BLE001 - the data's fault: reported with its shapes
        shapes = [tuple(t.shape) for t in batch.inputs.tensors()]
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"{name}: {type(module).__name__} cannot take its first batch (input shapes "
                         f"{shapes}): {type(e).__name__}: {first}") from e


def _ids(batch: Batch) -> torch.Tensor | None:
    """The token ids of a batch: its ``input_ids``, else its first integer input."""
    ids = batch.inputs.kwargs.get("input_ids")
    if isinstance(ids, torch.Tensor):
        return ids
    return next((t for t in batch.inputs.tensors() if not t.is_floating_point() and t.dim() == 2), None)


def _task(module: nn.Module, batch: Batch, pred: torch.Tensor) -> str:
    """What the targets are (module docstring)."""
    y, ids = batch.targets, _ids(batch)
    if y is None:
        lm = (ids is not None and pred.dim() == 3 and tuple(pred.shape[:2]) == tuple(ids.shape)
              and pred.shape[-1] > int(ids.max()))
        return "causal" if lm else "none"
    if y.is_floating_point() or y.dim() < 2 or tuple(pred.shape[:-1]) != tuple(y.shape):
        return "labels"
    own = _own_loss(module, batch)
    if own is not None:
        shifted = float(task_loss(pred, Batch(batch.inputs, y, True)))
        plain = float(task_loss(pred, Batch(batch.inputs, y, False)))
        return "causal" if abs(shifted - own) <= abs(plain - own) else "labels"
    return "causal" if ids is not None and ids.shape == y.shape and torch.equal(ids, y.to(ids.device)) \
            else "labels"


def _own_loss(module: nn.Module, batch: Batch) -> float | None:
    """The loss the model computes itself from ``labels`` (a Hugging Face model), or None."""
    try:
        if "labels" not in inspect.signature(module.forward).parameters:
            return None
        b = batch.to(_device(module))
        with _evaluating(module):
            out = as_called(module, b.inputs).with_kwargs(labels=b.targets).call(module)
        loss = getattr(out, "loss", None)
        return float(loss) if isinstance(loss, torch.Tensor) else None
    except Exception:  # noqa: BLE001 - no own loss: decided from the ids
        return None


def _targets(task: str, batch: Batch, pred: torch.Tensor) -> torch.Tensor | None:
    if task == "none":
        return None
    return batch.targets if batch.targets is not None else _ids(batch)


def _classes(pred: torch.Tensor, y: torch.Tensor) -> int | None:
    """How many classes the output scores ``y`` against (last axis per row, else axis 1), or None."""
    if tuple(y.shape) == tuple(pred.shape[:-1]):
        return int(pred.shape[-1])
    if pred.dim() >= 2 and tuple(y.shape) == (pred.shape[0], *pred.shape[2:]):
        return int(pred.shape[1])
    return None


def _check_classes(name: str, module: nn.Module, data: Any, layout: Layout, scored: Batch,
                   pred: torch.Tensor) -> None:
    """Integer labels inside the output's classes (every label of in-memory data, else the first batch)."""
    y = scored.targets
    if y.is_floating_point():
        return
    classes = _classes(pred[:, :-1] if scored.causal else pred, y[:, 1:] if scored.causal else y)
    if classes is None:
        raise InputError(f"{name}: targets of shape {tuple(y.shape)} do not match {type(module).__name__}'s "
                         f"output {tuple(pred.shape)}: cross-entropy takes one class index per output row "
                         f"(or pass a loss_fn in SearchConfig / FurConfig)")
    whole = layout.batch(_whole(data)).targets if as_tensors(data) or as_mapping(data) else None
    labels = whole if whole is not None and layout.task != "causal" else y
    bad = labels[(labels != -100) & ((labels < 0) | (labels >= classes))]
    if len(bad):
        lo, hi = int(labels[labels != -100].min()), int(labels[labels != -100].max())
        raise InputError(f"{name}: labels lie in [{lo}, {hi}] but {type(module).__name__}'s output has "
                         f"{classes} classes: labels must lie in [0, {classes}) (-100: ignored)")


def _whole(data: Any) -> Any:
    return as_tensors(data) if as_tensors(data) is not None else as_mapping(data)


def _check_loss(name: str, scored: Batch, pred: torch.Tensor, loss_fn: Callable) -> None:
    """A torch loss runs on the model's output and gives one number (the user's own loss function is left to
    the search: an error there is a ``UserCodeError`` naming their line)."""
    if not getattr(loss_fn, "__module__", "").startswith("torch."):
        return
    y = scored.targets
    try:
        loss = task_loss(pred, scored.to(pred.device), loss_fn)
        ok = isinstance(loss, torch.Tensor) and loss.numel() == 1
    except Exception as e:  # noqa: BLE001 - the loss does not fit the output
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        ok, why = False, f"{type(e).__name__}: {first}"
    else:
        why = "it does not return one number"
    if not ok:
        fn = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        target = f"targets {tuple(y.shape)}" if y is not None else "the original's output (no labels)"
        raise InputError(f"{name}: the loss does not fit the model's output: {fn}(prediction "
                         f"{tuple(pred.shape)}, {target}): {why}; give a loss_fn that takes them "
                         "(SearchConfig / FurConfig loss_fn)")
