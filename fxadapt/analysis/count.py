"""Independent MAC count of a model run: ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2).

This is the *independent* check that ``transform`` verifies budgets with; it shares no code with the cost
model (``fxadapt.analysis.cost``), which is derived from the op registry.

Attention is counted: ``FlopCounterMode`` has no formula for CPU's fused attention kernels
(``_scaled_dot_product_flash_attention_for_cpu``) nor for the ``nn.MultiheadAttention`` /
``nn.TransformerEncoderLayer`` fast path (``_native_multi_head_attention``,
``_transformer_encoder_layer_fwd``), so the run uses the math SDPA backend
(``sdpa_kernel(SDPBackend.MATH)``) with the MHA fast path disabled (restored afterwards). The math backend
computes ``softmax(q k^T * scale + mask) v`` with two batched matmuls, so an SDPA call over ``b`` x ``h``
heads, ``L`` queries, ``S`` keys, head dims ``E`` (q, k) and ``Ev`` (v) counts
``b*h*L*S*E + b*h*L*S*Ev`` MACs (grouped-query attention counts every query head).

Grouped matrix products (mixture-of-experts layers: ``aten._grouped_mm``, transformers'
``grouped_mm_fallback``) have no torch formula either; they count ``S*K*N`` MACs for ``S`` routed rows
(``T * top_k``: every token meets ``top_k`` experts, whatever the routing at the example inputs picks).

Example:
    >>> import torch
    >>> count_macs(torch.nn.Linear(4, 3), (torch.randn(2, 4),))
    24.0
    >>> q = torch.randn(2, 4, 8, 16)
    >>> class Attention(torch.nn.Module):
    ...     def forward(self, q):
    ...         return torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    >>> count_macs(Attention(), q) == 2 * 4 * 8 * 8 * (16 + 16)
    True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fxadapt.ir.inputs import as_inputs


def _rnn_layer_flops(input, w_ih, w_hh, *args, out_shape=None, **kwargs) -> int:
    """``aten.mkldnn_rnn_layer`` (one LSTM layer and direction; the CPU kernel torch's counter misses): every
    element of ``weight_ih`` and ``weight_hh`` is used once per time step and batch row."""
    return 2 * input[0] * input[1] * (w_ih[0] * w_ih[1] + w_hh[0] * w_hh[1])


def _grouped_mm_flops(input, weight, *args, out_shape=None, **kwargs) -> int:
    """Grouped matrix product (mixture-of-experts layers; torch's counter has no formula): rows ``[S, K]``
    sorted by expert times experts ``[E, K, N]`` multiply every row by one ``K x N`` matrix, ``2*S*K*N`` —
    ``numel(out) * K`` for every layout with the groups on the output (``[S, N]``, batched ``[B, M, N]``);
    groups along ``K`` (two 2-D operands, output ``[G, M, N]``) contract ``K`` once in all: ``2*M*K*N``."""
    if len(input) == 2 and len(weight) == 2:
        return 2 * input[0] * input[1] * weight[1]
    return 2 * math.prod(out_shape) * input[-1]


EXTRA_FLOPS = {torch.ops.aten.mkldnn_rnn_layer: _rnn_layer_flops,   # packet -> formula on shapes
               torch.ops.aten._grouped_mm: _grouped_mm_flops}
LIBRARY_FLOPS = {("transformers", "grouped_mm_fallback"): _grouped_mm_flops}
"""Ops of other libraries, present once that library is imported (transformers' grouped experts kernel)."""


def extra_flops() -> dict:
    """``EXTRA_FLOPS`` and the ``LIBRARY_FLOPS`` whose op is registered in this process (packet ->
    formula)."""
    out = dict(EXTRA_FLOPS)
    for (namespace, name), formula in LIBRARY_FLOPS.items():
        packet = getattr(getattr(torch.ops, namespace), name, None) if _has_op(namespace, name) else None
        if packet is not None:
            out[packet] = formula
    return out


def _has_op(namespace: str, name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"{namespace}::{name}", "")
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def countable_attention() -> Iterator[None]:
    """Math SDPA backend and no MHA fast path inside the block (the previous settings are restored).

    >>> with countable_attention():
    ...     torch.backends.mha.get_fastpath_enabled()
    False
    """
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def count_macs(model: nn.Module, inputs: Any) -> float:
    """MACs of one forward pass in eval mode, counted by ``FlopCounterMode`` (FLOPs / 2), attention
    included; ``inputs`` takes every form ``fxadapt.ir.inputs.as_inputs`` accepts (kwargs too)."""
    return run_counted(model, inputs)[0]


def run_counted(model: nn.Module, inputs: Any) -> tuple[float, Any]:
    """``(MACs, outputs)`` of one forward pass in eval mode (the MACs as ``count_macs`` counts them)."""
    inputs = as_inputs(inputs)
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), countable_attention(), _no_grad_params(model), \
                FlopCounterMode(display=False, custom_mapping=extra_flops()) as counter:
            out = inputs.call(model)
    finally:
        model.train(was)
    return counter.get_total_flops() / 2, out


@contextlib.contextmanager
def _no_grad_params(model: nn.Module) -> Iterator[None]:
    """Parameters with ``requires_grad=False`` inside the block (restored afterwards).

    ``FlopCounterMode``'s module tracker hooks every tensor argument of a module call that requires grad for
    backward; a view of a parameter taken under ``no_grad`` (Mamba's ``conv1d.weight.squeeze(1)`` handed to
    its kernel module) requires grad but has no autograd node, and the hook fails on it ("Expected gradient
    function to be set"). The count runs without gradients anyway, so no parameter needs them here.

    >>> lin = torch.nn.Linear(2, 2)
    >>> with _no_grad_params(lin):
    ...     lin.weight.requires_grad
    False
    >>> lin.weight.requires_grad
    True
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
