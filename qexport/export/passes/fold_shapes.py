"""FoldShapes: give every Reshape a constant target shape, so the Shape → Gather → Unsqueeze → Concat
chains the TorchScript exporter emits for a dynamic batch disappear from the graph.

Only the batch dimension of `sample` is dynamic, so each computed target shape is either constant
or depends on the batch in exactly one position. The pass evaluates every such shape at two batch
sizes (onnxruntime, optimizations off, on a copy without tap markers); equal values become a
constant, values differing in one position become a constant with -1 there. Shapes it cannot
prove this way (two positions differ, or the shape already holds -1 / 0) are left computed.
Then nodes no output depends on are removed. On the shipped U-Net this removes ~590 of ~1,400
nodes, which at batch 1 is most of a step's non-GEMM time.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .graph_utils import add_initializer, prune_initializers
from .strip_taps import StripTaps

PROBE_BATCHES = (2, 3)


def remove_dead_nodes(graph: onnx.GraphProto) -> int:
    """Drop nodes none of whose outputs is used (repeatedly); returns how many."""
    removed = 0
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            return removed
        for n in dead:
            graph.node.remove(n)
        removed += len(dead)


class FoldShapes:
    def __init__(self, sample_shape: tuple[int, ...], num_train_timesteps: int = 1000,
                 context_shape: tuple[int, int] | None = None):
        self.sample_shape = tuple(sample_shape)
        self.context_shape = context_shape
        self.t = num_train_timesteps // 2

    def _evaluate(self, model: onnx.ModelProto, names: list[str]) -> list[dict[str, np.ndarray]]:
        import onnxruntime as ort

        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        StripTaps()(probe)
        del probe.graph.output[:]
        for name in names:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.INT64, None))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
        out = []
        for b in PROBE_BATCHES:
            feeds = {"sample": np.zeros((b, *self.sample_shape), np.float32),
                     "timestep": np.array([self.t], np.int64)}
            if self.context_shape is not None:
                feeds["encoder_hidden_states"] = np.zeros((b, *self.context_shape), np.float32)
            out.append(dict(zip(names, sess.run(None, feeds))))
        return out

    def __call__(self, model: onnx.ModelProto) -> bool:
        g = model.graph
        fixed = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
        reshapes = [n for n in g.node if n.op_type == "Reshape" and n.input[1] not in fixed]
        names = sorted({n.input[1] for n in reshapes})
        if not names:
            return False
        values = self._evaluate(model, names)
        folded: dict[str, str] = {}
        for name in names:
            a, b = (v[name] for v in values)
            if a.shape != b.shape or a.ndim != 1:
                continue
            differ = np.flatnonzero(a != b)
            if len(differ) > 1 or (len(differ) == 1 and (np.any(a == -1) or np.any(a == 0))):
                continue
            shape = a.astype(np.int64).copy()
            if len(differ) == 1:
                shape[differ[0]] = -1
            folded[name] = add_initializer(g, f"{name}/folded", shape)
        for n in reshapes:
            if n.input[1] in folded:
                n.input[1] = folded[n.input[1]]
        self.folded = len(folded)
        self.removed = remove_dead_nodes(g)
        prune_initializers(g)
        return bool(folded)
