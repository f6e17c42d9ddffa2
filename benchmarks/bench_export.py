"""Exporter benchmark: does the time-indexed integer artifact run at static-QDQ speed?

    python benchmarks/bench_export.py [--models shipped cifar] [--threads 2] [--reps 20]

For each model (the shipped digits16-ddpm, and a random-weight U-Net with google/ddpm-cifar10-32's
config built by this script), converts it twice — time-indexed (`--method mse`, K groups) and the
static baseline (`--method static`: K=1, min/max, the graph ORT's quantize_static gives) — plus the
integer graph before the CPU-correctness change and one with conv_in/conv_out quantized, and times,
interleaved in one process at B=1 and B=8: FP32 ORT, static QDQ (ORT fuses it to QLinearConv), the
time-indexed integer lowerings, the time-indexed portable QDQ graph, and torch eager FP32. Also
records peak RSS of a fresh process per graph, file bytes, an int8/fp32 GEMM peak through
onnxruntime, and each graph's achieved ops/s as a fraction of that peak.
Writes benchmarks/results/export_bench.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_cifar_config_unet, gemm_peak, interleaved, machine_info, peak_rss, unet_ops  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def bench_model(name: str, model_id: str, workdir: Path, args) -> dict:
    import torch

    from qexport.calibrate.api import CalibrationConfig
    from qexport.calibrate.sources import SourceConfig
    from qexport.export.pipeline import convert
    from qexport.tables.build import TableConfig
    from qexport.zoo.loading import load_model
    from qexport_runtime.artifact import load_artifact
    from qexport_runtime.session import UNetSession

    src = SourceConfig(steps=args.cal_steps, samples=args.cal_samples, trajectories=args.cal_trajectories)
    cal = CalibrationConfig(source=src)

    def build(tag: str, **kw) -> Path:  # the ε correction changes no graph: not fitted here
        return convert(model_id, workdir / f"{name}-{tag}", correction="off", progress=False, **kw)

    a_ours = load_artifact(build("ours", groups=args.groups, calibration=cal))
    a_static = load_artifact(build("static", method="static", calibration=cal))
    # the integer graph before the CPU-correctness change: plain int8 weights, conv_in / conv_out quantized
    a_plain = load_artifact(build("plain", groups=args.groups, calibration=CalibrationConfig(
        source=src, table=TableConfig(saturation_safe=False, quantize_first_last=True))))
    a_fl = load_artifact(build("fl", groups=args.groups, calibration=CalibrationConfig(
        source=src, table=TableConfig(quantize_first_last=True))))
    graphs = {"fp32": a_ours.graph("fp32"), "static_qdq": a_static.graph("qdq"),
              "ours_int": a_ours.graph("int"), "ours_qdq": a_ours.graph("qdq"),
              "plain_int": a_plain.graph("int"), "first_last_int8_int": a_fl.graph("int")}
    sessions = {k: UNetSession(p, threads=args.threads) for k, p in graphs.items()}
    model = load_model(model_id)
    torch.set_num_threads(args.threads)
    unet = model.unet
    ops = unet_ops(unet, model.sample_shape)
    rows = []
    for batch in (1, 8):
        x = np.random.default_rng(0).standard_normal((batch, *model.sample_shape)).astype(np.float32)
        xt = torch.from_numpy(x)
        fns = {k: (lambda s=s: s(x, 500)) for k, s in sessions.items()}

        def eager():
            with torch.no_grad():
                unet(xt, torch.tensor([500]))

        fns["torch_eager"] = eager
        times = interleaved(fns, args.reps if batch == 1 else max(5, args.reps // 2))
        med = {k: float(np.median(v)) for k, v in times.items()}
        for k, v in times.items():
            path = graphs.get(k)
            row = dict(model=name, batch=batch, graph=k, step_ms_median=med[k] * 1e3,
                       step_ms_p90=float(np.percentile(v, 90)) * 1e3,
                       speedup_vs_fp32=med["fp32"] / med[k], ratio_vs_static_qdq=med["static_qdq"] / med[k],
                       bytes=path.stat().st_size if path else None,
                       gops=ops * batch / med[k] / 1e9)
            if path is not None:
                row.update(peak_rss(path, x.shape, args.threads))
            rows.append(row)
    return dict(ops_per_sample=ops, rows=rows, bytes=dict(fp32=graphs["fp32"].stat().st_size,
                                                          int=graphs["ours_int"].stat().st_size,
                                                          qdq=graphs["ours_qdq"].stat().st_size))


def markdown(result: dict) -> str:
    peak = result["gemm_peak"]
    lines = [f"# Exporter benchmark ({result['machine']['cpu']}, int8 path {result['machine']['isa']}, "
             f"{result['threads']} threads, onnxruntime {result['machine']['onnxruntime']})", "",
             "Graphs: `ours_int` the default integer graph (saturation-safe weights, conv_in/conv_out float); "
             "`plain_int` the integer graph before that change (plain int8, first/last quantized: wrong on "
             "x86 without VNNI); `first_last_int8_int` saturation-safe with conv_in/conv_out quantized; "
             "`static_qdq` ORT-style static QDQ (K=1 min/max, first/last quantized, fused by ORT). "
             "Operations are 2 × MAC (torch.utils.flop_counter's count).", "",
             f"GEMM peak through onnxruntime: int8 {peak['int8_gops']:.0f} GOP/s, fp32 {peak['fp32_gops']:.0f} GFLOP/s.",
             ""]
    for name, m in result["models"].items():
        lines += [f"## {name} ({m['ops_per_sample'] / 1e9:.3f} GOP per sample per step)", "",
                  "| B | graph | ms/step (median) | p90 | × FP32 ORT | × static QDQ | achieved GOP/s | % of peak | peak RSS MB | bytes |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            is_int = r["graph"] not in ("fp32", "torch_eager")
            frac = r["gops"] / (peak["int8_gops"] if is_int else peak["fp32_gops"]) * 100
            rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "–"
            size = f"{r['bytes']:,}" if r["bytes"] else "–"
            lines.append(f"| {r['batch']} | {r['graph']} | {r['step_ms_median']:.2f} | {r['step_ms_p90']:.2f} | "
                         f"{r['speedup_vs_fp32']:.2f} | {r['ratio_vs_static_qdq']:.2f} | {r['gops']:.1f} | "
                         f"{frac:.0f}% | {rss} | {size} |")
        b = m["bytes"]
        lines += ["", f"Bytes: int graph {b['int'] / b['fp32']:.3f}× FP32, QDQ graph {b['qdq'] / b['fp32']:.3f}× FP32.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["shipped", "cifar"], choices=["shipped", "cifar"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--cal-steps", type=int, default=20)
    p.add_argument("--cal-samples", type=int, default=160)
    p.add_argument("--cal-trajectories", type=int, default=8)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "qexport-bench")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    result = dict(machine=machine_info(), threads=args.threads, gemm_peak=gemm_peak(args.threads), models={})
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model_id = "digits16-ddpm" if name == "shipped" else str(build_cifar_config_unet(args.cache / "ddpm-cifar10-config"))
            result["models"][name] = bench_model(name, model_id, Path(tmp), args)
            print(f"done {name}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_bench.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    (args.out / "export_bench.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
