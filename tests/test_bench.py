"""`qexport bench` / `python -m qexport_runtime bench`: the table and the JSON report's fields.
(Timings are never asserted: the machine is shared and noisy; see benchmarks/.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIELDS = {"name", "file", "role", "step_ms_median", "step_ms_p90", "image_ms", "load_ms", "peak_rss_mb", "bytes",
          "speedup_vs_fp32", "threads_used", "shards"}


@pytest.fixture(scope="module")
def small_artifact(tiny_pipeline_dir, tmp_path_factory):
    pytest.importorskip("torch", reason="building the artifact needs the toolchain extra")
    from qexport.calibrate.api import CalibrationConfig
    from qexport.calibrate.sources import SourceConfig
    from qexport.export.pipeline import convert

    return convert(str(tiny_pipeline_dir), tmp_path_factory.mktemp("b") / "art",
                   calibration=CalibrationConfig(source=SourceConfig(steps=10, samples=40, trajectories=4)),
                   progress=False)


@pytest.mark.parametrize("entry", [["-m", "qexport.cli.main", "bench"], ["-m", "qexport_runtime", "bench"]])
def test_bench_writes_table_and_json(small_artifact, tmp_path, entry):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, *entry, str(small_artifact), "--steps", "4", "--batch", "2", "--threads", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step ms" in r.stdout and "x fp32" in r.stdout
    report = json.loads(out.read_text())
    assert {"cpu", "arch", "cores", "onnxruntime", "isa", "int8_kernel_path"} <= set(report["machine"])
    assert "int8 path x86_64" in r.stdout or "int8 path arm64" in r.stdout
    roles = [row["role"] for row in report["results"]]
    assert roles == ["int", "fp32", "fp32"]
    assert [row["optimization"] for row in report["results"]] == ["extended", "extended", "all"]
    for row in report["results"]:
        assert FIELDS <= set(row)
        assert row["step_ms_median"] > 0 and row["peak_rss_mb"] > 10 and row["bytes"] > 0
        assert row["threads_used"] == 1 and row["shards"] == 1   # --threads 1 is kept, not re-chosen
    fp32 = [row for row in report["results"] if row["role"] == "fp32"]   # × FP32 is against the faster of the two
    assert max(row["speedup_vs_fp32"] for row in fp32) == pytest.approx(1.0)
    assert min(row["speedup_vs_fp32"] for row in fp32) <= 1.0 and all(row["check"] is None for row in fp32)
    int_row = next(row for row in report["results"] if row["role"] == "int")
    assert int_row["check"]["ok"] and len(int_row["check"]["excess"]) == 5   # the load-time self-check ran


def test_unet_ops_equals_torch_flop_counter(tiny_pipeline_dir):
    """benchmarks/common.py counts 2 × MAC of Conv/Linear/attention matmuls; torch's FlopCounterMode
    must agree (the count once doubled itself by including install_taps' probing forward pass)."""
    torch = pytest.importorskip("torch", reason="needs the toolchain extra")
    from pathlib import Path

    from torch.utils.flop_counter import FlopCounterMode

    from qexport.zoo.loading import load_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import unet_ops

    model = load_model(str(tiny_pipeline_dir))
    ops = unet_ops(model.unet, model.sample_shape)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.unet(torch.zeros(1, *model.sample_shape), torch.tensor([500]))
    assert ops == pytest.approx(fc.get_total_flops(), rel=1e-9)


def test_session_options_pins_glibc_mmap_threshold():
    """The runtime's first session_options() fixes malloc's mmap threshold, so weights onnxruntime frees
    after prepacking leave the process (peak RSS, benchmarks/bench_export.py); a fresh process, since the
    setting is per process."""
    import platform
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip(f"mallopt is glibc's; this is {platform.system()} {platform.libc_ver()[0] or 'without glibc'}")
    code = ("from qexport_runtime import session as s; info = s.pin_mmap_threshold.cache_info; "
            "assert info().currsize == 0, info(); s.session_options(1); assert info().currsize == 1, info(); "
            "assert s.pin_mmap_threshold() is True; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-1000:]


def test_time_projection_variants_compute_the_default_projection(small_artifact):
    """benchmarks/bench_time_projections.py: the per-t table and the 8-bit MatMulNBits rebuild the
    default graph's time projection (the table's row t, not a neighbour's; the 8-bit weights within
    their block quantization), so the benchmark compares like with like."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_time_projections import _projection, matmul_nbits8, per_t_table

    manifest = json.loads((small_artifact / "manifest.json").read_text())
    shape = tuple(manifest["sample_shape"])
    default = onnx.load(str(small_artifact / "unet_int.onnx"))
    name = _projection(default)[0].output[0]

    def projection(model, t):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return s.run([name], {"sample": np.zeros((1, *shape), np.float32), "timestep": np.array([t], np.int64)})[0]

    table, nbits = per_t_table(default, manifest["num_train_timesteps"], shape), matmul_nbits8(default)
    assert not any(n.op_type == "Gemm" and n.output[0] == name for n in [*table.graph.node, *nbits.graph.node])
    for t in (0, 1, 517, manifest["num_train_timesteps"] - 1):
        ref = projection(default, t)
        scale = np.abs(ref).max()
        assert np.abs(projection(table, t) - ref).max() <= 1e-3 * scale
        assert np.abs(projection(nbits, t) - ref).max() <= 2e-2 * scale
    assert np.abs(projection(table, 517) - projection(default, 518)).max() > 1e-3 * np.abs(projection(default, 517)).max()


def test_peak_is_the_best_round_of_the_faster_probe():
    """The "% of peak" denominator: each probe at its fastest round, the peak per number type the faster
    of its matmul and convolution (a busy round or a slow kernel shape cannot make a graph exceed it)."""
    from qexport.eval.efficiency import gemm_probes, peak_of

    probes = gemm_probes(1, n=64)
    assert set(probes) == {"int8_matmul", "int8_conv", "fp32_matmul", "fp32_conv"}
    for call, ops in probes.values():
        call()
        assert ops > 0
    fake = {k: (None, 1e9) for k in probes}
    times = {"int8_matmul": [0.5, 0.25, 2.0], "int8_conv": [0.2, 0.4], "fp32_matmul": [1.0], "fp32_conv": [2.0, 4.0]}
    peak = peak_of(fake, times)
    assert peak["int8_matmul_gops"] == 4.0 and peak["int8_conv_gops"] == 5.0 and peak["int8_gops"] == 5.0
    assert peak["fp32_gops"] == 1.0


def test_wait_policy_benchmark_times_both_policies_and_restores_the_environment(tiny_artifact, tmp_path, monkeypatch):
    """benchmarks/bench_wait_policy.py: one session per policy per graph (its options really spin or not),
    every graph timed under both, idle and beside a busy process; the caller's policy is left as it was."""
    monkeypatch.delenv("QEXPORT_WAIT_POLICY", raising=False)
    out = tmp_path / "res"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "benchmarks" / "bench_wait_policy.py"), f"{tiny_artifact}:int,fp32",
                    "--batch", "1", "2", "--rounds", "2", "--busy-rounds", "1", "--out", str(out), "--tag", "_t"],
                   check=True, capture_output=True, text=True)
    r = json.loads((out / "wait_policy_t.json").read_text())
    names = [g["name"] for g in r["graphs"]]
    assert len(names) == 2 and set(r["idle"]) == {"1", "2"} and set(r["busy"]) == {"1"}
    for times in [*r["idle"].values(), *r["busy"].values()]:
        assert set(times) == {f"{n}|{p}" for n in names for p in ("passive", "active")}
        assert all(v > 0 for v in times.values())
    assert set(r["cpu_between_calls"]) == {"passive", "active"}
    md = (out / "wait_policy_t.md").read_text()
    assert md.count("| idle |") == 4 and md.count("| busy |") == 2

    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import bench_wait_policy as bw
    finally:
        sys.path.remove(str(root / "benchmarks"))
    made = bw.sessions(bw.graphs([f"{tiny_artifact}:int"]), threads=2)
    spin = {p: s.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
            for (_, p), s in made.items()}
    assert spin == {"passive": "0", "active": "1"}
    assert "QEXPORT_WAIT_POLICY" not in os.environ


def test_export_bench_relowers_with_exactly_one_change(small_artifact, tmp_path):
    """benchmarks/bench_export.py's one-change graphs: without GroupNormAffine the γ/β stay Mul → Add,
    the static graph with it alone gains BatchNormalizations but no integer op, and every one of them
    computes what the default integer graph computes."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_export import relowered

    qdq = small_artifact / "unet_qdq.onnx"
    ops = lambda p: [n.op_type for n in onnx.load(str(p)).graph.node]  # noqa: E731
    default, no_affine = small_artifact / "unet_int.onnx", relowered(qdq, tmp_path / "a.onnx", affine=False)
    qdq_affine = relowered(qdq, tmp_path / "b.onnx", lower=False)
    assert "BatchNormalization" in ops(default) and "BatchNormalization" not in ops(no_affine)
    assert "QLinearConv" in ops(no_affine) and "QLinearConv" not in ops(qdq_affine)
    assert ops(qdq_affine).count("BatchNormalization") == ops(default).count("BatchNormalization") > 0
    manifest = json.loads((small_artifact / "manifest.json").read_text())
    x = np.random.default_rng(0).standard_normal((2, *manifest["sample_shape"])).astype(np.float32)
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {"sample": x, "timestep": np.array([400], np.int64)})[0]
    ref = run(default)
    np.testing.assert_allclose(run(no_affine), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(qdq_affine), run(qdq), rtol=1e-5, atol=1e-5)


def test_convert_bench_reads_the_stage_line_convert_logs(tmp_path):
    """benchmarks/bench_convert.py parses the one-line stage summary that `convert` logs (StageClock):
    if that line's format changes, the bench must not silently report no stages."""
    from qexport.export.pipeline import StageClock

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import bench_convert as bc
    finally:
        sys.path.remove(str(root / "benchmarks"))
    clock = StageClock()
    clock.seconds = {"calibration": 218.4, "export": 25.2, "probes": 0.2, "ε correction": 75.0}
    log = tmp_path / "convert.log"
    log.write_text(f"wrote x\nconvert took {clock.summary()}\nmore\n")
    assert bc.stages(log) == {"calibration": 218.0, "export": 25.0, "ε correction": 75.0}
    log.write_text("no summary\n")
    assert bc.stages(log) == {}
