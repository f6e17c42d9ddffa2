"""Saturation check of an exported integer graph: the largest same-sign pair of consecutive input
weights of every integer kernel, read from the graph's own int8 initializers (see tables.weights)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..tables.weights import PAIR_LIMIT, k_pairs

# op → (index of the integer weight input, how to bring it to [O, I, *k])
_WEIGHT = {"QLinearConv": (3, lambda w: w), "QLinearMatMul": (3, lambda w: w.T),
           "ConvInteger": (1, lambda w: w), "MatMulInteger": (1, lambda w: w.T),
           "MatMulIntegerToFloat": (1, lambda w: w.T)}


def pair_report(model: onnx.ModelProto) -> dict:
    """`{"kernels": n, "unsafe_pairs": n, "max_same_sign_pair": m, "limit": 128}` over every integer
    kernel with a constant int8 weight (uint8 × uint8 kernels, e.g. attention, accumulate exactly)."""
    inits = {i.name: i for i in model.graph.initializer}
    casts = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast"}
    kernels = unsafe = 0
    worst = 0
    for node in model.graph.node:
        if node.op_type not in _WEIGHT:
            continue
        idx, to_oik = _WEIGHT[node.op_type]
        name = casts.get(node.input[idx], node.input[idx])
        t = inits.get(name)
        if t is None or t.data_type not in (TensorProto.INT8, TensorProto.INT4):
            continue
        w = to_oik(numpy_helper.to_array(t).astype(np.int32))
        kernels += 1
        p = k_pairs(w)
        same_sign_sum = np.where(p[..., 0] * p[..., 1] > 0, np.abs(p).sum(axis=-1), 0)
        unsafe += int((same_sign_sum > PAIR_LIMIT).sum())      # tables.weights.unsafe_pairs, from the same pairs
        worst = max(worst, int(same_sign_sum.max(initial=0)))
    return dict(kernels=kernels, unsafe_pairs=unsafe, max_same_sign_pair=worst, limit=PAIR_LIMIT)
