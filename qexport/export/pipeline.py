"""The conversion pipeline, declared once: load → export marked FP32 → passes → artifact.

`export_fp32_artifact` writes an artifact with the FP32 reference graph only; `convert` (the main
job) adds the quantized graphs built from calibration tables.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx

from ..zoo.loading import LoadedModel, load_model
from .artifact import ArtifactWriter
from .passes import StripTaps
from .to_onnx import export_marked

log = logging.getLogger(__name__)
FP32_FILE = "unet_fp32.onnx"


def io_spec(model: LoadedModel) -> tuple[list, list]:
    c, h, w = model.sample_shape
    inputs = [dict(name="sample", dtype="float32", shape=["batch", c, h, w]),
              dict(name="timestep", dtype="int64", shape=[1],
                   doc=f"raw training time step in [0, {model.num_train_timesteps})")]
    outputs = [dict(name="noise_pred", dtype="float32", shape=["batch", c, h, w],
                    doc=model.scheduler_config.get("prediction_type", "epsilon"))]
    return inputs, outputs


def marked_graph(model: LoadedModel, workdir: Path) -> onnx.ModelProto:
    path = workdir / "marked.onnx"
    export_marked(model.unet, path)
    return onnx.load(str(path))


def manifest_fields(model: LoadedModel, *, bits: dict, groups: int, method: str, extra: dict | None = None) -> dict:
    inputs, outputs = io_spec(model)
    return dict(source=dict(model_id=model.model_id, kind=model.kind, weights_sha256=model.weights_sha256),
                bits=bits, groups=groups, num_train_timesteps=model.num_train_timesteps,
                sample_shape=list(model.sample_shape), inputs=inputs, outputs=outputs,
                scheduler=model.scheduler_config, method=method, extra=extra or {})


def export_fp32_artifact(model_id: str, out: str | Path, *, overwrite: bool = False,
                         allow_pickle: bool = False) -> Path:
    """Write an artifact holding only the FP32 reference graph of MODEL_ID."""
    model = load_model(model_id, allow_pickle=allow_pickle)
    with ArtifactWriter(out, overwrite=overwrite) as w, tempfile.TemporaryDirectory() as tmp:
        fp32 = marked_graph(model, Path(tmp))
        StripTaps()(fp32)
        onnx.checker.check_model(fp32)
        onnx.save(fp32, str(w.add(FP32_FILE, "fp32")))
        w.finish(**manifest_fields(model, bits=dict(weights=32, activations=32), groups=0, method="fp32"))
    return Path(out)
