"""The batched time projections of an integer graph stored three ways: size, error, memory and speed.

The default integer graph computes every ResNet's `time_emb_proj` at each step as one float Gemm
over float16 weights (onnxruntime folds them to float32 at load: ~10 MB resident on the
cifar-config U-Net). This benchmark rebuilds that graph's projection two other ways and measures
each against the default:
  - `per_t_table`: the projection of every t in [0, T) precomputed, a float16 [T, ΣC] table and a
    Gather by t (no Gemm at run time, a larger file);
  - `matmul_nbits8`: com.microsoft MatMulNBits with 8-bit block-quantized weights (block 128).
Per variant: file bytes, RMS of noise_pred against the FP32 graph (7 time steps × 8 inputs), peak
RSS of a fresh process at B=1 and B=8, and interleaved step time as × the default (median of the
per-round ratios, with its IQR), plus × static QDQ when `--static` is given.

    python benchmarks/bench_export.py --build-only --workdir W      # the cifar-config artifacts
    python benchmarks/bench_time_projections.py W/cifar-ours --static W/cifar-static/unet_qdq.onnx
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine_info, peak_rss  # noqa: E402


def _projection(model: onnx.ModelProto) -> tuple[onnx.NodeProto, onnx.NodeProto]:
    """The Gemm whose weight is a Cast of a float16 initializer (BatchTimeProjections' output), and that Cast."""
    fp16 = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16}
    prod = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        cast = prod.get(n.input[1]) if n.op_type == "Gemm" else None
        if cast is not None and cast.op_type == "Cast" and cast.input[0] in fp16:
            return n, cast
    raise SystemExit("error: no float16 time-projection Gemm in this graph; pass the unet_int.onnx of a default convert")


def _drop_dead(g: onnx.GraphProto) -> None:
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def per_t_table(model: onnx.ModelProto, num_train_timesteps: int, shape: tuple) -> onnx.ModelProto:
    import onnxruntime as ort

    gemm, _ = _projection(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(gemm.output[0], TensorProto.FLOAT, None))
    s = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.zeros((1, *shape), np.float32)   # the projection depends on t alone
    rows = [s.run([gemm.output[0]], {"sample": x, "timestep": np.array([t], np.int64)})[0]
            for t in range(num_train_timesteps)]
    table = np.concatenate(rows).astype(np.float16)          # [T, ΣC]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    gemm, _ = _projection(out)
    g.initializer.append(numpy_helper.from_array(table, "time_projection_table"))
    at = list(g.node).index(gemm)
    g.node.remove(gemm)
    g.node.insert(at, helper.make_node("Gather", ["time_projection_table", "timestep"], ["time_projection_row"],
                                       name="time_projection/gather", axis=0))
    g.node.insert(at + 1, helper.make_node("Cast", ["time_projection_row"], [gemm.output[0]],
                                           name="time_projection/cast", to=TensorProto.FLOAT))
    _drop_dead(g)
    return out


def matmul_nbits8(model: onnx.ModelProto, block: int = 128) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    gemm, cast = _projection(out)
    inits = {t.name: t for t in g.initializer}
    w = numpy_helper.to_array(inits[cast.input[0]]).astype(np.float32)          # [N, K]
    n, k = w.shape
    blocks = -(-k // block)
    wb = np.zeros((n, blocks * block), np.float32)
    wb[:, :k] = w
    wb = wb.reshape(n, blocks, block)
    scale = np.abs(wb).max(-1) / 127.0
    scale[scale == 0] = 1.0
    q = (np.clip(np.rint(wb / scale[..., None]), -127, 127) + 128).astype(np.uint8)   # default zero point 128
    g.initializer.extend([numpy_helper.from_array(q, "time_projection/W_q8"),
                          numpy_helper.from_array(scale.reshape(-1).astype(np.float32), "time_projection/W_scale")])
    at = list(g.node).index(gemm)
    g.node.remove(gemm)
    g.node.insert(at, helper.make_node(
        "MatMulNBits", [gemm.input[0], "time_projection/W_q8", "time_projection/W_scale", "", "", gemm.input[2]],
        list(gemm.output), name="time_projection/nbits", domain="com.microsoft", K=k, N=n, bits=8, block_size=block))
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _drop_dead(g)
    return out


def error_vs_fp32(graph: Path, fp32: Path, shape: tuple, threads: int) -> float:
    from qexport_runtime.session import UNetSession

    s, f = UNetSession(graph, threads=threads), UNetSession(fp32, threads=threads)
    rng = np.random.default_rng(1)
    errs = []
    for t in (999, 800, 600, 400, 200, 50, 5):
        x = rng.standard_normal((8, *shape)).astype(np.float32)
        errs.append(float(np.sqrt(np.mean((s(x, t) - f(x, t)) ** 2))))
    return float(np.mean(errs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifact", type=Path, help="a default convert's artifact folder (unet_int.onnx, unet_fp32.onnx)")
    p.add_argument("--static", type=Path, default=None, help="a static QDQ graph to quote × static against")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, nargs=2, default=(200, 20), metavar=("B1", "B8"))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    from qexport_runtime.session import UNetSession

    manifest = json.loads((args.artifact / "manifest.json").read_text())
    shape = tuple(manifest["sample_shape"])
    default = args.artifact / "unet_int.onnx"
    model = onnx.load(str(default))
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {"fp16_gemm (default)": default}
        for name, build in (("per_t_table", lambda m: per_t_table(m, manifest["num_train_timesteps"], shape)),
                            ("matmul_nbits8", matmul_nbits8)):
            graphs[name] = Path(tmp) / f"{name}.onnx"
            onnx.save(build(model), str(graphs[name]))
        timed = dict(graphs, **({"static_qdq": args.static} if args.static else {}))
        rows = {k: dict(bytes=Path(g).stat().st_size,
                        rms_vs_fp32=error_vs_fp32(g, args.artifact / "unet_fp32.onnx", shape, args.threads))
                for k, g in graphs.items()}
        sessions = {k: UNetSession(g, threads=args.threads) for k, g in timed.items()}
        for batch, rounds in zip((1, 8), args.rounds):
            x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
            t = {k: np.array(v) for k, v in interleaved({k: (lambda s=s: s(x, 500)) for k, s in sessions.items()},
                                                          rounds).items()}
            ref = t["fp16_gemm (default)"]
            for k in graphs:
                r = ref / t[k]
                rows[k][f"b{batch}"] = dict(
                    ms=float(np.median(t[k]) * 1e3), x_default=float(np.median(r)),
                    x_default_iqr=[float(np.percentile(r, 25)), float(np.percentile(r, 75))],
                    **(dict(x_static=float(np.median(t["static_qdq"] / t[k]))) if args.static else {}),
                    peak_rss_mb=peak_rss(graphs[k], (batch, *shape), args.threads)["peak_rss_mb"])
    result = dict(machine=machine_info(), artifact=str(args.artifact), threads=args.threads, rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "time_projections.json").write_text(json.dumps(result, indent=2))
    lines = [f"Time projections stored three ways ({result['machine']['isa']}, {args.threads} threads; "
             f"× default = median of per-round ratios, IQR in brackets)", "",
             "| variant | bytes | RMS vs FP32 | B=1 ms | × default B=1 | B=8 ms | × default B=8 |"
             + (" × static B=1 / B=8 |" if args.static else "") + " peak RSS MB B=1 / B=8 |",
             "|---|---|---|---|---|---|---|" + ("---|" if args.static else "") + "---|"]
    for k, r in rows.items():
        b1, b8 = r["b1"], r["b8"]
        iq = lambda b: f"{b['x_default']:.3f} ({b['x_default_iqr'][0]:.3f}–{b['x_default_iqr'][1]:.3f})"  # noqa: E731
        lines.append(f"| {k} | {r['bytes']:,} | {r['rms_vs_fp32']:.4f} | {b1['ms']:.1f} | {iq(b1)} | {b8['ms']:.1f} | "
                     f"{iq(b8)} |" + (f" {b1['x_static']:.3f} / {b8['x_static']:.3f} |" if args.static else "")
                     + f" {b1['peak_rss_mb']:.0f} / {b8['peak_rss_mb']:.0f} |")
    md = "\n".join(lines) + "\n"
    (args.out / "time_projections.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
