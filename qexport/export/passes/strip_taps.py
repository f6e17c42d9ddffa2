"""StripTaps: remove every `qexport.Tap` marker; the result is the plain FP32 reference graph."""

from __future__ import annotations

import onnx

from ..to_onnx import TAP_DOMAIN, TAP_OP
from .graph_utils import bypass


def is_tap(node: onnx.NodeProto) -> bool:
    return node.op_type == TAP_OP and node.domain == TAP_DOMAIN


def tap_site(node: onnx.NodeProto) -> str:
    return next(a.s.decode() for a in node.attribute if a.name == "site")


def drop_custom_opset(model: onnx.ModelProto) -> None:
    keep = [o for o in model.opset_import if o.domain != TAP_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)


class StripTaps:
    """Model → model without tap markers. Returns whether anything changed."""

    def __call__(self, model: onnx.ModelProto) -> bool:
        taps = [n for n in model.graph.node if is_tap(n)]
        for t in taps:
            bypass(model.graph, t)
        drop_custom_opset(model)
        return bool(taps)
