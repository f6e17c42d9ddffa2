"""Small helpers shared by the passes: producers/consumers maps, bypassing a node, initializers."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            out[i].append(n)
    return out


def rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every use and the production of tensor `old` now go by `new`."""
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new
        for i, name in enumerate(n.output):
            if name == old:
                n.output[i] = new


def bypass(graph: onnx.GraphProto, node: onnx.NodeProto) -> None:
    """Remove a one-input one-output pass-through node, keeping graph output names intact."""
    src, dst = node.input[0], node.output[0]
    graph.node.remove(node)
    if dst in {o.name for o in graph.output}:
        rename_tensor(graph, src, dst)
    else:
        rename_tensor(graph, dst, src)


def initializer_map(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every tensor with a value known before running: initializers and `Constant` node outputs."""
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def add_initializer(graph: onnx.GraphProto, name: str, array: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    return name


def prune_initializers(graph: onnx.GraphProto) -> int:
    """Drop initializers no node uses; returns how many."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dead = [t for t in graph.initializer if t.name not in used]
    for t in dead:
        graph.initializer.remove(t)
    return len(dead)
