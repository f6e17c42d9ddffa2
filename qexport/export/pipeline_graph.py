"""The one-call generation graph: the whole DDIM sampling loop in one ONNX `Loop`, noise in, image out.

`build_pipeline_graph(unet, spec)` wraps a U-Net graph (the artifact's integer graph) as the body of a
`Loop` that runs `steps` times: time step from the iteration number (the scheduler's spacing rule,
so any step count works), ε from the U-Net, the artifact's ε correction when it is enabled, and the
deterministic DDIM update (η = 0). Inputs `noise` float32 [batch, C, H, W] (the initial x_T) and
`steps` int64 [1]; output `image` uint8 [batch, H, W, C] — with `png=True` also `png`, the PNG bytes
of the first image, from onnxruntime-extensions' `EncodeImage`.

The arithmetic follows qexport_runtime's numpy sampler operation by operation in float32, with the
per-time-step scalars tabulated by the same numpy expressions, so the graph gives the sampler's
pixels. The U-Net's initializers are the body's own (constant there, so onnxruntime prepacks the
integer weights as in the U-Net graph); the file is the U-Net graph plus a few kilobytes of tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qexport_runtime.correction import Correction
from qexport_runtime.schedulers.base import alphas_cumprod
from qexport_runtime.schedulers.ddim import DDIMConfig

PIPELINE_FILE = "pipeline.onnx"
PIPELINE_PNG_FILE = "pipeline_png.onnx"
EXTENSIONS_DOMAIN = "com.microsoft.extensions"


@dataclass(frozen=True)
class PipelineSpec:
    """What the loop needs besides the U-Net: scheduler config, sample shape, the ε correction."""
    scheduler: dict
    sample_shape: tuple[int, int, int]
    correction: Correction | None = None   # applied when given (pass the artifact's only when enabled)
    png: bool = False


def io_spec(sample_shape, png: bool) -> tuple[list, list]:
    """Inputs and outputs of the pipeline graph as the manifest declares them."""
    c, h, w = sample_shape
    inputs = [dict(name="noise", dtype="float32", shape=["batch", c, h, w], doc="initial x_T, standard normal"),
              dict(name="steps", dtype="int64", shape=[1], doc="number of DDIM steps, 1 … num_train_timesteps")]
    outputs = [dict(name="image", dtype="uint8", shape=["batch", h, w, c], doc="x_0 mapped from [-1, 1] to 0 … 255")]
    if png:
        outputs.append(dict(name="png", dtype="uint8", shape=["bytes"], doc="PNG file of image 0 (RGB)"))
    return inputs, outputs


def step_tables(cfg: DDIMConfig) -> dict[str, np.ndarray]:
    """Per-time-step float32 scalars of the DDIM update, computed with the runtime sampler's expressions.

    `sqrt_beta[t]`, `sqrt_alpha[t]` index by t; `sqrt_alpha_prev[j]`, `direction[j]` by j = prev + 1
    (j = 0: prev < 0, the final ᾱ)."""
    ac = alphas_cumprod(cfg)
    final = np.float32(1.0) if cfg.set_alpha_to_one else ac[0]
    sqrt_beta = np.array([(1 - a) ** 0.5 for a in ac], np.float32)
    sqrt_alpha = np.array([a ** 0.5 for a in ac], np.float32)
    prev = [final] + list(ac)
    std = np.float32(0.0)   # η = 0: σ_t = 0 · variance ** 0.5
    sqrt_alpha_prev = np.array([a ** 0.5 for a in prev], np.float32)
    direction = np.array([(1 - a - std ** 2) ** 0.5 for a in prev], np.float32)
    return dict(sqrt_beta=sqrt_beta, sqrt_alpha=sqrt_alpha, sqrt_alpha_prev=sqrt_alpha_prev, direction=direction)


def correction_tables(corr: Correction, num_train_timesteps: int) -> dict[str, np.ndarray]:
    """b_t [T, C] and (1 + k_t) [T] for every t, as Correction.apply computes them."""
    bias, scale = [], []
    for t in range(num_train_timesteps):
        k, b, _ = corr.at(t)
        bias.append(b)
        scale.append(np.float32(1.0 + k))
    return dict(corr_bias=np.stack(bias).astype(np.float32), corr_scale=np.array(scale, np.float32))


class _Builder:
    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.inits = prefix, [], []

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), f"pl/{name}"))
        return f"pl/{name}"

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or f"{self.prefix}/{op_type.lower()}{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{self.prefix}/n{len(self.nodes)}", **attrs))
        return out


def _timestep(b: _Builder, cfg: DDIMConfig, i: str, n: str, ratio: str) -> str:
    """Raw time step (int64 scalar) of iteration i of n under the scheduler's spacing (spaced_timesteps)."""
    T = cfg.num_train_timesteps
    k = b.op("Sub", [b.op("Sub", [n, b.const("one", np.int64(1))]), i])       # n − 1 − i
    if cfg.timestep_spacing == "leading":
        return b.op("Add", [b.op("Mul", [k, ratio]), b.const("offset", np.int64(cfg.steps_offset))])
    if cfg.timestep_spacing == "linspace":   # round(linspace(0, T − 1, n))[::-1]: k · ((T − 1) / (n − 1))
        denom = b.op("Cast", [b.op("Max", [b.op("Sub", [n, b.const("one_l", np.int64(1))]),
                                           b.const("one_m", np.int64(1))])], to=TensorProto.DOUBLE)
        step = b.op("Div", [b.const("t_minus_1", np.float64(T - 1)), denom])
        v = b.op("Mul", [b.op("Cast", [k], to=TensorProto.DOUBLE), step])
        return b.op("Cast", [b.op("Round", [v])], to=TensorProto.INT64)
    if cfg.timestep_spacing == "trailing":   # round(arange(T, 0, −T / n)) − 1: T + i · (−T / n)
        step = b.op("Div", [b.const("minus_t", np.float64(-T)), b.op("Cast", [n], to=TensorProto.DOUBLE)])
        v = b.op("Add", [b.const("t_d", np.float64(T)), b.op("Mul", [b.op("Cast", [i], to=TensorProto.DOUBLE), step])])
        return b.op("Sub", [b.op("Cast", [b.op("Round", [v])], to=TensorProto.INT64), b.const("one_t", np.int64(1))])
    raise ValueError(f"timestep_spacing {cfg.timestep_spacing!r} is not supported by the pipeline graph")


def check_scheduler(scheduler: dict) -> DDIMConfig:
    """The DDIM config of `scheduler`, or a QexportError naming what the pipeline graph cannot run."""
    from ..errors import QexportError

    cfg = DDIMConfig.from_config(scheduler)
    if cfg.prediction_type != "epsilon":
        raise QexportError(f"the pipeline graph supports prediction_type 'epsilon', this model predicts "
                           f"{cfg.prediction_type!r}; convert without --pipeline-graph")
    if cfg.timestep_spacing not in ("leading", "linspace", "trailing"):
        raise QexportError(f"the pipeline graph supports timestep_spacing leading, linspace or trailing, not "
                           f"{cfg.timestep_spacing!r}; convert without --pipeline-graph")
    return cfg


def build_pipeline_graph(unet: onnx.ModelProto, spec: PipelineSpec) -> onnx.ModelProto:
    """The Loop graph around `unet` (inputs `sample`, `timestep`; output `noise_pred`)."""
    cfg = check_scheduler(spec.scheduler)
    T = cfg.num_train_timesteps
    c, h, w = spec.sample_shape
    outer, body = _Builder("pl"), _Builder("body")
    tabs = step_tables(cfg)
    if spec.correction is not None:
        tabs.update(correction_tables(spec.correction, T))
    for k, v in tabs.items():
        outer.const(k, v)

    # outer graph: n = steps as a scalar, ratio = T // n (DDIM's step between time steps)
    n = outer.op("Reshape", ["steps", outer.const("scalar", np.array([], np.int64))], "pl/n")
    ratio = outer.op("Div", [outer.const("T", np.int64(T)), n], "pl/ratio")

    # loop body: (i, cond, x) → (cond, x_prev)
    t = _timestep(body, cfg, "i", n, ratio)
    t1 = body.op("Reshape", [t, body.const("shape1", np.array([1], np.int64))])
    rename = {"sample": "x", "timestep": t1, unet.graph.output[0].name: "eps_raw"}
    unet_nodes = []
    for node in unet.graph.node:
        nn = onnx.NodeProto()
        nn.CopyFrom(node)
        for j, name in enumerate(nn.input):
            nn.input[j] = rename.get(name, name)
        for j, name in enumerate(nn.output):
            nn.output[j] = rename.get(name, name)
        unet_nodes.append(nn)
    body.nodes.extend(unet_nodes)
    eps = "eps_raw"
    if spec.correction is not None:   # ε̂ = (ε − b_t) / (1 + k_t)
        b_t = body.op("Reshape", [body.op("Gather", ["pl/corr_bias", t], axis=0),
                                  body.const("bias_shape", np.array([1, c, 1, 1], np.int64))])
        eps = body.op("Div", [body.op("Sub", [eps, b_t]), body.op("Gather", ["pl/corr_scale", t], axis=0)])
    prev = body.op("Sub", [t, ratio])
    j = body.op("Add", [body.op("Max", [prev, body.const("minus1", np.int64(-1))]), body.const("one_j", np.int64(1))])
    sb, sa = (body.op("Gather", [f"pl/{k}", t], axis=0) for k in ("sqrt_beta", "sqrt_alpha"))
    sap, dc = (body.op("Gather", [f"pl/{k}", j], axis=0) for k in ("sqrt_alpha_prev", "direction"))
    x0 = body.op("Div", [body.op("Sub", ["x", body.op("Mul", [sb, eps])]), sa])
    if cfg.clip_sample:
        r = cfg.clip_sample_range
        x0 = body.op("Clip", [x0, body.const("lo", np.float32(-r)), body.const("hi", np.float32(r))])
    body.op("Add", [body.op("Mul", [sap, x0]), body.op("Mul", [dc, eps])], "x_out")
    body.op("Identity", ["cond"], "cond_out")
    sample_t = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", c, h, w])
    body_graph = helper.make_graph(
        body.nodes, "ddim_step",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []), sample_t],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, ["batch", c, h, w])],
        initializer=list(unet.graph.initializer) + body.inits)

    outer.nodes.append(helper.make_node("Loop", [n, "", "noise"], ["x_0"], name="pl/loop", body=body_graph))
    # image = uint8(clip((x + 1) · 127.5 + 0.5, 0, 255)) as [batch, H, W, C] (runtime.images.to_uint8)
    v = outer.op("Add", [outer.op("Mul", [outer.op("Add", ["x_0", outer.const("f1", np.float32(1.0))]),
                                          outer.const("f127", np.float32(127.5))]), outer.const("f05", np.float32(0.5))])
    v = outer.op("Floor", [outer.op("Clip", [v, outer.const("f0", np.float32(0.0)), outer.const("f255", np.float32(255.0))])])
    outer.op("Transpose", [outer.op("Cast", [v], to=TensorProto.UINT8)], "image", perm=[0, 2, 3, 1])
    outputs = [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", h, w, c])]
    opsets = [helper.make_opsetid(o.domain, o.version) for o in unet.opset_import]
    if spec.png:
        first = outer.op("Gather", ["image", outer.const("zero", np.int64(0))], axis=0)      # [H, W, C]
        rgb = first if c == 3 else outer.op("Expand", [first, outer.const("rgb_shape", np.array([h, w, 3], np.int64))])
        outer.nodes.append(helper.make_node("EncodeImage", [rgb], ["png"], name="pl/png", domain=EXTENSIONS_DOMAIN,
                                            format="png", color_space="rgb"))
        outputs.append(helper.make_tensor_value_info("png", TensorProto.UINT8, ["bytes"]))
        opsets.append(helper.make_opsetid(EXTENSIONS_DOMAIN, 1))
    if spec.png and c not in (1, 3):
        raise ValueError(f"PNG output needs 1 or 3 channels, the model has {c}")
    graph = helper.make_graph(
        outer.nodes, "qexport_pipeline",
        [helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["batch", c, h, w]),
         helper.make_tensor_value_info("steps", TensorProto.INT64, [1])],
        outputs, initializer=outer.inits)
    model = helper.make_model(graph, opset_imports=opsets, producer_name="qexport")
    model.ir_version = unet.ir_version
    return model
