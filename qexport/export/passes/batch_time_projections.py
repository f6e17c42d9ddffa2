"""BatchTimeProjections: the float t-only branch as few nodes as possible, weights in float16.

The time branch (sinusoidal projection → time MLP → every ResNet's SiLU → `time_emb_proj`) depends on
the time step alone; with its modules float (tables.build: `quantize_time_branch=False`) it is a
dozen [B, C] products per U-Net call, each with its own SiLU, bias Add and two Unsqueezes. Rules:
  1. Gemms whose inputs are SiLU(e) of the same t-only tensor e (one per ResNet) become one Gemm over
     their concatenated weights and biases, then one Unsqueeze to [B, ΣC, 1, 1] and one Split that
     yields each ResNet's [B, C_i, 1, 1] projection (or a Split at [B, ΣC] when the members do not
     all end in such an Unsqueeze chain).
  2. Float weights of every t-only Gemm are stored as float16 and cast back (constant-folded by
     onnxruntime when the session loads, so the file pays 2 bytes per weight and the step nothing).
A tensor is t-only when it derives from `timestep`, initializers, constants and the *shape* of
`sample` (the batch broadcast) — never from `sample`'s values.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .fold_shapes import remove_dead_nodes
from .graph_utils import constant_values, consumers, initializer_map, producers, prune_initializers


def t_only_tensors(graph: onnx.GraphProto) -> set[str]:
    known = {t.name for t in graph.initializer} | {"timestep"}
    for n in graph.node:   # graph.node is topologically sorted
        if n.op_type == "Constant" or (n.op_type == "Shape" and n.input[0] == "sample") \
                or (n.input and all(i in known or i == "" for i in n.input)):
            known.update(n.output)
    return known


def _attr(node, name, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _silu_source(prod, x: str) -> str | None:
    """e when x = Mul(e, Sigmoid(e)) (or Mul(Sigmoid(e), e))."""
    mul = prod.get(x)
    if mul is None or mul.op_type != "Mul":
        return None
    for a, b in ((0, 1), (1, 0)):
        sig = prod.get(mul.input[b])
        if sig is not None and sig.op_type == "Sigmoid" and sig.input[0] == mul.input[a]:
            return mul.input[a]
    return None


class BatchTimeProjections:
    def __call__(self, model: onnx.ModelProto) -> bool:
        g = model.graph
        t_only = t_only_tensors(g)
        prod, cons, inits = producers(g), consumers(g), initializer_map(g)
        outputs = {o.name for o in g.output}
        members: dict[str, list[dict]] = {}
        self.merged = self.fp16 = 0
        for n in g.node:
            if n.op_type != "Gemm" or n.input[0] not in t_only or n.input[1] not in inits \
                    or _attr(n, "transB", 0) != 1 or _attr(n, "transA", 0) != 0 \
                    or _attr(n, "alpha", 1.0) != 1.0 or _attr(n, "beta", 1.0) != 1.0 \
                    or inits[n.input[1]].data_type != TensorProto.FLOAT:
                continue
            w = numpy_helper.to_array(inits[n.input[1]])
            m = dict(gemm=n, w=w, bias=None, add=None, out=n.output[0], chain=[])
            if len(n.input) > 2 and n.input[2]:
                if n.input[2] not in inits:
                    continue
                m["bias"] = numpy_helper.to_array(inits[n.input[2]]).reshape(-1)
            else:
                users = cons[n.output[0]]
                if len(users) == 1 and users[0].op_type == "Add" and n.output[0] not in outputs:
                    add = users[0]
                    other = add.input[1] if add.input[0] == n.output[0] else add.input[0]
                    if other in inits and numpy_helper.to_array(inits[other]).size == w.shape[0]:
                        m.update(bias=numpy_helper.to_array(inits[other]).reshape(-1), add=add, out=add.output[0])
            out = m["out"]
            while len(cons[out]) == 1 and cons[out][0].op_type == "Unsqueeze" and out not in outputs:
                m["chain"].append(cons[out][0])
                out = cons[out][0].output[0]
            m["final"] = out
            src = _silu_source(prod, n.input[0])
            members.setdefault(f"silu:{src}" if src else n.input[0], []).append(m)
        for key, group in members.items():
            if len(group) >= 2:
                self._merge(g, group)
                self.merged += len(group)
        inits = initializer_map(g)
        for n in g.node:   # rule 2
            if n.op_type == "Gemm" and n.input[0] in t_only and n.input[1] in inits \
                    and inits[n.input[1]].data_type == TensorProto.FLOAT:
                n.input[1] = self._fp16(g, n.input[1], numpy_helper.to_array(inits[n.input[1]]), n)
                self.fp16 += 1
        remove_dead_nodes(g)
        prune_initializers(g)
        return bool(self.merged or self.fp16)

    @staticmethod
    def _fp16(g: onnx.GraphProto, name: str, w: np.ndarray, before: onnx.NodeProto) -> str:
        g.initializer.append(numpy_helper.from_array(w.astype(np.float16), f"{name}_fp16"))
        cast = helper.make_node("Cast", [f"{name}_fp16"], [f"{name}_f32"], name=f"{name}/cast", to=TensorProto.FLOAT)
        g.node.insert(list(g.node).index(before), cast)
        return f"{name}_f32"

    def _merge(self, g: onnx.GraphProto, group: list[dict]) -> None:
        first = group[0]["gemm"]
        name = f"{first.name}/batched"
        w = np.concatenate([m["w"] for m in group], axis=0)
        b = np.concatenate([m["bias"] if m["bias"] is not None else np.zeros(m["w"].shape[0], np.float32)
                            for m in group]).astype(np.float32)
        sizes = np.array([m["w"].shape[0] for m in group], np.int64)
        g.initializer.extend([numpy_helper.from_array(w.astype(np.float32), f"{name}/W"),
                              numpy_helper.from_array(b, f"{name}/b"),
                              numpy_helper.from_array(sizes, f"{name}/sizes")])
        nodes = [helper.make_node("Gemm", [first.input[0], f"{name}/W", f"{name}/b"], [f"{name}/y"], name=name,
                                  transB=1)]
        consts = constant_values(g)
        to_4d = all(len(m["chain"]) and _unsqueezed_rank(consts, m["chain"]) == 4 for m in group)
        if to_4d:
            g.initializer.append(numpy_helper.from_array(np.array([2, 3], np.int64), f"{name}/axes"))
            nodes.append(helper.make_node("Unsqueeze", [f"{name}/y", f"{name}/axes"], [f"{name}/y4"],
                                          name=f"{name}/unsqueeze"))
        outs = [m["final"] if to_4d else m["out"] for m in group]
        nodes.append(helper.make_node("Split", [f"{name}/y4" if to_4d else f"{name}/y", f"{name}/sizes"], outs,
                                      name=f"{name}/split", axis=1))
        at = list(g.node).index(first)
        for m in group:
            for n in [m["gemm"], m["add"]] + (m["chain"] if to_4d else []):
                if n is not None:
                    g.node.remove(n)
        for k, n in enumerate(nodes):
            g.node.insert(at + k, n)
        _reorder_topologically(g)


def _unsqueezed_rank(consts: dict[str, np.ndarray], chain: list[onnx.NodeProto]) -> int:
    rank = 2
    for n in chain:
        if len(n.input) < 2 or n.input[1] not in consts:
            return -1
        axes = consts[n.input[1]].reshape(-1)
        rank += len(axes)
        if sorted(int(a) % rank for a in axes) != list(range(rank - len(axes), rank)):
            return -1   # only trailing singleton axes: [B, C] → [B, C, 1, 1]
    return rank


def _reorder_topologically(g: onnx.GraphProto) -> None:
    """Stable topological order (the merged Gemm sits where the first member was; its input may come later)."""
    ready = {t.name for t in g.initializer} | {i.name for i in g.input} | {""}
    pending, ordered = list(g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError("graph has a cycle or a missing input after batching the time projections")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)
