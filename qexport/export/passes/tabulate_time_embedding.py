"""TabulateTimeEmbedding: the time embedding looked up by time step instead of computed at every step.

The time MLP's output e (sinusoidal projection → linear_1 → SiLU → linear_2, diffusers'
`time_embedding`) depends on the time step alone, and every ResNet's projection starts from SiLU(e).
Rule: the latest t-only tensor e whose SiLU feeds a t-only Gemm (tables.build:
`tabulate_time_embedding`) is evaluated at convert time for every t in [0, T) at batch 1, stored as a
float16 `[T, D]` initializer, and replaced by `Gather(table, timestep) → Cast`: a `[1, D]` tensor the
projections broadcast over the batch. The nodes that computed e go, so the step no longer runs the
sinusoid and the two Linears. The simulation rounds e to float16 the same way (eval.simulate).
Size: T · D · 2 bytes per graph (shipped model 256 KB, cifar-config U-Net 1 MB).
Rule 2 (`projections`, tables.build: `tabulate_time_projections`, by default where T ≤ 2·D): each float Gemm of SiLU(e) — after
BatchTimeProjections, the one product of every ResNet's `time_emb_proj` — is evaluated the same way and
replaced by `Gather(table, timestep) → DequantizeLinear(axis=1)` over an int8 `[T, N]` table with one
symmetric scale per channel (its largest |value| over t / 127); the float16 [T, D] table, SiLU and the
Gemm weights go. int8 rather than float16: onnxruntime keeps a Gather's table as stored but
constant-folds the weights' float16 → float32 cast, so the product's weights cost 4 bytes each in
memory and an int8 table of T rows costs about what they did in the file (cifar config: 1000 × 4992 B
for 512 × 4992 float16 weights). The simulation rounds the projections the same way (eval.simulate).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...tables.weights import quantize_weight, weight_scales
from .batch_time_projections import _silu_source, t_only_tensors
from .fold_shapes import remove_dead_nodes
from .graph_utils import producers, prune_initializers

TABLE = "qx/time_embedding_table"
PROJECTION_TABLE = "qx/time_projection_table"



def _ancestors(prod: dict, name: str) -> list[onnx.NodeProto]:
    seen, stack, nodes = set(), [name], {}
    while stack:
        n = prod.get(stack.pop())
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        nodes[id(n)] = n
        stack.extend(n.input)
    return list(nodes.values())


class TabulateTimeEmbedding:
    def __init__(self, num_train_timesteps: int, projections=None):
        """`projections`: predicate on the time embedding's width D, whether to apply rule 2 (tables'
        `time_projection_table`); None: never."""
        self.T = num_train_timesteps
        self.projections = projections

    def candidates(self, g: onnx.GraphProto) -> list[str]:
        t_only, prod = t_only_tensors(g), producers(g)
        inits = {t.name for t in g.initializer}
        found = []
        for n in g.node:
            if n.op_type == "Gemm" and n.input[0] in t_only:
                e = _silu_source(prod, n.input[0])
                if e is not None and e not in inits and e in prod and e not in found:
                    found.append(e)
        upstream = {o for e in found for a in _ancestors(prod, e) for o in a.output if o != e}
        return [e for e in found if e not in upstream]

    def __call__(self, model: onnx.ModelProto) -> bool:
        g = model.graph
        found = self.candidates(g)
        if len(found) != 1:
            return False
        e = found[0]
        table = self.evaluate(model, e)
        if table is None:
            return False
        g.initializer.append(numpy_helper.from_array(table.astype(np.float16), TABLE))
        producer = producers(g)[e]
        producer.output[list(producer.output).index(e)] = f"{e}/computed"   # now dead, removed below
        at = list(g.node).index(producer)
        g.node.insert(at, helper.make_node("Cast", [f"{TABLE}/row"], [e], name=f"{TABLE}/cast", to=TensorProto.FLOAT))
        g.node.insert(at, helper.make_node("Gather", [TABLE, "timestep"], [f"{TABLE}/row"], name=f"{TABLE}/gather",
                                           axis=0))
        remove_dead_nodes(g)
        if self.projections is not None and self.projections(int(np.prod(table.shape[1:]))):
            self._tabulate_projections(model, e)
        prune_initializers(g)
        return True

    def _tabulate_projections(self, model: onnx.ModelProto, e: str) -> None:
        g = model.graph
        prod, outputs = producers(g), {o.name for o in g.output}
        gemms = [n for n in g.node if n.op_type == "Gemm" and _silu_source(prod, n.input[0]) == e
                 and n.output[0] not in outputs]
        for k, gemm in enumerate(gemms):
            rows = self.evaluate(model, gemm.output[0])
            if rows is None or rows.ndim != 2:
                continue
            scale = weight_scales(rows.T, 8, mse=False)   # per column: max|col| / 127, the weights' own rule
            q = quantize_weight(rows.T, scale, 8).T
            name = f"{PROJECTION_TABLE}{'' if len(gemms) == 1 else f'/{k}'}"
            g.initializer.extend([numpy_helper.from_array(q, name), numpy_helper.from_array(scale, f"{name}/scale")])
            at = list(g.node).index(gemm)
            g.node.remove(gemm)
            g.node.insert(at, helper.make_node("DequantizeLinear", [f"{name}/row", f"{name}/scale"], [gemm.output[0]],
                                               name=f"{name}/dequantize", axis=1))
            g.node.insert(at, helper.make_node("Gather", [name, "timestep"], [f"{name}/row"], name=f"{name}/gather",
                                               axis=0))
        remove_dead_nodes(g)

    def evaluate(self, model: onnx.ModelProto, e: str) -> np.ndarray | None:
        """e at batch 1 for every t in [0, T): `[T, *e.shape[1:]]`, or None when e is not batch-first."""
        import onnxruntime as ort

        g = model.graph
        nodes = _ancestors(producers(g), e)
        order = {id(n): i for i, n in enumerate(g.node)}
        nodes.sort(key=lambda n: order[id(n)])
        used = {i for n in nodes for i in n.input}
        inputs = [i for i in g.input if i.name in used]
        sub = helper.make_graph(nodes, "time_embedding", inputs, [helper.make_tensor_value_info(e, TensorProto.FLOAT, None)],
                                [t for t in g.initializer if t.name in used])
        sub_model = helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(sub_model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        feeds = {}
        for i in inputs:
            dims = [d.dim_value if d.HasField("dim_value") else 1 for d in i.type.tensor_type.shape.dim]
            dtype = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
            feeds[i.name] = np.zeros([1, *dims[1:]] if dims else [], dtype)
        rows = []
        for t in range(self.T):
            if "timestep" in feeds:
                feeds["timestep"] = np.array([t], np.int64)
            rows.append(sess.run(None, feeds)[0])
        first = rows[0]
        if first.ndim < 1 or first.shape[0] != 1:
            return None
        return np.concatenate(rows, axis=0)
