"""One layer alone, built from its concrete latency key (``fxadapt.ops.latency_keys``), for timing it on a
target: a one-node ONNX graph (``Conv``/``ConvTranspose`` or ``Gemm``, weights as seeded random
initializers) for onnxruntime, the ``torch.nn`` module for torch. A ``"same"``/``"valid"`` padding is
resolved to numbers (``"same"``: ``dilation * (kernel - 1) // 2`` per side).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _conv_parts(key: tuple):
    (_, n, cin, cout, groups, spatial, kernel, stride, padding, dilation, transposed, opad, bias, dtype) = key
    nd = len(kernel)
    if padding and isinstance(padding[0], str):  # "same" / "valid"
        padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel)) if padding[0] == "same" \
                else (0,) * nd
    return n, cin, cout, groups, spatial, kernel, stride, padding, dilation, transposed, opad, bias, dtype


def layer_onnx(key: tuple):
    """A one-node ONNX model of the layer ``key`` and an input feed for it.

    >>> proto, feed = layer_onnx(("linear", 3, 8, 5, True, "float32"))
    >>> [n.op_type for n in proto.graph.node], feed["x"].shape
    (['Gemm'], (3, 8))
    """
    import onnx  # deferred: onnx is optional, needed only for onnxruntime targets
    from onnx import TensorProto, helper, numpy_helper  # deferred: as above

    rng = np.random.default_rng(0)
    np_dt = np.float16 if key[-1] == "float16" else np.float32
    onnx_dt = TensorProto.FLOAT16 if key[-1] == "float16" else TensorProto.FLOAT
    inits = []
    if key[0] == "linear":
        _, rows, fin, fout, bias, _ = key
        x = rng.standard_normal((rows, fin)).astype(np_dt)
        inits.append(numpy_helper.from_array(rng.standard_normal((fout, fin)).astype(np_dt) * 0.1, "w"))
        ins = ["x", "w"]
        if bias:
            inits.append(numpy_helper.from_array(np.zeros(fout, np_dt), "b"))
            ins.append("b")
        node = helper.make_node("Gemm", ins, ["y"], transB=1)
        out_shape = [rows, fout]
    else:
        n, cin, cout, groups, spatial, kernel, stride, pad, dil, transposed, opad, bias, _ = _conv_parts(key)
        x = rng.standard_normal((n, cin, *spatial)).astype(np_dt)
        wshape = (cin, cout // groups, *kernel) if transposed else (cout, cin // groups, *kernel)
        inits.append(numpy_helper.from_array(rng.standard_normal(wshape).astype(np_dt) * 0.1, "w"))
        ins = ["x", "w"]
        if bias:
            inits.append(numpy_helper.from_array(np.zeros(cout, np_dt), "b"))
            ins.append("b")
        attrs: dict[str, Any] = dict(kernel_shape=list(kernel), strides=list(stride), pads=list(pad) * 2,
                                     dilations=list(dil),
                     group=int(groups))
        if transposed:
            attrs["output_padding"] = list(opad)
        node = helper.make_node("ConvTranspose" if transposed else "Conv", ins, ["y"], **attrs)
        out_shape = ["n", "c", *[f"s{i}" for i in range(len(spatial))]]
    graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("x", onnx_dt, list(x.shape))],
                              [helper.make_tensor_value_info("y", onnx_dt, out_shape)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = min(proto.ir_version, 9)
    onnx.checker.check_model(proto)
    return proto, {"x": x}


def layer_module(key: tuple) -> tuple[torch.nn.Module, torch.Tensor]:
    """The ``torch.nn`` layer of ``key`` and an input for it.

    >>> mod, x = layer_module(("linear", 3, 8, 5, True, "float32"))
    >>> tuple(mod(x).shape)
    (3, 5)
    """
    dt = torch.float16 if key[-1] == "float16" else torch.float32
    if key[0] == "linear":
        _, rows, fin, fout, bias, _ = key
        mod, x = torch.nn.Linear(fin, fout, bias=bias), torch.randn(rows, fin)
    else:
        n, cin, cout, groups, spatial, kernel, stride, pad, dil, transposed, opad, bias, _ = _conv_parts(key)
        nd = len(kernel)
        cls = getattr(torch.nn, f"ConvTranspose{nd}d" if transposed else f"Conv{nd}d")
        extra = {"output_padding": opad} if transposed else {}
        mod = cls(cin, cout, kernel, stride, pad, dilation=dil, groups=groups, bias=bias, **extra)
        x = torch.randn(n, cin, *spatial)
    return mod.to(dt), x.to(dt)
