"""LowerToInteger: replace quantized float ops by standard ONNX integer operators, so onnxruntime
runs integer kernels even though the scales are looked up by time step (ORT only fuses QDQ
patterns whose scales are constants).

Rules:
  1. DQ(x_q) → Conv(·, DQ(W_q)[, DQ(B_q)]) → Q(y) ⇒  QLinearConv(x_q, …, W_q, …, y_scale, y_zp[, B_q]) → y_q
     (B_q: the int32 bias at scale x_scale · w_scale, see quantize_weights.py)
  2. DQ(a_q) → MatMul(·, DQ(W_q) | DQ(b_q)) → Q(y) ⇒  QLinearMatMul(a_q, …, b_q, …) → y_q
  3. DQ(a_q) → Gemm(·, DQ(W_q), transB=1) → Q(y)  ⇒  QLinearMatMul with Wᵀ stored as [I, O]
  4. DQ(a_q) → MatMul | Gemm(·, DQ(b_q)) [→ Add(·, bias)], product not quantized (tables with
     `matmul_outputs="float"`) ⇒  com.microsoft MatMulIntegerToFloat(a_q, b_q, …[, bias]): the
     integer GEMM scaled back to float with the bias added, in one kernel (no requantize, no DQ, no Add)
  5. Concat(DQ(a_q), DQ(b_q), …) → 1×1 Conv(·, DQ(W_q)[, bias]) [→ Q(y)] (split quantization: each
     part of the skip concatenation has its own looked-up scale) ⇒  per part, Transpose to NHWC →
     MatMulIntegerToFloat(part_q, W_q[:, part]ᵀ, …) with the bias on the first, their sum, [Q,] Transpose
     back: the conv as one integer GEMM per part, each at its own input scale (uint8 transposes; no
     float Concat, no float Conv). Parts must start at even channels (the weight pairs stay aligned).
The Q's dequantize (and, for QLinearMatMul, the float bias Add after it) stay as they are, so
consumers are untouched.
4-bit weights stay 4-bit in the file; a Cast to int8 (folded by ORT when the session loads) feeds
the integer kernel.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph_utils import consumers, initializer_map, producers, prune_initializers

CONTRIB = "com.microsoft"


class LowerToInteger:
    def __init__(self, contrib_ops: bool = True, split_convs: bool = True):
        self.contrib_ops = contrib_ops                    # False: standard ONNX only, rules 4 and 5 off
        self.split_convs = split_convs and contrib_ops    # False: rule 5 off (split-concat convs stay float)

    def __call__(self, model: onnx.ModelProto) -> bool:
        g = model.graph
        self.lowered = 0
        self.channels = _channels(model) if self.split_convs else {}
        for node in list(g.node):
            if node.op_type in ("Conv", "MatMul", "Gemm") and not (self.split_convs and self._lower_split_conv(g, node)):
                self._lower(g, node)
        if any(n.domain == CONTRIB for n in g.node) and not any(o.domain == CONTRIB for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(CONTRIB, 1))
        prune_initializers(g)
        return self.lowered > 0

    def _lower(self, g: onnx.GraphProto, node: onnx.NodeProto) -> None:
        prod, cons, inits = producers(g), consumers(g), initializer_map(g)
        dq_a, dq_b = prod.get(node.input[0]), prod.get(node.input[1])
        dq_bias = prod.get(node.input[2]) if len(node.input) > 2 else None
        users = cons[node.output[0]]
        if not (_is(dq_a, "DequantizeLinear") and _is(dq_b, "DequantizeLinear")) or len(node.input) > 3:
            return
        to_float = not (len(users) == 1 and _is(users[0], "QuantizeLinear"))   # rule 4
        if to_float and (node.op_type == "Conv" or not self.contrib_ops):
            return
        if len(node.input) == 3 and not (node.op_type == "Conv" and _is(dq_bias, "DequantizeLinear")):
            return
        q_y = None if to_float else users[0]
        b_q, b_s, b_z = (list(dq_b.input) + [""])[:3]
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
        if b_z and b_z in inits and inits[b_z].data_type == TensorProto.INT4:  # zero points are all 0
            b_z = _add_int8(g, f"{b_s}_zp8", np.zeros(numpy_helper.to_array(inits[b_s]).shape, np.int8))
        a_q, a_s, a_z = dq_a.input[0], dq_a.input[1], dq_a.input[2]
        idx = list(g.node).index(node)
        if to_float:
            lin, add = self._to_float(g, node, users, inits, a_q, a_s, a_z, b_q, b_s, b_z)
            if add is not None:
                g.node.remove(add)
        else:
            y_s, y_z = q_y.input[1], q_y.input[2]
            op = "QLinearConv" if node.op_type == "Conv" else "QLinearMatMul"
            attrs = [a for a in node.attribute] if op == "QLinearConv" else []
            bias = [dq_bias.input[0]] if dq_bias is not None else []
            lin = helper.make_node(op, [a_q, a_s, a_z, b_q, b_s, b_z, y_s, y_z, *bias], [q_y.output[0]],
                                   name=f"{node.name or q_y.name}/int")
            lin.attribute.extend(attrs)
            g.node.remove(q_y)
        g.node.remove(node)
        for k, n in enumerate(new_nodes + [lin]):
            g.node.insert(idx + k, n)
        for dq in (dq_a, dq_b, dq_bias):
            if dq is not None and not consumers(g)[dq.output[0]]:
                g.node.remove(dq)
                scale = producers(g).get(dq.input[1])   # the bias scale's Mul, now unused
                if dq is dq_bias and _is(scale, "Mul") and not consumers(g)[scale.output[0]]:
                    g.node.remove(scale)
        self.lowered += 1

    def _lower_split_conv(self, g: onnx.GraphProto, node: onnx.NodeProto) -> bool:
        """Rule 5; False (graph untouched) when `node` is not a 1×1 conv over a split-quantized Concat."""
        prod, cons, inits = producers(g), consumers(g), initializer_map(g)
        cat, dq_w = prod.get(node.input[0]), prod.get(node.input[1])
        if node.op_type != "Conv" or not _is(cat, "Concat") or not _is(dq_w, "DequantizeLinear"):
            return False
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        parts = [prod.get(i) for i in cat.input]
        w_q, w_s, w_z = (list(dq_w.input) + [""])[:3]
        bias = node.input[2] if len(node.input) > 2 else ""
        if (w_q not in inits or list(inits[w_q].dims[2:]) != [1, 1] or attrs.get("group", 1) != 1
                or any(v != 1 for v in attrs.get("strides", [1, 1]) + attrs.get("dilations", [1, 1]))
                or any(attrs.get("pads", [0])) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
                or helper.get_attribute_value(cat.attribute[0]) != 1
                or not all(_is(d, "DequantizeLinear") and len(d.input) == 3 for d in parts)
                or (bias and not (bias in inits and inits[bias].data_type == TensorProto.FLOAT))):
            return False
        w = _int_array(inits[w_q])[:, :, 0, 0]                              # [O, C]
        widths = [self.channels.get(d.input[0]) for d in parts]
        if None in widths or sum(widths) != w.shape[1] or any(c % 2 for c in widths[:-1]):
            return False
        if w_z and w_z in inits and inits[w_z].data_type == TensorProto.INT4:   # zero points are all 0
            w_z = _add_int8(g, f"{w_s}_zp8", np.zeros(numpy_helper.to_array(inits[w_s]).shape, np.int8))
        users = cons[node.output[0]]
        q_y = users[0] if len(users) == 1 and _is(users[0], "QuantizeLinear") else None
        base, new_nodes, sums, c0 = node.name or node.output[0], [], [], 0
        for k, (d, c) in enumerate(zip(parts, widths)):
            wk = _add_int8(g, f"{w_q}_part{k}", w[:, c0:c0 + c].T.copy())   # [C_k, O]
            c0 += c
            nhwc = f"{base}/part{k}_nhwc"
            new_nodes.append(helper.make_node("Transpose", [d.input[0]], [nhwc], name=f"{base}/t{k}", perm=[0, 2, 3, 1]))
            out = f"{base}/part{k}_out"
            new_nodes.append(helper.make_node(
                "MatMulIntegerToFloat", [nhwc, wk, d.input[1], w_s, d.input[2], w_z, *([bias] if bias and k == 0 else [])],
                [out], name=f"{base}/int{k}", domain=CONTRIB))
            if sums:
                acc = f"{base}/sum{k}"
                new_nodes.append(helper.make_node("Add", [sums[-1], out], [acc], name=f"{base}/add{k}"))
                out = acc
            sums.append(out)
        if q_y is not None:
            q_nhwc = f"{base}/q_nhwc"
            new_nodes.append(helper.make_node("QuantizeLinear", [sums[-1], *q_y.input[1:]], [q_nhwc], name=f"{base}/q"))
            new_nodes.append(helper.make_node("Transpose", [q_nhwc], [q_y.output[0]], name=f"{base}/t_out", perm=[0, 3, 1, 2]))
            g.node.remove(q_y)
        else:
            new_nodes.append(helper.make_node("Transpose", [sums[-1]], [node.output[0]], name=f"{base}/t_out",
                                              perm=[0, 3, 1, 2]))
        idx = list(g.node).index(node)
        g.node.remove(node)
        for k, n in enumerate(new_nodes):
            g.node.insert(idx + k, n)
        for dead in (cat, *parts, dq_w):
            if not any(o in consumers(g) and consumers(g)[o] for o in dead.output) and dead in g.node:
                g.node.remove(dead)
        self.lowered += 1
        return True

    @staticmethod
    def _to_float(g, node, users, inits, a_q, a_s, a_z, b_q, b_s, b_z):
        """Rule 4: MatMulIntegerToFloat, taking over a following Add of a constant [N] bias."""
        add = users[0] if len(users) == 1 and _is(users[0], "Add") else None
        bias = None
        if add is not None:
            other = [i for i in add.input if i != node.output[0]]
            b = inits.get(other[0]) if len(other) == 1 else None
            if b is not None and b.data_type == TensorProto.FLOAT and len(b.dims) == 1:
                bias = other[0]
        if bias is None:
            add = None
        out = add.output[0] if add is not None else node.output[0]
        lin = helper.make_node("MatMulIntegerToFloat", [a_q, b_q, a_s, b_s, a_z, b_z, *([bias] if bias else [])],
                               [out], name=f"{node.name or out}/int", domain=CONTRIB)
        return lin, add


def _is(node, op: str) -> bool:
    return node is not None and node.op_type == op


def _channels(model: onnx.ModelProto) -> dict[str, int]:
    """Dimension 1 of every tensor whose shape inference knows it (the channels of an NCHW tensor)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input):
        dims = v.type.tensor_type.shape.dim
        if len(dims) > 1 and dims[1].HasField("dim_value"):
            out[v.name] = dims[1].dim_value
    return out


def _int_array(t: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(t).astype(np.int8)


def _add_int8(g: onnx.GraphProto, name: str, a: np.ndarray) -> str:
    g.initializer.append(numpy_helper.from_array(a.astype(np.int8), name))
    return name
