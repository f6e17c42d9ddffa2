"""CancelBiasRoundTrip: remove the `Sub(y, b) → Add(·, b)` pairs the marked export leaves where a
`<module>.out` tap stays float (the FP32 reference graph, and float modules of the quantized graphs).

The marked export writes `Tap(y − b) + b` after every Linear so that its `.out` site sees the
product before the bias (see detach_bias.py; a Conv's `.out` includes its bias and has no pair);
once the tap is gone the pair is two full-tensor operations that compute nothing, and they made the
FP32 reference look ~10% slower than it is.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .graph_utils import consumers, initializer_map, producers, rename_tensor


class CancelBiasRoundTrip:
    def __call__(self, model: onnx.ModelProto) -> bool:
        g = model.graph
        inits, prod, cons = initializer_map(g), producers(g), consumers(g)
        outputs = {o.name for o in g.output}

        def const(name):
            return numpy_helper.to_array(inits[name]) if name in inits else None

        self.cancelled = 0
        for add in [n for n in g.node if n.op_type == "Add"]:
            sub = prod.get(add.input[0])
            if sub is None or sub.op_type != "Sub" or len(cons[sub.output[0]]) != 1 or sub.output[0] in outputs:
                continue
            b_add, b_sub = const(add.input[1]), const(sub.input[1])
            if b_add is None or b_sub is None or b_add.shape != b_sub.shape or not np.array_equal(b_add, b_sub):
                continue
            y, out = sub.input[0], add.output[0]
            g.node.remove(sub)
            g.node.remove(add)
            if out in outputs:
                rename_tensor(g, y, out)
            else:
                rename_tensor(g, out, y)
            self.cancelled += 1
        return self.cancelled > 0
