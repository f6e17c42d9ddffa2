"""NarrowConvAsPointwise: a float k×k convolution with few output channels as a 1×1 convolution to one
channel per (output, tap) and a grouped one-hot k×k convolution that sums the taps.

A U-Net's `conv_out` (cifar config: 128 → 3 channels, 3×3) is a GEMM with M = 3 rows after an im2col
of C·k² = 1152 rows by H·W: onnxruntime's float convolution spends its time writing and reading that
im2col buffer, not multiplying. Rule: a float Conv with a constant [O, C, kh, kw] weight, group 1 and
O·kh·kw < C becomes Conv₁(x, W₁) → Conv₂(·, W₂, b), where W₁[o·kh·kw + i·kw + j, c] = W[o, c, i, j]
(a 1×1 conv, no im2col) and Conv₂ has the original pads, strides and dilations, group O and the
one-hot weight W₂[o, i·kw + j, i, j] = 1: y[o] = Σ_(i,j) shift_(i,j) z[o, i, j] = the original
convolution (float sums in another order: |Δ| ~1e-6 on outputs of magnitude ~7). Measured alone
(2-core Zen 5 VNNI, the cifar config's conv_out): 256 → 87 µs at B=1, 2055 → 765 µs at B=8.
Applied to every graph of the artifact (the FP32 reference and the quantized graphs' float convs).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph_utils import initializer_map, prune_initializers


class NarrowConvAsPointwise:
    def __call__(self, model: onnx.ModelProto) -> bool:
        g = model.graph
        inits = initializer_map(g)
        self.rewritten = 0
        for n in list(g.node):
            if n.op_type != "Conv" or n.domain not in ("", "ai.onnx") or n.input[1] not in inits \
                    or inits[n.input[1]].data_type != TensorProto.FLOAT:
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            w = numpy_helper.to_array(inits[n.input[1]])
            if w.ndim != 4 or attrs.get("group", 1) != 1:
                continue
            o, c, kh, kw = w.shape
            taps = kh * kw
            if taps == 1 or o * taps >= c:
                continue
            base = n.name or n.output[0]
            w1 = w.transpose(0, 2, 3, 1).reshape(o * taps, c, 1, 1)
            w2 = np.zeros((o, taps, kh, kw), np.float32)
            for i in range(kh):
                for j in range(kw):
                    w2[:, i * kw + j, i, j] = 1.0
            g.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(w1), f"{base}/pointwise_w"),
                                  numpy_helper.from_array(w2, f"{base}/taps_w")])
            z = f"{base}/taps"
            first = helper.make_node("Conv", [n.input[0], f"{base}/pointwise_w"], [z], name=f"{base}/pointwise")
            kept = {k: v for k, v in attrs.items() if k not in ("group", "kernel_shape")}
            second = helper.make_node("Conv", [z, f"{base}/taps_w", *n.input[2:]], list(n.output), name=f"{base}/taps_sum",
                                      group=o, kernel_shape=[kh, kw], **kept)
            at = list(g.node).index(n)
            g.node.remove(n)
            g.node.insert(at, second)
            g.node.insert(at, first)
            self.rewritten += 1
        prune_initializers(g)
        return self.rewritten > 0
