"""SharedWeights: store large initializers of several graphs in one external-data file, each
distinct tensor once (graphs that share a weight point at the same offset)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import TensorProto

MIN_BYTES = 1024


class SharedWeights:
    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")
        self.offsets: dict[str, tuple[int, int]] = {}

    def externalize(self, model: onnx.ModelProto) -> None:
        for t in model.graph.initializer:
            if len(t.raw_data) < MIN_BYTES:
                continue
            key = hashlib.sha256(t.raw_data).hexdigest()
            if key not in self.offsets:
                pad = (-self.f.tell()) % 64
                self.f.write(b"\0" * pad)
                self.offsets[key] = (self.f.tell(), len(t.raw_data))
                self.f.write(t.raw_data)
            offset, length = self.offsets[key]
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            del t.external_data[:]
            for k, v in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
                e = t.external_data.add()
                e.key, e.value = k, v

    def close(self) -> None:
        self.f.close()
