"""GroupNormAffine: the per-channel scale and shift after a GroupNorm become one BatchNormalization.

torch exports GroupNorm as Reshape [B, G, -1] → InstanceNormalization → Reshape [B, C, H, W] (or [B, C, H·W]) →
Mul γ → Add β, the last two with constant [C, 1, 1] (or [C, 1]) operands: two full passes over the tensor, each its own
kernel call. BatchNormalization with mean 0, variance 1 and ε 0 computes (x − 0) / √1 · γ + β, the same
values in one pass (onnxruntime's kernel: bit-identical to the Mul and Add on x86). onnxruntime fuses
neither on its own. Measured on the cifar-config integer graph (Zen 5 VNNI, 2 threads, B=1): all 51
GroupNorms, 51 kernel calls fewer a step, ×1.02–1.03 faster (interleaved probe); at B=8 ×1.01.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .graph_utils import add_initializer, constant_values, consumers, producers, prune_initializers


def _constant(constants: dict, prod: dict, name: str) -> np.ndarray | None:
    """The value of `name`, looking through Identity nodes; None when it is computed."""
    while name not in constants and name in prod and prod[name].op_type == "Identity":
        name = prod[name].input[0]
    return constants.get(name)


def _per_channel(v: np.ndarray | None, rank: int, channels: int | None = None) -> np.ndarray | None:
    """`v` as a [C] vector when it broadcasts along axis 1 of a rank-`rank` tensor ([C, 1, …] or [1, C, 1, …])."""
    if v is None or v.dtype != np.float32 or v.ndim not in (rank - 1, rank) or (v.ndim == rank and v.shape[0] != 1):
        return None
    c = v.shape[-(rank - 1)]
    if any(d != 1 for d in v.shape[-(rank - 2):]) or (channels is not None and c != channels):
        return None
    return v.reshape(c)


class GroupNormAffine:
    def __call__(self, model: onnx.ModelProto) -> bool:
        g = model.graph
        constants, prod, cons = constant_values(g), producers(g), consumers(g)
        outputs = {o.name for o in g.output}
        self.fused = 0
        for norm in [n for n in g.node if n.op_type == "InstanceNormalization"]:
            after = cons[norm.output[0]]
            if len(after) != 1 or after[0].op_type != "Reshape":
                continue
            back = after[0]
            target = constants.get(back.input[1])
            users = cons[back.output[0]]
            if target is None or target.ndim != 1 or len(target) < 3 or len(users) != 1 or users[0].op_type != "Mul" \
                    or back.output[0] in outputs:
                continue
            mul = users[0]
            adds = cons[mul.output[0]]
            if len(adds) != 1 or adds[0].op_type != "Add" or mul.output[0] in outputs:
                continue
            add = adds[0]
            rank = len(target)
            gamma = _per_channel(_constant(constants, prod, [i for i in mul.input if i != back.output[0]][0]), rank)
            if gamma is None:
                continue
            beta = _per_channel(_constant(constants, prod, [i for i in add.input if i != mul.output[0]][0]),
                                rank, len(gamma))
            if beta is None:
                continue
            base = f"{mul.name or mul.output[0]}/affine"
            c = len(gamma)
            inputs = [back.output[0],
                      add_initializer(g, f"{base}/scale", gamma.copy()),
                      add_initializer(g, f"{base}/bias", beta.copy()),
                      add_initializer(g, f"{base}/mean", np.zeros(c, np.float32)),
                      add_initializer(g, f"{base}/var", np.ones(c, np.float32))]
            bn = helper.make_node("BatchNormalization", inputs, [add.output[0]], name=base, epsilon=0.0)
            g.node.insert(list(g.node).index(mul), bn)
            g.node.remove(mul)
            g.node.remove(add)
            self.fused += 1
        prune_initializers(g)
        return self.fused > 0
