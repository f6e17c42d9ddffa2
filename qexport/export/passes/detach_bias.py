"""DetachBias: make a Linear's `<module>.out` site see the product *before* the bias, as the
calibrator does (a Conv's `.out` includes its bias: QLinearConv adds it as int32, see
quantize_weights.py).

Rules (the marked export writes `y = op(x) + b; Tap(y − b) + b` for every Linear):
  1. Gemm(x, W, b) → Sub(·, b) → Tap         ⇒  Gemm(x, W) → Tap
  2. MatMul(x, W) → Add(·, b) → Sub(·, b) → Tap ⇒ MatMul(x, W) → Tap
The `+ b` after the tap stays, so the float bias is added after dequantization.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .graph_utils import consumers, initializer_map, producers
from .strip_taps import is_tap, tap_site


def _const(graph_inits, name):
    t = graph_inits.get(name)
    return None if t is None else numpy_helper.to_array(t)


class DetachBias:
    def __call__(self, model: onnx.ModelProto) -> bool:
        g = model.graph
        prod, inits = producers(g), initializer_map(g)
        changed = False
        for tap in [n for n in g.node if is_tap(n) and tap_site(n).endswith(".out")]:
            sub = prod.get(tap.input[0])
            if sub is None or sub.op_type != "Sub":
                continue
            b_sub = _const(inits, sub.input[1])
            y = prod.get(sub.input[0])
            if b_sub is None or y is None:
                continue
            if y.op_type == "Gemm" and len(y.input) == 3:
                b = _const(inits, y.input[2])
                if b is None or not np.allclose(b.ravel(), b_sub.ravel()):
                    continue
                del y.input[2]
            elif y.op_type == "Add":
                mm_in = [i for i in y.input if i not in inits]
                b_in = [i for i in y.input if i in inits]
                if len(mm_in) != 1 or len(b_in) != 1 or prod.get(mm_in[0]) is None \
                        or prod[mm_in[0]].op_type != "MatMul" \
                        or not np.allclose(_const(inits, b_in[0]).ravel(), b_sub.ravel()):
                    continue
                if len(consumers(g)[y.output[0]]) != 1:
                    continue
                tap.input[0] = mm_in[0]
                g.node.remove(y)
                g.node.remove(sub)
                changed = True
                continue
            else:
                continue
            tap.input[0] = sub.input[0]
            g.node.remove(sub)
            changed = True
        return changed
