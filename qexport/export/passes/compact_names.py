"""CompactNames: short names for intermediate tensors and nodes, and no stored value_info.

The TorchScript exporter names tensors after module paths (`/unet/down_blocks.1/…/Conv_output_0`);
on a small U-Net those names and the stored shape annotations weigh as much as its int8 weights.
Graph inputs, outputs, initializers and the time-step lookup tensors (`qx/…`) keep their names.
"""

from __future__ import annotations

import onnx


class CompactNames:
    def __call__(self, model: onnx.ModelProto) -> bool:
        g = model.graph
        keep = {i.name for i in g.input} | {o.name for o in g.output} | {t.name for t in g.initializer}
        mapping: dict[str, str] = {}
        for n in g.node:
            for o in n.output:
                if o and o not in keep and o not in mapping and not o.startswith("qx/"):
                    mapping[o] = f"v{len(mapping)}"
        for k, n in enumerate(g.node):
            n.name = f"n{k}"
            for i, name in enumerate(n.input):
                if name in mapping:
                    n.input[i] = mapping[name]
            for i, name in enumerate(n.output):
                if name in mapping:
                    n.output[i] = mapping[name]
        del g.value_info[:]
        return bool(mapping)
