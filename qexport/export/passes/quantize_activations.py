"""QuantizeActivations: every tap becomes QuantizeLinear → DequantizeLinear with its site's
parameters (looked up by time step or constant, see params.py); taps without a table entry, and
taps whose output is a graph output (the model's own result stays float), are removed.

A tap consumed only by Transpose nodes (Kᵀ in attention) is quantized *before* the transpose, so
the dequantize feeds the MatMul directly: Q → Transpose → DQ → MatMul.

Sites that quantize one tensor with equal parameters at every time step (attention's to_q, to_k and
to_v read the same normalized tokens) share one QuantizeLinear; each keeps its own DequantizeLinear,
named by its site (QuantizeWeights finds a module by it). When that tensor is a Transpose's output used
only by those taps (the tokens: GroupNorm's [B, C, HW] transposed to [B, HW, C]), the shared
QuantizeLinear reads the Transpose's input and the Transpose moves uint8 (a quarter of the bytes).
Both rewrites give the same values. Measured on the cifar-config integer graph (Zen 5 VNNI, 2 threads,
B=1, five interleaved probes): 12 QuantizeLinear fewer and six float transposes uint8, ×0.98–1.02
(median ×1.01).
"""

from __future__ import annotations

import onnx
from onnx import helper

from .graph_utils import bypass, consumers, producers
from .params import _Params
from .strip_taps import drop_custom_opset, is_tap, tap_site


class QuantizeActivations:
    def __init__(self, params: _Params):
        self.params = params

    def requires(self, model: onnx.ModelProto) -> None:
        sites = {tap_site(n) for n in model.graph.node if is_tap(n)}
        missing = sorted(s for s in sites if not self.params.has(s) and not s.endswith(".out")
                         and not self.params.table.is_float(s))
        if missing:
            raise ValueError(f"{len(missing)} sites of the graph have no table entry (e.g. {missing[:3]}); "
                             f"the tables were calibrated on another model — recalibrate")

    def __call__(self, model: onnx.ModelProto) -> bool:
        self.requires(model)
        g = model.graph
        outputs = {o.name for o in g.output}
        cons, prod = consumers(g), producers(g)
        quantized: dict[str, tuple[str, str]] = {}   # tensor -> (site, its QuantizeLinear output, maybe transposed)
        changed = False
        for tap in [n for n in g.node if is_tap(n)]:
            site = tap_site(tap)
            if not self.params.has(site) or tap.output[0] in outputs:
                bypass(g, tap)
                continue
            s, z = self.params.scale(site), self.params.zero_point(site)
            x, y = tap.input[0], tap.output[0]
            q = f"{y}/q"
            idx = list(g.node).index(tap)
            g.node.remove(tap)
            users = cons[y]
            twin = quantized.get(x)
            if twin is not None and self.params.same(twin[0], site):
                new = [helper.make_node("DequantizeLinear", [twin[1], s, z], [y], name=f"{site}/DQ")]
            elif users and all(u.op_type == "Transpose" for u in users):
                new = [helper.make_node("QuantizeLinear", [x, s, z], [q], name=f"{site}/Q")]
                for k, tr in enumerate(users):
                    tq = f"{tr.output[0]}/q"
                    new.append(helper.make_node("Transpose", [q], [tq], name=f"{site}/T{k}", perm=_perm(tr)))
                    new.append(helper.make_node("DequantizeLinear", [tq, s, z], [tr.output[0]], name=f"{site}/DQ{k}"))
                    prod[tr.output[0]] = new[-1]   # the transposed tensor now comes from a DequantizeLinear
                    g.node.remove(tr)
            elif self._tokens(prod.get(x), cons[x], site, outputs):
                tr = prod[x]
                new = [helper.make_node("QuantizeLinear", [tr.input[0], s, z], [q], name=f"{site}/Q"),
                       helper.make_node("Transpose", [q], [f"{x}/q"], name=f"{site}/T", perm=_perm(tr)),
                       helper.make_node("DequantizeLinear", [f"{x}/q", s, z], [y], name=f"{site}/DQ")]
                idx = list(g.node).index(tr)
                g.node.remove(tr)
                quantized[x] = (site, f"{x}/q")
            else:
                new = [helper.make_node("QuantizeLinear", [x, s, z], [q], name=f"{site}/Q"),
                       helper.make_node("DequantizeLinear", [q, s, z], [y], name=f"{site}/DQ")]
                quantized.setdefault(x, (site, q))
            for k, n in enumerate(new):
                g.node.insert(idx + k, n)
            changed = True
        self.params.finish()
        drop_custom_opset(model)
        return changed

    def _tokens(self, src, users: list, site: str, outputs: set) -> bool:
        """`src` is a Transpose whose output only taps of `site`'s parameters read."""
        return (src is not None and src.op_type == "Transpose" and src.output[0] not in outputs
                and all(is_tap(u) and self.params.has(tap_site(u)) and self.params.same(tap_site(u), site)
                        for u in users))


def _perm(node: onnx.NodeProto) -> list[int]:
    return list(next(a.ints for a in node.attribute if a.name == "perm"))
