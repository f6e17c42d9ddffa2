"""Hardware efficiency of U-Net graphs: multiply-accumulates counted from the ONNX graph, the
machine's int8 / FP32 GEMM peak through onnxruntime, and the share of that peak a graph achieves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Operators that multiply-accumulate, float and integer forms: (input holding the K axis, how K is read).
_CONV = ("Conv", "ConvInteger", "QLinearConv")
_MATMUL = ("MatMul", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat", "FusedMatMul", "Gemm", "QGemm")
_WEIGHT_INPUT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
_A_INPUT = {"MatMul": 0, "MatMulInteger": 0, "QLinearMatMul": 0, "MatMulIntegerToFloat": 0, "FusedMatMul": 0, "Gemm": 0,
            "QGemm": 0}


def _standard_stand_ins(graph) -> dict[str, str]:
    """onnxruntime's symbolic shape inference knows no com.microsoft MatMulIntegerToFloat: in this copy of the
    graph each becomes MatMul(Cast(A), Cast(B)) (same output shape). Returns {node name: original op}."""
    from onnx import TensorProto, helper

    originals = {}
    for i, node in enumerate(list(graph.node)):
        if node.op_type != "MatMulIntegerToFloat":
            continue
        name = node.name or f"mmitf{i}"
        casts = [helper.make_node("Cast", [x], [f"cast/{name}/{k}"], name=f"cast/{name}/{k}", to=TensorProto.FLOAT)
                 for k, x in enumerate(node.input[:2])]
        matmul = helper.make_node("MatMul", [c.output[0] for c in casts], list(node.output), name=name)
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for k, n in enumerate([*casts, matmul]):
            graph.node.insert(at + k, n)
        originals[name] = "MatMulIntegerToFloat"
    return originals


def is_integer_op(op: str) -> bool:
    """A multiply-accumulating operator with integer operands (QLinearConv, MatMulIntegerToFloat, ConvInteger …)."""
    return op.startswith("QLinear") or "Integer" in op or op == "QGemm"


def _is_tap_sum(node, weights: dict) -> bool:
    """A grouped convolution with the one-hot weight W[o, i·kw + j, i, j] = 1 that NarrowConvAsPointwise
    writes: it sums k² shifted channels per output (data movement and k² adds), no model arithmetic."""
    w = weights.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
    if w is None or w.ndim != 4 or w.shape[1] != w.shape[2] * w.shape[3]:
        return False
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    o, taps, kh, kw = w.shape
    if group != o:
        return False
    one_hot = np.zeros((taps, kh, kw), w.dtype)
    one_hot[np.arange(taps), np.arange(taps) // kw, np.arange(taps) % kw] = 1
    return bool(np.array_equal(w, np.broadcast_to(one_hot, w.shape)))


def graph_macs(path: str | Path, sample_shape: tuple) -> dict:
    """Multiply-accumulates of one U-Net call on one sample, counted from the graph's Conv / MatMul /
    Gemm nodes (float, QLinear and Integer forms) with shapes from onnxruntime's symbolic shape
    inference at batch 1: `{"total": int, "by_op": {op_type: int}, "tap_sums": int}`. Conv: output
    elements × the weight's C_in/groups·kh·kw; MatMul and Gemm: output elements × K. The one-hot
    tap-sum convolutions of NarrowConvAsPointwise are the model's data movement, not its arithmetic:
    their conv-formula count goes to `tap_sums`, outside `total`, so the total stays torch's count."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(path))
    init = {t.name: list(t.dims) for t in model.graph.initializer}
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer   # tap-sum candidates only
               if len(t.dims) == 4 and t.dims[1] == t.dims[2] * t.dims[3] > 1}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        dims = inp.type.tensor_type.shape.dim
        if inp.name == "sample":
            for d, n in zip(dims, (1, *sample_shape)):
                d.dim_value = n
    contrib = _standard_stand_ins(model.graph)
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    shapes = dict(init)
    for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = v.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = [d.dim_value for d in dims]
    by_op: dict[str, int] = {}
    tap_sums = 0
    for node in inferred.graph.node:
        if node.op_type not in _CONV + _MATMUL or node.name.startswith("cast/"):
            continue
        out = shapes.get(node.output[0])
        if out is None:
            raise ValueError(f"{path}: no static shape for the output of {node.op_type} {node.name!r} at batch 1")
        if node.op_type in _CONV:
            k = int(np.prod(shapes[node.input[_WEIGHT_INPUT[node.op_type]]][1:]))
        else:
            a = shapes[node.input[_A_INPUT[node.op_type]]]
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            k = a[-2] if trans_a else a[-1]
        if _is_tap_sum(node, weights):
            tap_sums += int(np.prod(out)) * int(k)
            continue
        op = contrib.get(node.name, node.op_type)
        by_op[op] = by_op.get(op, 0) + int(np.prod(out)) * int(k)
    return dict(total=sum(by_op.values()), by_op=by_op, tap_sums=tap_sums)


PEAK_CONV = (256, 256, 32)   # channels in, out, side: a 3×3 convolution like the cifar-config U-Net's widest


def gemm_probes(threads: int | None, n: int = 1024) -> dict:
    """The kernels a "share of the machine's peak" is measured against, through onnxruntime, as
    `{name: (call, operations)}`: an n³ matmul (int8: QLinearMatMul u8×s8) and a 3×3 convolution
    (`PEAK_CONV`; int8: QLinearConv with constant zero points and bias, the fused symmetric kernel;
    FP32 at onnxruntime's ALL level, NCHWc), int8 and FP32 each. Timed beside the graphs they are
    compared with (interleaved), so a busy moment of the machine moves both."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from qexport_runtime.session import session_options

    rng = np.random.default_rng(0)
    c = lambda name, v, dt: numpy_helper.from_array(np.array(v, dtype=dt), name)  # noqa: E731
    ci, co, side = PEAK_CONV
    info = lambda name, dt, shape: helper.make_tensor_value_info(name, dt, shape)  # noqa: E731
    u8, f32 = TensorProto.UINT8, TensorProto.FLOAT
    q = [c("as", 0.01, np.float32), c("az", 128, np.uint8), c("ws", 0.01, np.float32), c("wz", 0, np.int8),
         c("ys", 1.0, np.float32), c("yz", 128, np.uint8)]
    graphs = {
        "int8_matmul": (helper.make_graph(
            [helper.make_node("QLinearMatMul", ["a", "as", "az", "w", "ws", "wz", "ys", "yz"], ["y"])], "g",
            [info("a", u8, [n, n])], [info("y", u8, [n, n])],
            [numpy_helper.from_array(rng.integers(-127, 128, (n, n)).astype(np.int8), "w"), *q]),
            rng.integers(0, 255, (n, n)).astype(np.uint8), 2 * n ** 3, "extended"),
        "int8_conv": (helper.make_graph(
            [helper.make_node("QLinearConv", ["a", "as", "az", "w", "ws", "wz", "ys", "yz", "b"], ["y"],
                              pads=[1, 1, 1, 1])], "g",
            [info("a", u8, [1, ci, side, side])], [info("y", u8, [1, co, side, side])],
            [numpy_helper.from_array(rng.integers(-127, 128, (co, ci, 3, 3)).astype(np.int8), "w"), *q,
             c("b", rng.integers(-1000, 1000, co), np.int32)]),
            rng.integers(0, 255, (1, ci, side, side)).astype(np.uint8), 2 * co * ci * 9 * side ** 2, "extended"),
        "fp32_matmul": (helper.make_graph(
            [helper.make_node("MatMul", ["a", "w"], ["y"])], "g", [info("a", f32, [n, n])], [info("y", f32, [n, n])],
            [numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "w")]),
            rng.standard_normal((n, n)).astype(np.float32), 2 * n ** 3, "extended"),
        "fp32_conv": (helper.make_graph(
            [helper.make_node("Conv", ["a", "w", "b"], ["y"], pads=[1, 1, 1, 1])], "g",
            [info("a", f32, [1, ci, side, side])], [info("y", f32, [1, co, side, side])],
            [numpy_helper.from_array(rng.standard_normal((co, ci, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(co).astype(np.float32), "b")]),
            rng.standard_normal((1, ci, side, side)).astype(np.float32), 2 * co * ci * 9 * side ** 2, "all"),
    }
    probes = {}
    for name, (graph, x, ops, level) in graphs.items():
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        s = ort.InferenceSession(m.SerializeToString(), session_options(threads, optimization=level))
        probes[name] = (lambda s=s, x=x: s.run(None, {"a": x}), ops)
    return probes


def peak_of(probes: dict, times: dict[str, list[float]]) -> dict:
    """GOP/s (2 × MAC per second) of each probe at its fastest round (`{name}_gops`), and the peak per
    number type (`int8_gops`, `fp32_gops`): the faster of its matmul and convolution. A peak is what the
    machine can do, so the best round counts; the graphs compared with it are taken at their median."""
    out = {f"{k}_gops": ops / min(times[k]) / 1e9 for k, (_, ops) in probes.items()}
    for kind in ("int8", "fp32"):
        out[f"{kind}_gops"] = max(v for k, v in list(out.items()) if k.startswith(f"{kind}_"))
    return out


def gemm_peak(threads: int | None, n: int = 1024, reps: int = 10) -> dict:
    """`peak_of` the `gemm_probes`, timed alone: what "share of the machine's peak" is measured against."""
    from qexport_runtime.bench import interleaved

    probes = gemm_probes(threads, n)
    return peak_of(probes, interleaved({k: f for k, (f, _) in probes.items()}, reps))


def achieved_gops(macs_per_sample: float, batch: int, step_ms: float) -> float:
    """Operations per second (2 × MAC) of one U-Net call on `batch` samples taking `step_ms`."""
    return 2.0 * macs_per_sample * batch / (step_ms / 1e3) / 1e9
