"""Feature extractors for the fidelity metrics, behind one small interface.

An extractor maps images `[N, C, H, W]` in [-1, 1] to features `[N, D]` (`features`), may predict
class labels (`labels`, for label agreement) and may carry the real-data feature statistics
(`real_stats`, for `fd_to_real`). `load_extractor(spec)` resolves a spec:
  - `digits16-classifier` (default): the shipped 16×16 digits classifier (128-d penultimate layer);
  - `path/to/model.onnx`: any ONNX feature network the user has (e.g. an Inception-v3 exported
    for FID on RGB models); its first output are the features, a second output (if any) logits;
    input images are passed in [-1, 1] and resized by the network itself if it needs to;
  - `package.module:factory`: a Python callable returning an object with this interface.
`--real-stats FILE.npz` (`mu`, `sigma`) supplies real-data statistics for extractors without them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import QexportError
from .metrics import FeatureStats

DEFAULT_EXTRACTOR = "digits16-classifier"


class FeatureExtractor(Protocol):
    name: str
    real_stats: FeatureStats | None

    def features(self, images: np.ndarray) -> np.ndarray: ...

    def labels(self, images: np.ndarray) -> np.ndarray | None: ...


class ClassifierFeatures:
    """The shipped digits classifier: penultimate-layer features and argmax labels."""

    def __init__(self, name: str = DEFAULT_EXTRACTOR, batch: int = 256):
        import torch

        from ..zoo.loading import load_classifier

        self.torch = torch
        self.name, self.batch = name, batch
        self.model, stats = load_classifier(name)
        self.real_stats = FeatureStats(stats["mu"], stats["sigma"], int(stats["n"]))

    def _run(self, images: np.ndarray, fn) -> np.ndarray:
        if images.shape[-1] == 32:   # the text-to-image model's 32x32 digits: the same 2x2 box filter as the data
            from ..zoo.data import to16

            images = to16(images)
        out = []
        with self.torch.no_grad():
            for i in range(0, len(images), self.batch):
                x = self.torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch], np.float32)).clamp(-1, 1)
                out.append(fn(x).numpy())
        return np.concatenate(out)

    def features(self, images: np.ndarray) -> np.ndarray:
        return self._run(images, self.model.features)

    def labels(self, images: np.ndarray) -> np.ndarray:
        return self._run(images, self.model).argmax(axis=1)


class OnnxFeatures:
    """A user-supplied ONNX feature network (first output: features `[N, D]`; optional second: logits)."""

    def __init__(self, path: str | Path, batch: int = 64):
        import onnxruntime as ort

        self.name, self.batch, self.real_stats = str(path), batch, None
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _run(self, images: np.ndarray, k: int) -> np.ndarray:
        return np.concatenate([self.session.run([self.outputs[k]], {self.input: np.ascontiguousarray(
            np.clip(images[i:i + self.batch], -1, 1), np.float32)})[0].reshape(len(images[i:i + self.batch]), -1)
            for i in range(0, len(images), self.batch)])

    def features(self, images: np.ndarray) -> np.ndarray:
        return self._run(images, 0)

    def labels(self, images: np.ndarray) -> np.ndarray | None:
        return self._run(images, 1).argmax(axis=1) if len(self.outputs) > 1 else None


def load_extractor(spec: str = DEFAULT_EXTRACTOR, real_stats: str | Path | None = None) -> FeatureExtractor:
    """Resolve an extractor spec (see the module docstring); `real_stats` overrides its statistics."""
    if spec.endswith(".onnx"):
        if not Path(spec).is_file():
            raise QexportError(f"feature network {spec} does not exist; pass an existing .onnx file to --features")
        ext = OnnxFeatures(spec)
    elif ":" in spec:
        mod, _, attr = spec.partition(":")
        try:
            ext = getattr(importlib.import_module(mod), attr)()
        except (ImportError, AttributeError) as e:
            raise QexportError(f"cannot load feature extractor {spec!r} ({e}); pass 'package.module:factory'") from None
    else:
        ext = ClassifierFeatures(spec)
    if real_stats is not None:
        if not Path(real_stats).is_file():
            raise QexportError(f"real-data statistics {real_stats} do not exist; pass an .npz with mu and sigma")
        d = np.load(real_stats)
        ext.real_stats = FeatureStats(d["mu"], d["sigma"], int(d["n"]) if "n" in d else 0)
    return ext
