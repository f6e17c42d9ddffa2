"""The conversion pipeline, declared once: load → export marked FP32 → passes → artifact.

`export_fp32_artifact` writes an artifact with the FP32 reference graph only; `convert` (the main
job) adds the quantized graphs built from calibration tables.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import onnx

from ..zoo.loading import LoadedModel, load_model
from qexport_runtime.correction import CORRECTION_FILE
from qexport_runtime.probes import PROBES_FILE

from .artifact import ArtifactWriter
from .correction import fit_correction
from .probes import make_probes
from .saturation import pair_report
from .passes import CancelBiasRoundTrip, CollapseReshapes, FoldShapes, NarrowConvAsPointwise, StripTaps
from .to_onnx import export_marked

log = logging.getLogger(__name__)
FP32_FILE = "unet_fp32.onnx"


def io_spec(model: LoadedModel) -> tuple[list, list]:
    c, h, w = model.sample_shape
    inputs = [dict(name="sample", dtype="float32", shape=["batch", c, h, w]),
              dict(name="timestep", dtype="int64", shape=[1],
                   doc=f"raw training time step in [0, {model.num_train_timesteps})")]
    if model.context_shape is not None:
        inputs.append(dict(name="encoder_hidden_states", dtype="float32", shape=["batch", *model.context_shape],
                           doc="text embeddings (text encoder's last hidden state); CFG: [uncond; cond]"))
    outputs = [dict(name="noise_pred", dtype="float32", shape=["batch", c, h, w],
                    doc=model.scheduler_config.get("prediction_type", "epsilon"))]
    return inputs, outputs


def marked_graph(model: LoadedModel, workdir: Path) -> onnx.ModelProto:
    """The marked FP32 export with constant reshape targets and no layout no-ops (shared by every graph
    of the artifact)."""
    path = workdir / "marked.onnx"
    export_marked(model.unet, path, context_shape=model.context_shape)
    marked = onnx.load(str(path))
    FoldShapes(model.sample_shape, model.num_train_timesteps, model.context_shape)(marked)
    CollapseReshapes()(marked)
    return marked


def fp32_graph(marked: onnx.ModelProto) -> onnx.ModelProto:
    """The FP32 reference graph: the marked export without its taps, at the quantized graphs' opset."""
    model = onnx.ModelProto()
    model.CopyFrom(marked)
    StripTaps()(model)
    CancelBiasRoundTrip()(model)
    NarrowConvAsPointwise()(model)
    model = to_opset(model)
    onnx.checker.check_model(model)
    return model


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
        onnx.save(fp32_graph(marked_graph(model, Path(tmp))), str(w.add(FP32_FILE, "fp32")))
        w.finish(**manifest_fields(model, bits=dict(weights=32, activations=32), groups=0, method="fp32"))
    return Path(out)


QDQ_FILE = "unet_qdq.onnx"
QOPSET = 21


def to_opset(model: onnx.ModelProto, opset: int = QOPSET) -> onnx.ModelProto:
    from onnx import version_converter

    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return model if current == opset else version_converter.convert_version(model, opset)


def build_qdq(marked: onnx.ModelProto, table, group: int | None = None) -> onnx.ModelProto:
    """The portable QDQ graph: activation parameters looked up by time step (`group=None`) or
    frozen at one group (a constant-scale graph ORT fuses itself). Pass order, declared once:
    DetachBias → QuantizeActivations → CancelBiasRoundTrip → (opset 21) → QuantizeWeights →
    BatchTimeProjections → TabulateTimeEmbedding (when the table says so) → NarrowConvAsPointwise (the
    float convs left)."""
    from .passes import (BatchTimeProjections, CompactNames, DetachBias, QuantizeActivations, QuantizeWeights,
                         TabulateTimeEmbedding)
    from .passes.graph_utils import prune_initializers
    from .passes.params import ConstantParams, LookupParams

    model = onnx.ModelProto()
    model.CopyFrom(marked)
    DetachBias()(model)
    params = LookupParams(model.graph, table) if group is None else ConstantParams(model.graph, table, group)
    QuantizeActivations(params)(model)
    CancelBiasRoundTrip()(model)
    model = to_opset(model)
    QuantizeWeights(table)(model)
    BatchTimeProjections()(model)
    if table.time_embedding_table:
        TabulateTimeEmbedding(table.num_train_timesteps, projections=table.time_projection_table)(model)
    NarrowConvAsPointwise()(model)
    prune_initializers(model.graph)
    CompactNames()(model)
    onnx.checker.check_model(model)
    return model


INT_FILE = "unet_int.onnx"


def build_int(qdq: onnx.ModelProto, standard_only: bool = False) -> onnx.ModelProto:
    """The integer-operator lowering of a QDQ graph (QLinearConv, MatMulIntegerToFloat; QLinearMatMul
    and no com.microsoft op when `standard_only`), its GroupNorms' affine in one kernel each."""
    from .passes import GroupNormAffine
    from .passes.lower_integer import LowerToInteger

    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    LowerToInteger(contrib_ops=not standard_only)(model)
    GroupNormAffine()(model)
    onnx.checker.check_model(model)
    return model


STATIC_GROUP_FILE = "unet_static_g{group:03d}.onnx"
SHARED_WEIGHTS = "static_groups.weights"


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """What `convert` builds. `correction`: "auto" fits the per-step ε correction on the integer graph
    and enables it when it helps on held-out trajectories, "on" enables it regardless, "off" fits none.
    `rounding`: "nearest" or "learned" integer weights (default: learned at 4 bits, nearest at 8).
    `method="static"` is the baseline ORT's quantize_static would give (K=1, min/max ranges,
    Conv/MatMul/Gemm including the first and last layer), exported through the same passes with
    constant scales (and saturation-safe weights, which cost no speed). `pipeline_graph` adds the
    one-call sampling graph (and its PNG variant when onnxruntime-extensions is installed);
    `mobile` ("arm" or "amd64") adds `.ort` copies of the integer (and static-group) graphs and the
    operator config of a reduced ONNX Runtime build."""
    bits: int = 8
    groups: int | None = None
    method: str = "mse"
    calibration: object = None            # qexport.calibrate.api.CalibrationConfig
    tables: str | Path | None = None      # reuse tables written by `qexport calibrate`
    static_groups: bool = False
    correction: str = "auto"
    rounding: str | None = None
    threads: int | None = None            # onnxruntime threads for the correction fit and probes
    pipeline_graph: bool = False
    mobile: str | None = None
    vae_bits: int = 8                     # text-to-image: VAE decoder static int8 (8; measured: FD and prompt
                                          # adherence unchanged, −0.7 dB, ×1.1–1.6 faster) or FP32 (32)

    def check(self) -> None:
        from ..errors import QexportError
        from .mobile import TARGETS

        if self.bits not in (4, 8):
            raise QexportError(f"--bits must be 4 or 8, got {self.bits}")
        if self.correction not in ("auto", "on", "off"):
            raise QexportError(f"--correction must be auto, on or off, got {self.correction!r}")
        if self.rounding not in (None, "nearest", "learned"):
            raise QexportError(f"--rounding must be nearest or learned, got {self.rounding!r}")
        if self.vae_bits not in (8, 32):
            raise QexportError(f"--vae-bits must be 8 or 32, got {self.vae_bits}")
        if self.mobile not in (None, *TARGETS):
            raise QexportError(f"--mobile must be one of {', '.join(TARGETS)}, got {self.mobile!r}")


class StageClock:
    """Wall seconds per named stage of a long job, logged as one line at the end."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.last
        self.last = now

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items() if v >= 0.5)
        return f"{time.perf_counter() - self.start:.0f} s ({parts})"


def convert(model_id: str, out: str | Path, config: ConvertConfig | None = None, *, overwrite: bool = False,
            allow_pickle: bool = False, progress: bool = True, **options) -> Path:
    """The main job: MODEL_ID → calibrated tables → artifact folder (FP32, QDQ, integer graphs, and
    what `config` adds). Keyword `options` override fields of `config` (see ConvertConfig)."""
    from tqdm import tqdm

    from ..calibrate.api import CalibrationConfig, calibrate
    from ..errors import QexportError
    from ..tables.build import TableConfig
    from ..tables.ranges import RangeConfig
    from ..tables.schema import QuantTable

    conf = dataclasses.replace(config or ConvertConfig(), **options)
    conf.check()
    bits, groups, method, tables, correction, threads = (conf.bits, conf.groups, conf.method, conf.tables,
                                                         conf.correction, conf.threads)
    rounding = conf.rounding or ("learned" if bits == 4 else "nearest")
    cfg = conf.calibration or CalibrationConfig()
    if method == "static":
        cfg = dataclasses.replace(cfg, table=TableConfig(groups=1, range=RangeConfig(method="minmax"), weight_bits=bits,
                                                         weight_mse=False, zero_point="per-group",
                                                         quantize_first_last=True, quantize_time_branch=True,
                                                         matmul_outputs="quantized"))
    else:
        tcfg = dataclasses.replace(cfg.table, weight_bits=bits, range=dataclasses.replace(cfg.table.range, method=method))
        if groups is not None:
            tcfg = dataclasses.replace(tcfg, groups=groups)
        cfg = dataclasses.replace(cfg, table=tcfg)
    model = load_model(model_id, allow_pickle=allow_pickle)  # bad input fails before any progress output
    if model.conditioned:
        unsupported = [f for f, on in (("--pipeline-graph", conf.pipeline_graph), ("--static-groups", conf.static_groups),
                                       ("--mobile", conf.mobile), ("--correction on", correction == "on")) if on]
        if unsupported:
            raise QexportError(f"{' and '.join(unsupported)} are not available for text-to-image pipelines yet; "
                               f"convert without them")
        correction = "off"   # the ε correction is fitted for unconditional sampling only
    if conf.pipeline_graph:   # refuse now what the pipeline graph cannot express, not after calibrating
        from .pipeline_graph import check_scheduler

        check_scheduler(model.scheduler_config)
    if Path(out).exists() and not overwrite:
        raise QexportError(f"output folder {out} already exists; pass --overwrite or choose another -o")
    stages = tqdm(total=5 + conf.static_groups + (correction != "off") + (rounding == "learned") + conf.pipeline_graph
                  + bool(conf.mobile),
                  desc="convert", disable=not progress)
    stages.update(1)
    clock = StageClock()
    if tables is not None:
        table = QuantTable.load(tables)
        if table.calibration.get("weights_sha256") != model.weights_sha256:
            raise QexportError(f"tables in {tables} were calibrated on other weights than {model_id}; recalibrate")
    else:
        table, _ = calibrate(model, cfg, progress=progress)
    clock.lap("calibration")
    stages.update(1)
    if rounding == "learned" and not table.weight_int:
        from ..calibrate.rounding import RoundingConfig, learn_weight_rounding

        ints = learn_weight_rounding(model, table, RoundingConfig(bits=(bits,)), progress=progress)
        table = dataclasses.replace(table, weight_int=ints)
        clock.lap("learned rounding")
        stages.update(1)
    with ArtifactWriter(out, overwrite=overwrite) as w, tempfile.TemporaryDirectory() as tmp:
        marked = marked_graph(model, Path(tmp))
        onnx.save(fp32_graph(marked), str(w.add(FP32_FILE, "fp32")))
        stages.update(1)
        qdq = build_qdq(marked, table, group=0 if method == "static" else None)
        onnx.save(qdq, str(w.add(QDQ_FILE, "qdq")))
        stages.update(1)
        integer = build_int(qdq, standard_only=table.standard_ops_only)
        onnx.save(integer, str(w.add(INT_FILE, "int")))
        clock.lap("export")
        guided = None
        if model.conditioned:
            from .text_artifact import probe_context

            guided = (probe_context(model), model.text.guidance)
        make_probes(w.dir / QDQ_FILE, w.dir / FP32_FILE, model.scheduler_config, model.sample_shape,
                    threads, guided=guided).save(w.add(PROBES_FILE, "probes"))
        clock.lap("probes")
        stages.update(1)
        extra = dict(tables=dict(sha256=table.digest(), sites=len(table.sites), method=table.method,
                                 zero_point=table.calibration.get("table", {}).get("zero_point"),
                                 weight_rounding="learned" if table.weight_int else "nearest"),
                     ops=dict(quantized=["Conv", "MatMul", "Gemm"], attention_matmuls=True,
                              split_concat_quantization=table.calibration.get("table", {}).get("split_concat", True),
                              float_modules=list(table.float_modules)),
                     saturation=dict(encoding="saturation-safe" if table.saturation_safe else "plain",
                                     **pair_report(integer)),
                     probes=dict(file=PROBES_FILE, reference="unet_qdq.onnx with ORT_DISABLE_ALL"))
        if model.conditioned:
            from .text_artifact import write_text_roles

            extra["text"] = write_text_roles(model, w, conf.vae_bits)
            clock.lap("text encoder and VAE")
            extra["correction"] = dict(enabled=False, reason="not fitted for text-conditioned U-Nets")
        if correction != "off":
            from ..zoo.cost import unet_ops

            fitted = fit_correction(w.dir / INT_FILE, w.dir / FP32_FILE, model.scheduler_config, model.sample_shape,
                                    threads=threads, progress=progress,
                                    gop=unet_ops(model.unet, model.sample_shape) / 1e9)
            if correction == "on":
                fitted = dataclasses.replace(fitted, enabled=True)
            fitted.save(w.add(CORRECTION_FILE, "correction"))
            extra["correction"] = dict(file=CORRECTION_FILE, enabled=fitted.enabled, **fitted.fit)
            clock.lap("ε correction")
            stages.update(1)
        if conf.static_groups:
            extra["static_groups"] = write_static_groups(marked, table, w)
            clock.lap("static groups")
            stages.update(1)
        if conf.pipeline_graph:
            enabled = fitted if correction != "off" and fitted.enabled else None
            extra["pipeline"] = write_pipeline_graphs(integer, model, enabled, w)
            clock.lap("pipeline graph")
            stages.update(1)
        if conf.mobile:
            extra["mobile"] = write_ort(w, conf.mobile)
            clock.lap("mobile")
            stages.update(1)
        table.save(w.dir)
        w.add("tables.json", "tables")
        w.add("tables.safetensors", "tables")
        w.finish(**manifest_fields(model, bits=dict(weights=bits, activations=table.act_bits), groups=table.groups,
                                   method=method, extra=extra))
        clock.lap("writing")
    stages.close()
    log.info("convert took %s", clock.summary())
    return Path(out)


def write_static_groups(marked: onnx.ModelProto, table, w: ArtifactWriter) -> dict:
    """One constant-scale QDQ graph per group (for NPUs that need constant scales); their integer
    weights are written once, to one external-data file all the graphs point into."""
    from .passes.external_data import SharedWeights

    shared = SharedWeights(w.dir / SHARED_WEIGHTS)
    files = {}
    for g in range(table.groups):
        name = STATIC_GROUP_FILE.format(group=g)
        model = build_qdq(marked, table, group=g)
        shared.externalize(model)
        onnx.save(model, str(w.add(name, "static-group")))
        files[name] = g
    shared.close()
    w.add(SHARED_WEIGHTS, "weights")
    return dict(files=files, group_of_t_in="tables.safetensors", shared_weights=SHARED_WEIGHTS)


def write_pipeline_graphs(integer: onnx.ModelProto, model: LoadedModel, correction, w: ArtifactWriter) -> dict:
    """The one-call sampling graph around the integer U-Net, and its PNG variant when
    onnxruntime-extensions is importable (manifest roles `pipeline`, `pipeline-png`)."""
    from importlib.util import find_spec

    from .pipeline_graph import PIPELINE_FILE, PIPELINE_PNG_FILE, PipelineSpec, build_pipeline_graph, io_spec

    info = {}
    variants = [(PIPELINE_FILE, "pipeline", False)]
    if find_spec("onnxruntime_extensions") is not None:
        variants.append((PIPELINE_PNG_FILE, "pipeline-png", True))
    else:
        log.warning("onnxruntime-extensions is not installed: writing %s without the PNG variant", PIPELINE_FILE)
    for name, role, png in variants:
        spec = PipelineSpec(model.scheduler_config, tuple(model.sample_shape), correction, png=png)
        graph = build_pipeline_graph(integer, spec)
        onnx.save(graph, str(w.add(name, role)))
        inputs, outputs = io_spec(model.sample_shape, png)
        info[name] = dict(role=role, scheduler="ddim", eta=0.0, unet="unet_int.onnx",
                          correction=correction is not None, inputs=inputs, outputs=outputs,
                          custom_ops="onnxruntime-extensions" if png else None)
    return info


def write_ort(w: ArtifactWriter, target: str) -> dict:
    """`.ort` copies of the integer and static-group graphs plus their operator config (roles `ort`,
    `static-group-ort`, `ort-config`)."""
    from .mobile import LEVEL, to_ort

    m = w.roles
    graphs = [w.dir / n for n, role in m.items() if role in ("int", "static-group")]
    extra = [w.dir / SHARED_WEIGHTS] if (w.dir / SHARED_WEIGHTS).exists() else []
    written, config = to_ort(graphs, w.dir, target, extra)
    for g, ort_path in zip(graphs, written):
        w.add(ort_path.name, "ort" if m[g.name] == "int" else "static-group-ort")
    w.add(config.name, "ort-config")
    return dict(target=target, optimization_level=LEVEL, style="Fixed", files=[p.name for p in written],
                config=config.name)
