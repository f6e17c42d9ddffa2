"""StripTaps: remove every `qexport.Tap` marker (wire its input to its consumers); the result is the
plain FP32 reference graph."""

from __future__ import annotations

import onnx

from ..to_onnx import TAP_DOMAIN, TAP_OP


def is_tap(node: onnx.NodeProto) -> bool:
    return node.op_type == TAP_OP and node.domain == TAP_DOMAIN


def rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new
    for o in graph.output:
        if o.name == old:
            raise ValueError(f"graph output {old} is produced by a tap")


def drop_custom_opset(model: onnx.ModelProto) -> None:
    keep = [o for o in model.opset_import if o.domain != TAP_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)


class StripTaps:
    """Model → model without tap markers. Returns whether anything changed."""

    def __call__(self, model: onnx.ModelProto) -> bool:
        g = model.graph
        taps = [n for n in g.node if is_tap(n)]
        for t in taps:
            rename_input(g, t.output[0], t.input[0])
            g.node.remove(t)
        drop_custom_opset(model)
        return bool(taps)
