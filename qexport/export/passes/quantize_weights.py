"""QuantizeWeights: the float weight of every Conv / Gemm / MatMul whose activation input is
dequantized becomes an integer initializer (int8, or int4 at 4 bits) with per-output-channel
DequantizeLinear, using the table's weight scales (keyed by module name).

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
    def __init__(self, table: QuantTable):
        self.table = table

    def __call__(self, model: onnx.ModelProto) -> bool:
        g = model.graph
        prod, inits = producers(g), initializer_map(g)
        self.quantized: dict[str, tuple[str, int]] = {}
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
        return bool(self.quantized)
