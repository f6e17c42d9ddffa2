"""LowerToInteger: replace quantized float ops by standard ONNX integer operators, so onnxruntime
runs integer kernels even though the scales are looked up by time step (ORT only fuses QDQ
patterns whose scales are constants).

Rules:
  1. DQ(x_q) → Conv(·, DQ(W_q)[, DQ(B_q)]) → Q(y) ⇒  QLinearConv(x_q, …, W_q, …, y_scale, y_zp[, B_q]) → y_q
     (B_q: the int32 bias at scale x_scale · w_scale, see quantize_weights.py)
  2. DQ(a_q) → MatMul(·, DQ(W_q) | DQ(b_q)) → Q(y) ⇒  QLinearMatMul(a_q, …, b_q, …) → y_q
  3. DQ(a_q) → Gemm(·, DQ(W_q), transB=1) → Q(y)  ⇒  QLinearMatMul with Wᵀ stored as [I, O]
The Q's dequantize (and, for MatMul, the float bias Add after it) stay as they are, so consumers are
untouched.
Convs fed by a Concat of separately quantized parts (split quantization) keep their QDQ form.
4-bit weights stay 4-bit in the file; a Cast to int8 (folded by ORT when the session loads) feeds
the integer kernel.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph_utils import consumers, initializer_map, producers, prune_initializers


class LowerToInteger:
    def __call__(self, model: onnx.ModelProto) -> bool:
        g = model.graph
        self.lowered = 0
        for node in list(g.node):
            if node.op_type in ("Conv", "MatMul", "Gemm"):
                self._lower(g, node)
        prune_initializers(g)
        return self.lowered > 0

    def _lower(self, g: onnx.GraphProto, node: onnx.NodeProto) -> None:
        prod, cons, inits = producers(g), consumers(g), initializer_map(g)
        dq_a, dq_b = prod.get(node.input[0]), prod.get(node.input[1])
        dq_bias = prod.get(node.input[2]) if len(node.input) > 2 else None
        users = cons[node.output[0]]
        if not (_is(dq_a, "DequantizeLinear") and _is(dq_b, "DequantizeLinear") and len(users) == 1
                and _is(users[0], "QuantizeLinear")) or len(node.input) > 3:
            return
        if len(node.input) == 3 and not (node.op_type == "Conv" and _is(dq_bias, "DequantizeLinear")):
            return
        q_y = users[0]
        b_q, b_s, b_z = (list(dq_b.input) + [None])[:3]
        new_nodes = []
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transB", 0) != 1 or attrs.get("transA", 0) != 0 or attrs.get("alpha", 1.0) != 1.0 \
                    or b_q not in inits:
                return
            w = _int_array(inits[b_q]).T.copy()  # [O, I] → [I, O]
            b_q = _add_int8(g, f"{b_q}_T", w)
        if b_q in inits and inits[b_q].data_type == TensorProto.INT4:
            cast = f"{b_q}_int8"
            new_nodes.append(helper.make_node("Cast", [b_q], [cast], name=f"{node.name}/cast_w", to=TensorProto.INT8))
            b_q = cast
        if b_z in inits and inits[b_z].data_type == TensorProto.INT4:  # zero points are all 0
            b_z = _add_int8(g, f"{b_s}_zp8", np.zeros(numpy_helper.to_array(inits[b_s]).shape, np.int8))
        a_q, a_s, a_z = dq_a.input[0], dq_a.input[1], dq_a.input[2]
        y_s, y_z = q_y.input[1], q_y.input[2]
        op = "QLinearConv" if node.op_type == "Conv" else "QLinearMatMul"
        attrs = [a for a in node.attribute] if op == "QLinearConv" else []
        bias = [dq_bias.input[0]] if dq_bias is not None else []
        lin = helper.make_node(op, [a_q, a_s, a_z, b_q, b_s, b_z, y_s, y_z, *bias], [q_y.output[0]],
                               name=f"{node.name or q_y.name}/int")
        lin.attribute.extend(attrs)
        idx = list(g.node).index(node)
        g.node.remove(node)
        g.node.remove(q_y)
        for k, n in enumerate(new_nodes + [lin]):
            g.node.insert(idx + k, n)
        for dq in (dq_a, dq_b, dq_bias):
            if dq is not None and not consumers(g)[dq.output[0]]:
                g.node.remove(dq)
                scale = producers(g).get(dq.input[1])   # the bias scale's Mul, now unused
                if dq is dq_bias and _is(scale, "Mul") and not consumers(g)[scale.output[0]]:
                    g.node.remove(scale)
        self.lowered += 1


def _is(node, op: str) -> bool:
    return node is not None and node.op_type == op


def _int_array(t: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(t).astype(np.int8)


def _add_int8(g: onnx.GraphProto, name: str, a: np.ndarray) -> str:
    g.initializer.append(numpy_helper.from_array(a.astype(np.int8), name))
    return name
