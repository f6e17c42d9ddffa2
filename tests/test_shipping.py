"""Shipping into apps: `.ort` copies and their operator config, and the one-call pipeline graph
(same pixels as the Python sampler, PNG bytes that decode to them)."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="building the artifact needs the toolchain extra")
onnx = pytest.importorskip("onnx")
import onnxruntime as ort  # noqa: E402

from qexport.calibrate.api import CalibrationConfig  # noqa: E402
from qexport.calibrate.sources import SourceConfig  # noqa: E402
from qexport.export.mobile import config_ops  # noqa: E402
from qexport.export.pipeline import ConvertConfig, convert  # noqa: E402
from qexport_runtime.artifact import load_artifact  # noqa: E402
from qexport_runtime.images import to_uint8  # noqa: E402
from qexport_runtime.pipeline import PipelineSession  # noqa: E402
from qexport_runtime.sampler import Sampler  # noqa: E402
from qexport_runtime.session import UNetSession, session_options  # noqa: E402

CAL = CalibrationConfig(source=SourceConfig(steps=10, samples=40, trajectories=4))


@pytest.fixture(scope="module")
def shipped_art(tiny_pipeline_dir, tmp_path_factory):
    """The tiny U-Net with everything an app needs: ε correction on, static groups, .ort (arm), pipeline graphs."""
    conf = ConvertConfig(calibration=CAL, correction="on", static_groups=True, pipeline_graph=True, mobile="arm",
                         groups=2)
    return load_artifact(convert(str(tiny_pipeline_dir), tmp_path_factory.mktemp("ship") / "art", conf,
                                 progress=False))


def test_manifest_lists_ort_pipeline_and_config_files(shipped_art):
    roles = {e.role for e in shipped_art.manifest.files.values()}
    assert {"ort", "static-group-ort", "ort-config", "pipeline", "pipeline-png"} <= roles
    extra = shipped_art.manifest.extra
    assert extra["mobile"]["target"] == "arm" and "unet_int.ort" in extra["mobile"]["files"]
    pl = extra["pipeline"]["pipeline.onnx"]
    assert [i["name"] for i in pl["inputs"]] == ["noise", "steps"] and pl["outputs"][0]["name"] == "image"
    assert pl["correction"] is True


@pytest.mark.parametrize("t", [999, 500, 20])
def test_ort_files_give_the_onnx_graphs_outputs(shipped_art, t):
    m = shipped_art.manifest
    x = np.random.default_rng(t).standard_normal((2, *m.sample_shape)).astype(np.float32)
    pairs = [("unet_int.onnx", "unet_int.ort"), ("unet_static_g000.onnx", "unet_static_g000.ort")]
    for onnx_name, ort_name in pairs:
        ref = UNetSession(shipped_art.path / onnx_name, threads=1)(x, t).copy()
        got = UNetSession(shipped_art.path / ort_name, threads=1, trusted=True)(x, t)
        np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=f"{ort_name} differs from {onnx_name}")


def _ops_after_optimization(path, tmp_path) -> dict[str, set]:
    """Operators of the graph onnxruntime runs (extended level, ARM int8 QDQ kept), subgraphs included."""
    so = session_options(1)
    so.add_session_config_entry("session.qdqisint8allowed", "1")
    out = tmp_path / (path.stem + ".opt.onnx")
    so.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops: dict[str, set] = {}
    for n in onnx.load(str(out), load_external_data=False).graph.node:
        ops.setdefault(n.domain or "ai.onnx", set()).add(n.op_type)
    return ops


def test_operator_config_lists_exactly_the_operators_the_ort_files_use(shipped_art, tmp_path):
    config = shipped_art.path / shipped_art.manifest.files_with_role("ort-config")[0]
    listed = config_ops(config)
    used: dict[str, set] = {}
    for name in ["unet_int.onnx"] + shipped_art.manifest.files_with_role("static-group"):
        for domain, ops in _ops_after_optimization(shipped_art.path / name, tmp_path).items():
            used.setdefault(domain, set()).update(ops)
    assert listed == used
    assert "QLinearConv" in listed["ai.onnx"]
    assert str(tmp_path) not in config.read_text() and "/tmp" not in config.read_text()


@pytest.mark.parametrize("steps,batch", [(20, 2), (7, 1), (1, 1)])
def test_pipeline_graph_gives_the_samplers_pixels(shipped_art, steps, batch):
    ref = Sampler(shipped_art, threads=1, check=False).sample(steps, batch=batch, seed=3)
    assert Sampler(shipped_art, threads=1, check=False).correction is not None  # the correction is in play
    got = PipelineSession(shipped_art, threads=1).generate(steps, batch=batch, seed=3)
    assert got.images.dtype == np.uint8 and got.images.shape == (batch, *to_uint8(ref.images).shape[1:])
    np.testing.assert_array_equal(got.images, to_uint8(ref.images))


def test_pipeline_graph_without_correction_differs_when_the_artifact_corrects(shipped_art):
    """The correction really acts inside the graph: the sampler without it gives other pixels."""
    plain = Sampler(shipped_art, threads=1, check=False, correction=False).sample(20, batch=2, seed=3)
    got = PipelineSession(shipped_art, threads=1).generate(20, batch=2, seed=3)
    assert np.any(got.images != to_uint8(plain.images))


def test_png_output_decodes_to_the_first_image(shipped_art):
    from PIL import Image

    got = PipelineSession(shipped_art, png=True, threads=1).generate(12, batch=3, seed=5)
    assert got.png[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = np.asarray(Image.open(io.BytesIO(got.png)).convert("RGB"))
    first = got.images[0]
    np.testing.assert_array_equal(decoded, np.repeat(first, 3, axis=2) if first.shape[2] == 1 else first)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_in_graph_time_steps_follow_the_schedulers_spacing(spacing):
    """The Loop's time-step rule against qexport_runtime's spaced_timesteps, for many step counts."""
    from onnx import TensorProto, helper

    from qexport.export.pipeline_graph import _Builder, _timestep
    from qexport_runtime.schedulers.base import spaced_timesteps
    from qexport_runtime.schedulers.ddim import DDIMConfig

    cfg = DDIMConfig(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    b = _Builder("t")
    ratio = b.op("Div", [b.const("T", np.int64(1000)), "n"])
    t = _timestep(b, cfg, "i", "n", ratio)
    b.op("Identity", [t], "t_out")
    g = helper.make_graph(b.nodes, "t", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                                         helper.make_tensor_value_info("n", TensorProto.INT64, [])],
                          [helper.make_tensor_value_info("t_out", TensorProto.INT64, [])], initializer=b.inits)
    s = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString())
    for n in (1, 2, 3, 7, 20, 50, 333, 999, 1000):
        got = [int(s.run(None, {"i": np.array(i, np.int64), "n": np.array(n, np.int64)})[0]) for i in range(n)]
        assert got == spaced_timesteps(cfg, n).tolist(), f"{spacing}, {n} steps"


def test_generate_cli_and_bad_step_count(shipped_art, tmp_path):
    r = subprocess.run([sys.executable, "-m", "qexport_runtime", "generate", str(shipped_art.path), "--steps", "5",
                        "--batch", "2", "--png", "-o", str(tmp_path / "g")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "g" / "generate.json").read_text())
    assert summary["graph"] == "pipeline_png.onnx" and (tmp_path / "g" / "image0.png").stat().st_size > 0
    assert np.load(tmp_path / "g" / "images.npy").shape[0] == 2
    r = subprocess.run([sys.executable, "-m", "qexport_runtime", "generate", str(shipped_art.path), "--steps", "0",
                        "-o", str(tmp_path / "bad")], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "steps must be in" in r.stderr


def test_artifact_without_pipeline_graph_says_how_to_get_one(tiny_artifact):
    from qexport_runtime.artifact import ArtifactError

    with pytest.raises(ArtifactError, match="--pipeline-graph"):
        PipelineSession(load_artifact(tiny_artifact))


def test_pipeline_graph_refuses_unsupported_models_before_calibrating(tiny_pipeline_dir, tmp_path):
    import shutil
    import time

    from qexport.errors import QexportError

    src = tmp_path / "vpred"
    shutil.copytree(tiny_pipeline_dir, src)
    cfg_path = src / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "prediction_type": "v_prediction"}))
    t0 = time.perf_counter()
    with pytest.raises(QexportError, match="the pipeline graph supports prediction_type 'epsilon'"):
        convert(str(src), tmp_path / "out", pipeline_graph=True, progress=False)
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "out").exists()
    with pytest.raises(QexportError, match="--mobile must be one of"):
        convert(str(tiny_pipeline_dir), tmp_path / "out2", mobile="ios", progress=False)
