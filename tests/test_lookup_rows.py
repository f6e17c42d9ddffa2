"""Lookup tables read a row at a time (runtime/lookup_rows.py): found in the graph file, the same outputs as
onnxruntime's own copy, only the rows of the time steps run read, and an untrusted file that does not
parse costs the optimisation, never a wrong read."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qexport_runtime.artifact import ArtifactError, load_artifact
from qexport_runtime.lookup_rows import TABLE_NAME, LookupRows, find_tables
from qexport_runtime.session import Plan, UNetSession, physical_cores


def table_graph(path, table: np.ndarray, name="qx/time_projection_table") -> None:
    """timestep → Gather(table) → DequantizeLinear(axis=1) → output [1, N] (the export's rule-2 shape)."""
    scale = np.linspace(0.01, 0.02, table.shape[1]).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gather", [name, "timestep"], ["row"], axis=0),
         helper.make_node("DequantizeLinear", ["row", "scale"], ["out"], axis=1)], "g",
        [helper.make_tensor_value_info("timestep", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, table.shape[1]])],
        [numpy_helper.from_array(table, name), numpy_helper.from_array(scale, "scale")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_the_runtime_knows_the_exporter_s_table_names():
    pytest.importorskip("torch", reason="the exporter's constants live in the toolchain")
    from qexport.export.passes.tabulate_time_embedding import PROJECTION_TABLE, TABLE

    for name in (TABLE, PROJECTION_TABLE, f"{PROJECTION_TABLE}/3"):
        assert TABLE_NAME.fullmatch(name)
    assert not TABLE_NAME.fullmatch(f"{PROJECTION_TABLE}/scale") and not TABLE_NAME.fullmatch("w")


def test_rows_are_read_on_first_use_and_give_onnxruntime_s_outputs(tmp_path):
    import onnxruntime as ort

    table = np.random.default_rng(0).integers(-127, 128, (1000, 300)).astype(np.int8)
    table_graph(tmp_path / "g.onnx", table)
    (span,) = find_tables(tmp_path / "g.onnx")
    assert span.shape == (1000, 300) and span.dtype == np.int8
    assert np.array_equal(np.fromfile(tmp_path / "g.onnx", np.int8, table.size, offset=span.offset).reshape(table.shape),
                          table)
    rows = LookupRows(tmp_path / "g.onnx", span)
    so = ort.SessionOptions()
    so.add_initializer(span.name, rows.value)
    lazy = ort.InferenceSession(str(tmp_path / "g.onnx"), so, providers=["CPUExecutionProvider"])
    full = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    for t in (999, 0, 500, 999):
        rows.ensure(t)
        feed = {"timestep": np.array([t])}
        np.testing.assert_array_equal(lazy.run(None, feed)[0], full.run(None, feed)[0])
    assert sorted(np.flatnonzero(rows.filled)) == [0, 500, 999]
    assert not rows.array[1].any()        # a row never run was never read
    with pytest.raises(ValueError, match=r"time step 1000 is outside \[0, 1000\)"):
        rows.ensure(1000)


def test_a_real_artifact_s_graph_runs_on_lookup_rows_with_the_same_outputs(tiny_artifact):
    art = load_artifact(tiny_artifact)
    for role in art.graph_roles:
        spans = find_tables(art.graph(role))
        assert bool(spans) == (role != "fp32"), (role, spans)   # the FP32 reference computes its time branch
    graph = art.graph("int")
    lazy, full = UNetSession(graph, threads=1), UNetSession(graph, threads=1, lazy_tables=False)
    assert lazy.lookups and not full.lookups
    x = np.random.default_rng(1).standard_normal((3, *lazy.sample_dims[1:])).astype(np.float32)
    steps = (999, 640, 0, 640)
    for t in steps:
        np.testing.assert_array_equal(lazy(x, t), full(x, t))
    if physical_cores() > 1:   # shard sessions share the same rows
        lazy.plans[3] = Plan(1, 2)
        np.testing.assert_array_equal(lazy(x, 321), full(x, 321))
        assert len(lazy._shard_bounds) == 1
        steps += (321,)
    assert {int(t) for t in np.flatnonzero(lazy.lookups[0].filled)} == set(steps)


def test_files_that_do_not_parse_or_lie_about_their_table_get_no_lookup_rows(tmp_path):
    table = np.arange(24, dtype=np.int8).reshape(6, 4)
    table_graph(tmp_path / "g.onnx", table)
    data = (tmp_path / "g.onnx").read_bytes()
    assert find_tables(tmp_path / "g.onnx")

    m = onnx.load(str(tmp_path / "g.onnx"))
    t = next(i for i in m.graph.initializer if i.name == "qx/time_projection_table")
    t.raw_data = t.raw_data[:-4]                                    # 20 bytes for a [6, 4] int8 table
    onnx.save(m, str(tmp_path / "short.onnx"))
    assert find_tables(tmp_path / "short.onnx") == []
    t.raw_data, t.data_type = np.zeros(24, np.int32).tobytes(), TensorProto.INT32   # a dtype it does not read
    t.dims[:] = [6, 4]
    onnx.save(m, str(tmp_path / "int32.onnx"))
    assert find_tables(tmp_path / "int32.onnx") == []

    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "empty.onnx").write_bytes(b"")
    for name in ("cut.onnx", "noise.onnx", "empty.onnx", "missing.onnx"):
        assert find_tables(tmp_path / name) == []
    with pytest.raises(ArtifactError, match="onnxruntime cannot load this graph"):
        UNetSession(tmp_path / "cut.onnx")
