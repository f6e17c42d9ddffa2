"""Where a quantized graph gets its per-site scale / zero point: looked up by time step, or constant.

  - `LookupParams(table)`: `g = Gather(group_of_t, t)`; one Gather of a `[K, n]` table row per
    dtype and one Split give every site its scale (a 1-element tensor) — two kernels per step in
    all, instead of one lookup per site. Zero points are constants when the table shares them
    across groups (integer kernels keep their fast path), looked up otherwise; a site whose scale is
    the same in every group (`TableConfig.fixed_range_below`) gets a constant scale.
  - `ConstantParams(table, group)`: the same parameters, frozen at one group — the constant-scale
    graph ORT fuses by itself (the static baseline, or one graph per group for NPUs).
Both hand out tensor names through `scale(site)` / `zero_point(site)`; `finish()` emits the lookups.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ...tables.schema import QuantTable
from .graph_utils import add_initializer


class _Params:
    def __init__(self, graph: onnx.GraphProto, table: QuantTable):
        self.g, self.table = graph, table
        self.index = {s: i for i, s in enumerate(table.sites)}
        self._cache: dict[tuple, str] = {}

    def _name(self, site: str, kind: str) -> str:
        return f"qx/{site}/{kind}"

    def has(self, site: str) -> bool:
        return site in self.index

    def same(self, a: str, b: str) -> bool:
        """Sites `a` and `b` have the same scale and zero point in every group."""
        i, j = self.index[a], self.index[b]
        return bool(np.array_equal(self.table.scale[:, i], self.table.scale[:, j])
                    and np.array_equal(self.table.zero_point[:, i], self.table.zero_point[:, j]))

    def shared_zero_point(self) -> bool:
        return bool(np.all(self.table.zero_point == self.table.zero_point[:1]))


class ConstantParams(_Params):
    def __init__(self, graph, table, group: int = 0):
        super().__init__(graph, table)
        self.group = group

    def scale(self, site: str) -> str:
        key = (site, "scale")
        if key not in self._cache:
            v = np.float32(self.table.scale[self.group, self.index[site]])
            self._cache[key] = add_initializer(self.g, self._name(site, "scale"), np.array(v, np.float32))
        return self._cache[key]

    def zero_point(self, site: str) -> str:
        key = (site, "zp")
        if key not in self._cache:
            v = self.table.zero_point[self.group, self.index[site]]
            self._cache[key] = add_initializer(self.g, self._name(site, "zp"), np.array(v, np.uint8))
        return self._cache[key]

    def finish(self) -> None:
        pass


class LookupParams(_Params):
    GROUP = "qx/group"

    def __init__(self, graph, table):
        super().__init__(graph, table)
        self.pending: dict[str, list[tuple[str, np.ndarray]]] = {"scale": [], "zp": []}
        self.const_zp = self.shared_zero_point()

    def scale(self, site: str) -> str:
        key = (site, "scale")
        if key not in self._cache:
            col = self.table.scale[:, self.index[site]].astype(np.float32)
            out = self._name(site, "scale")
            if np.all(col == col[0]):
                add_initializer(self.g, out, np.array(col[0], np.float32))
            else:
                self.pending["scale"].append((out, col))
            self._cache[key] = out
        return self._cache[key]

    def zero_point(self, site: str) -> str:
        key = (site, "zp")
        if key not in self._cache:
            col = self.table.zero_point[:, self.index[site]].astype(np.uint8)
            if self.const_zp:
                self._cache[key] = add_initializer(self.g, self._name(site, "zp"), np.array(col[0], np.uint8))
            else:
                out = self._name(site, "zp")
                self.pending["zp"].append((out, col))
                self._cache[key] = out
        return self._cache[key]

    def finish(self) -> None:
        if not any(self.pending.values()):
            return
        g = self.g
        add_initializer(g, "qx/group_of_t", self.table.group_of_t.astype(np.int64))
        add_initializer(g, "qx/scalar_shape", np.array([], np.int64))
        nodes = [helper.make_node("Reshape", ["timestep", "qx/scalar_shape"], ["qx/t"], name="qx/t"),
                 helper.make_node("Gather", ["qx/group_of_t", "qx/t"], [self.GROUP], name="qx/group")]
        for kind, items in self.pending.items():
            if not items:
                continue
            tab = np.stack([col for _, col in items], axis=1)          # [K, n]
            add_initializer(g, f"qx/{kind}_table", tab)
            add_initializer(g, f"qx/{kind}_split", np.ones(len(items), np.int64))
            nodes.append(helper.make_node("Gather", [f"qx/{kind}_table", self.GROUP], [f"qx/{kind}_row"],
                                          name=f"qx/{kind}_row", axis=0))
            nodes.append(helper.make_node("Split", [f"qx/{kind}_row", f"qx/{kind}_split"],
                                          [name for name, _ in items], name=f"qx/{kind}_split", axis=0))
        for i, n in enumerate(nodes):  # the lookups go first: they only need the graph input
            g.node.insert(i, n)
