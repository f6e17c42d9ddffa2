"""QuantizeWeights: the float weight of every Conv / Gemm / MatMul whose activation input is
dequantized becomes an integer initializer (int8, or int4 at 4 bits) with per-output-channel
DequantizeLinear, using the table's weight scales (keyed by module name). A Conv's float bias becomes
int32 at scale x_scale · w_scale, the form QLinearConv adds inside the integer kernel: with
looked-up input scales the int32 values differ per time-step group, so all of them sit in one
`[K, ΣC]` table read by one Gather (by the group the activation lookups chose) and one Split. A Conv
over a split-quantized concatenation has no single input scale and keeps its float bias.

The module of a node is found from the site of the DequantizeLinear feeding its activation input
(`<module>/DQ`, or `<module>.part<k>/DQ` through a Concat). Weight layouts: Conv `[O, I, kh, kw]`
axis 0; Gemm with transB=1 `[O, I]` axis 0; MatMul `[I, O]` axis 1.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...tables.schema import QuantTable
from .graph_utils import add_initializer, initializer_map, producers


def module_of(node: onnx.NodeProto, prod: dict) -> str | None:
    """The module whose activation input feeds `node` (through the site DQ, maybe via Concat)."""
    src = prod.get(node.input[0])
    if src is not None and src.op_type == "Concat":
        src = prod.get(src.input[0])
    if src is None or src.op_type != "DequantizeLinear" or "/DQ" not in src.name:
        return None
    site = src.name.rsplit("/DQ", 1)[0]
    return site.rsplit(".part", 1)[0]


def int4_tensor(name: str, q: np.ndarray) -> onnx.TensorProto:
    """An INT4 initializer stored as raw bytes, two values per byte (first value in the low nibble)."""
    v = q.astype(np.int8).ravel()
    if len(v) % 2:
        v = np.concatenate([v, np.zeros(1, np.int8)])
    packed = ((v[0::2] & 0x0F) | ((v[1::2] & 0x0F) << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4, q.shape, packed.tobytes(), raw=True)


class QuantizeWeights:
    GROUP = "qx/group"   # the time-step group tensor of LookupParams

    def __init__(self, table: QuantTable):
        self.table = table

    def __call__(self, model: onnx.ModelProto) -> bool:
        g = model.graph
        prod, inits = producers(g), initializer_map(g)
        self.quantized: dict[str, tuple[str, int]] = {}
        self.pending_bias: list[tuple[str, np.ndarray]] = []
        for node in list(g.node):
            if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
                continue
            module = module_of(node, prod)
            if module is None or module not in self.table.weight_scale:
                continue
            w = numpy_helper.to_array(inits[node.input[1]])
            axis = 1 if node.op_type == "MatMul" else 0
            if node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute):
                axis = 1
            scale = self.table.weight_scale[module]
            if w.shape[axis] != scale.shape[0]:
                raise ValueError(f"{module}: weight {w.shape} has {w.shape[axis]} output channels on axis {axis}, "
                                 f"the table {scale.shape[0]}; tables and graph come from different models")
            bits = int(self.table.weight_bits[module])
            wt = np.moveaxis(w, axis, 0)
            q = np.moveaxis(self.table.int_weight(module, wt), 0, axis)
            base = f"{module}/weight"
            g.initializer.append(int4_tensor(f"{base}_q", q) if bits == 4 else numpy_helper.from_array(q, f"{base}_q"))
            add_initializer(g, f"{base}_scale", scale.astype(np.float32))
            zp = np.zeros(scale.shape, np.int8)
            g.initializer.append(int4_tensor(f"{base}_zp", zp) if bits == 4 else numpy_helper.from_array(zp, f"{base}_zp"))
            dq = helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zp"], [f"{base}_dq"],
                                  name=f"{module}/weight/DQ", axis=axis)
            old = node.input[1]
            node.input[1] = f"{base}_dq"
            g.node.insert(list(g.node).index(node), dq)
            if not any(old in n.input for n in g.node):
                g.initializer.remove(inits[old])
            self.quantized[module] = (node.op_type, bits)
            if node.op_type == "Conv":
                self._quantize_bias(g, node, module, scale.astype(np.float32), prod, inits)
        self._emit_bias_lookup(g)
        return bool(self.quantized)

    def _quantize_bias(self, g, node, module: str, w_scale: np.ndarray, prod: dict, inits: dict) -> None:
        src = prod.get(node.input[0])
        if len(node.input) < 3 or node.input[2] not in inits or src is None or src.op_type != "DequantizeLinear":
            return
        b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        x_scale = src.input[1]
        if x_scale in inits:              # constant parameters (one group)
            scale = np.float32(numpy_helper.to_array(inits[x_scale])) * w_scale
            bias_q = add_initializer(g, f"qx/{module}/bias_q", _int32(b / scale))
            scale_name = add_initializer(g, f"{module}/bias_scale", scale)
            new = []
        else:                             # looked up per group: one column block of the bias table
            site = src.name.rsplit("/DQ", 1)[0]
            xs = self.table.scale[:, self.table.site_index(site)].astype(np.float32)     # [K]
            bias_q, scale_name = f"qx/{module}/bias_q", f"{module}/bias_scale"
            self.pending_bias.append((bias_q, _int32(b[None, :] / (xs[:, None] * w_scale[None, :]))))
            new = [helper.make_node("Mul", [x_scale, f"{module}/weight_scale"], [scale_name], name=f"{module}/bias_scale")]
        new.append(helper.make_node("DequantizeLinear", [bias_q, scale_name], [f"{module}/bias_dq"],
                                    name=f"{module}/bias/DQ", axis=0))
        old = node.input[2]
        node.input[2] = f"{module}/bias_dq"
        idx = list(g.node).index(node)
        for k, n in enumerate(new):
            g.node.insert(idx + k, n)
        if not any(old in n.input for n in g.node):
            g.initializer.remove(inits[old])

    def _emit_bias_lookup(self, g) -> None:
        if not self.pending_bias:
            return
        names = [n for n, _ in self.pending_bias]
        add_initializer(g, "qx/bias_table", np.concatenate([c for _, c in self.pending_bias], axis=1))   # [K, ΣC]
        add_initializer(g, "qx/bias_split", np.array([c.shape[1] for _, c in self.pending_bias], np.int64))
        nodes = [helper.make_node("Gather", ["qx/bias_table", self.GROUP], ["qx/bias_row"], name="qx/bias_row", axis=0),
                 helper.make_node("Split", ["qx/bias_row", "qx/bias_split"], names, name="qx/bias_split", axis=0)]
        at = next(i for i, n in enumerate(g.node) if self.GROUP in n.output) + 1
        for k, n in enumerate(nodes):
            g.node.insert(at + k, n)


def _int32(x: np.ndarray) -> np.ndarray:
    info = np.iinfo(np.int32)
    return np.clip(np.round(x), info.min, info.max).astype(np.int32)
