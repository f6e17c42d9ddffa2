"""CancelSplitConcat: a Split that cuts a Concat's output back into the Concat's own inputs reads them.

The marked export splits a 1×1 conv's input where it is a skip concatenation (zoo.taps: one `.part<k>`
site per part, split quantization), so every up-path ResNet's graph holds Concat(h, skip) → Split →
parts: a full-tensor copy that gives back h and skip. Rule: Split(Concat(x_1 … x_n), axis a) whose
n outputs have, along a, exactly the widths of x_1 … x_n (Concat on the same axis) is removed and each
output's users read x_k; the Concat stays while something else (the ResNet's GroupNorm) reads it.
Exact (the same tensors). Widths come from ONNX shape inference on a copy without tap markers; a
Split whose widths it cannot prove is left alone. Runs on the marked graph, so every graph of the
artifact (FP32, QDQ, integer, static) loses the copies.
"""

from __future__ import annotations

import onnx
from onnx import helper

from .graph_utils import constant_values, producers, prune_initializers
from .strip_taps import StripTaps, is_tap


def _widths(model: onnx.ModelProto, axis_of: dict[str, int]) -> dict[str, int]:
    """Length along `axis_of[name]` of each named tensor that shape inference on the tap-free graph knows."""
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    StripTaps()(plain)
    inferred = onnx.shape_inference.infer_shapes(plain)
    out = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input):
        if v.name in axis_of:
            dims = v.type.tensor_type.shape.dim
            a = axis_of[v.name]
            if -len(dims) <= a < len(dims) and dims[a].HasField("dim_value"):
                out[v.name] = dims[a].dim_value
    return out


def _attr(node: onnx.NodeProto, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


class CancelSplitConcat:
    def __call__(self, model: onnx.ModelProto) -> bool:
        g = model.graph
        prod, consts = producers(g), constant_values(g)
        outputs = {o.name for o in g.output}

        def untapped(name: str) -> str:   # the tensor a chain of tap markers passes through
            while name in prod and is_tap(prod[name]):
                name = prod[name].input[0]
            return name

        pairs = []
        for split in g.node:
            cat = prod.get(split.input[0]) if split.op_type == "Split" else None
            if cat is None or cat.op_type != "Concat" or len(cat.input) != len(split.output) \
                    or _attr(split, "axis", 0) != _attr(cat, "axis", None) or any(o in outputs for o in split.output):
                continue
            sizes = consts.get(split.input[1]) if len(split.input) > 1 and split.input[1] else _attr(split, "split", None)
            if sizes is None:
                continue
            pairs.append((split, cat, [int(s) for s in list(sizes)]))
        if not pairs:
            self.cancelled = 0
            return False
        axis_of = {untapped(x): _attr(cat, "axis", 0) for _, cat, _ in pairs for x in cat.input}
        widths = _widths(model, axis_of)
        self.cancelled = 0
        for split, cat, sizes in pairs:
            if [widths.get(untapped(x)) for x in cat.input] != sizes:
                continue
            use = dict(zip(split.output, cat.input))
            g.node.remove(split)
            for n in g.node:
                for i, name in enumerate(n.input):
                    if name in use:
                        n.input[i] = use[name]
            self.cancelled += 1
        for _, cat, _ in pairs:   # a Concat nothing reads any more
            if cat in g.node and not any(cat.output[0] in n.input for n in g.node) and cat.output[0] not in outputs:
                g.node.remove(cat)
        prune_initializers(g)
        return self.cancelled > 0
