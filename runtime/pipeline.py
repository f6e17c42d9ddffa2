"""The one-call generation graph (manifest role `pipeline` / `pipeline-png`): noise and a step count in, image out.

`PipelineSession(artifact, png=False, threads=None)` loads the artifact's `pipeline.onnx` (or, with
`png`, `pipeline_png.onnx`, registering onnxruntime-extensions' custom-op library), checks inputs the
graph itself cannot refuse (step count, noise shape), and `generate(steps, batch, seed)` returns
uint8 images `[B, H, W, C]` (and the PNG bytes of image 0) from the same x_T the Python sampler
draws for that seed — the whole DDIM loop runs inside onnxruntime.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .artifact import Artifact, ArtifactError
from .sampler import initial_noise
from .session import disabled_optimizers, extensions_library, open_session, session_options


@dataclass
class Generated:
    images: np.ndarray          # uint8 [B, H, W, C]
    png: bytes | None
    seconds: float


class PipelineSession:
    def __init__(self, artifact: Artifact, png: bool = False, threads: int | None = None):
        role = "pipeline-png" if png else "pipeline"
        names = artifact.manifest.files_with_role(role)
        if not names:
            raise ArtifactError(f"artifact {artifact.path} has no {role} graph; convert with --pipeline-graph"
                                + (" and onnxruntime-extensions installed" if png else ""))
        self.artifact, self.path, self.png = artifact, artifact.path / names[0], png
        so = session_options(threads)
        if png:
            so.register_custom_ops_library(extensions_library("the PNG pipeline graph",
                                                              ", or use the pipeline graph without PNG"))
        t0 = time.perf_counter()
        self.session = open_session(self.path, so, disabled=disabled_optimizers())
        self.load_ms = (time.perf_counter() - t0) * 1e3
        if {i.name for i in self.session.get_inputs()} != {"noise", "steps"}:
            raise ArtifactError(f"{self.path}: expected inputs 'noise' and 'steps'; this is not a qexport pipeline graph")

    def __call__(self, noise: np.ndarray, steps: int) -> tuple[np.ndarray, bytes | None]:
        m = self.artifact.manifest
        if not 1 <= steps <= m.num_train_timesteps:
            raise ValueError(f"steps must be in [1, {m.num_train_timesteps}] (the model's training time steps), "
                             f"got {steps}")
        noise = np.ascontiguousarray(noise, dtype=np.float32)
        if noise.ndim != 4 or noise.shape[0] < 1 or list(noise.shape[1:]) != list(m.sample_shape):
            raise ValueError(f"noise of shape {list(noise.shape)} does not fit [batch, {', '.join(map(str, m.sample_shape))}]")
        out = self.session.run(None, {"noise": noise, "steps": np.array([steps], np.int64)})
        return out[0], (bytes(out[1]) if self.png else None)

    def generate(self, steps: int = 50, batch: int = 1, seed: int = 0) -> Generated:
        if batch < 1 or seed < 0:
            raise ValueError(f"batch must be ≥ 1 and seed ≥ 0, got batch {batch}, seed {seed}")
        noise = initial_noise((batch, *self.artifact.manifest.sample_shape), seed)
        t0 = time.perf_counter()
        images, png = self(noise, steps)
        return Generated(images, png, time.perf_counter() - t0)
