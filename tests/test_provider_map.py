"""The execution-provider map (benchmarks/provider_map.py): a verdict per graph file, and its claims where checkable here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "provider_map.py"


def load_script():
    spec = importlib.util.spec_from_file_location("provider_map", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("provider_map", mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def static_artifact(tiny_pipeline_dir, tiny_artifact, tmp_path_factory) -> Path:
    """The tiny artifact again, from its own tables (no calibration), with the --static-groups graphs."""
    pytest.importorskip("onnx", reason="reading graphs needs onnx (toolchain extra)")
    from qexport.export.pipeline import convert

    return convert(str(tiny_pipeline_dir), tmp_path_factory.mktemp("tiny-static") / "art", tables=tiny_artifact,
                   static_groups=True, correction="off", progress=False)


@pytest.fixture(scope="module")
def pmap(static_artifact, tmp_path_factory):
    mod = load_script()
    res = mod.build_map(static_artifact, progress=False)
    js, md = mod.write_results(res, tmp_path_factory.mktemp("pm"))
    return res, json.loads(js.read_text()), md.read_text()


def test_every_graph_file_has_a_checker_verdict(pmap, static_artifact):
    res, saved, md = pmap
    manifest = json.loads((static_artifact / "manifest.json").read_text())
    graphs = [n for n in manifest["files"] if n.endswith(".onnx")]
    assert {"unet_fp32.onnx", "unet_qdq.onnx", "unet_int.onnx"} <= set(graphs)
    assert any(n.startswith("unet_static_g") for n in graphs)
    assert set(graphs) <= set(saved["files"])
    for name in graphs:
        eps = saved["files"][name]["checker"].get("eps")
        assert eps and set(eps) == {"NNAPI", "CoreML NeuralNetwork", "CoreML MLProgram"}, name
        for ep, v in eps.items():
            assert v["verdict"] in ("YES", "MAYBE", "NO"), (name, ep, v)
            assert v["as_is"]["nodes"] > 0, (name, ep)
        assert saved["files"][name]["checker"]["recommendation"], name
        assert f"`{name}`" in md
    assert "CPUExecutionProvider" in saved["available_providers"]


def test_int_graph_runs_integer_kernels_on_cpu(pmap):
    res, _, _ = pmap
    cpu = res["files"]["unet_int.onnx"]["cpu"]
    assert cpu["integer_kernels"].get("QLinearConv", 0) > 0, cpu["kernels"]
    assert cpu["integer_kernels"].get("MatMulIntegerToFloat", 0) > 0, cpu["kernels"]   # Linear and attention products
    assert set(cpu["providers"]) == {"CPUExecutionProvider"}
    assert not res["files"]["unet_fp32.onnx"]["cpu"]["integer_kernels"]


def test_static_group_scales_are_constant_and_int_scales_are_not(pmap):
    res, _, _ = pmap
    static = [e for e in res["files"].values() if e["role"] == "static-group"]
    assert static
    for e in static:
        f = e["facts"]
        assert f["constant_scales"] and set(f["scales"]) == {"initializer"}, f["scales"]
        assert set(f["zero_points"]) <= {"initializer"}
    for name in ("unet_int.onnx", "unet_qdq.onnx"):
        f = res["files"][name]["facts"]
        assert not f["constant_scales"] and f["scales"].get("computed", 0) > 0, (name, f["scales"])
        assert res["files"][name]["xnnpack"].startswith("no: scales are computed")


def test_static_group_graphs_share_one_checked_structure(pmap):
    res, _, _ = pmap
    static = sorted(n for n, e in res["files"].items() if e["role"] == "static-group")
    if len(static) < 2:
        pytest.skip(f"the tiny artifact has {len(static)} static-group graph(s); sharing needs two")
    first = res["files"][static[0]]
    assert "log" in first["checker"]
    for n in static[1:]:
        assert res["files"][n]["structure"] == first["structure"]
        assert res["files"][n]["checker"]["verdict_from"] == static[0]


def test_scales_in_the_graph_are_direct_initializers(static_artifact):
    """The constant-scale claim as the EPs read it (GetConstantInitializer): checked with onnx directly."""
    onnx = pytest.importorskip("onnx", reason="needs onnx")
    for path in sorted(static_artifact.glob("unet_static_g*.onnx")):
        g = onnx.load(str(path), load_external_data=False).graph
        inits = {i.name for i in g.initializer}
        q = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert q and all(n.input[1] in inits for n in q), path.name
    g = onnx.load(str(static_artifact / "unet_int.onnx"), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    assert any(n.input[1] not in inits for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))


def test_checker_log_parser():
    mod = load_script()
    lines = ["Checking NNAPI", "1 partitions with a total of 13/660 nodes can be handled by the NNAPI EP.",
             "\tPartition sizes: [13]", "Unsupported nodes due to operator=30",
             "\tUnsupported ops: ai.onnx:Cos,ai.onnx:InstanceNormalization",
             "\tCaveats that have not been checked and may result in a node not actually being supported:  ",
             "     ai.onnx:QLinearConv:Only 2D Conv is supported.",
             "Unsupported nodes due to input having a dynamic shape=646",
             "Model should perform well with NNAPI as is: NO", "--------",
             "Partition information if the model was updated to make the shapes fixed:",
             "29 partitions with a total of 630/660 nodes can be handled by the NNAPI EP.",
             "Model should perform well with NNAPI if modified to have fixed input shapes: NO"]
    v = mod.parse_checker(lines)["NNAPI"]
    assert v["verdict"] == v["verdict_fixed_shapes"] == "NO"
    assert v["as_is"] == dict(partitions=1, supported_nodes=13, nodes=660, partition_sizes=[13],
                              unsupported_due_to_op=30, unsupported_ops=["ai.onnx:Cos", "ai.onnx:InstanceNormalization"],
                              unsupported_due_to_dynamic_shape=646)
    assert v["fixed_shapes"]["partitions"] == 29
    assert v["caveats"] == ["ai.onnx:QLinearConv:Only 2D Conv is supported."]
