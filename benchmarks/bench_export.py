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
from common import (build_cifar_config_unet, gemm_peak, gemm_probes, interleaved, machine_info, peak_of,  # noqa: E402
                    peak_rss, sampling_rss, unet_ops)

RESULTS = Path(__file__).resolve().parent / "results"
# onnxruntime's own default level (ALL) adds NCHWc float convolutions on x86: the FP32 graph a user
# runs with a plain InferenceSession, often faster than at the runtime's EXTENDED level
LEVELS = {"fp32_ort_default": "all"}


def level_of(graph: str) -> str:
    return LEVELS.get(graph, "extended")


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
        out = workdir / f"{name}-{tag}"
        if (out / "manifest.json").exists():   # --workdir: an artifact built by an earlier run
            return out
        return convert(model_id, out, correction="off", progress=False, **kw)

    a_ours = load_artifact(build("ours", groups=args.groups, calibration=cal))
    a_static = load_artifact(build("static", method="static", calibration=cal))
    # the integer graph before the CPU-correctness change: plain int8 weights, conv_in / conv_out quantized
    a_plain = load_artifact(build("plain", groups=args.groups, calibration=CalibrationConfig(
        source=src, table=TableConfig(saturation_safe=False, quantize_first_last=True))))
    a_fl = load_artifact(build("fl", groups=args.groups, calibration=CalibrationConfig(
        source=src, table=TableConfig(quantize_first_last=True))))
    # the integer graph before the time-branch change: time MLP and time_emb_proj quantized, one per ResNet
    a_tq = load_artifact(build("tq", groups=args.groups, calibration=CalibrationConfig(
        source=src, table=TableConfig(quantize_time_branch=True))))
    # this build's two graph changes, each undone alone and both together: QLinearMatMul with requantized
    # products instead of MatMulIntegerToFloat, and the time MLP computed per step instead of looked up
    a_qmm = load_artifact(build("qmm", groups=args.groups, calibration=CalibrationConfig(
        source=src, table=TableConfig(matmul_outputs="quantized", tabulate_time_embedding=False))))
    a_nott = load_artifact(build("nott", groups=args.groups, calibration=CalibrationConfig(
        source=src, table=TableConfig(tabulate_time_embedding=False))))
    # every conv input looked up by t (before fixed conv-input ranges): runtime int32 biases, ORT's generic conv path
    a_pgc = load_artifact(build("pgc", groups=args.groups, calibration=CalibrationConfig(
        source=src, table=TableConfig(fixed_range_below=1.0))))
    # from the same QDQ graphs, one change each: the split-concat 1×1 convs left in float (before lowering
    # rule 5); the GroupNorm affine left as Mul → Add (before GroupNormAffine); and that rewrite applied to
    # the static graph too (not a baseline: how much of its gain any graph would get)
    no_split = relowered(a_ours.graph("qdq"), workdir / f"{name}-no_split_int.onnx", split_convs=False)
    no_affine = relowered(a_ours.graph("qdq"), workdir / f"{name}-no_affine_bn_int.onnx", affine=False)
    static_affine = relowered(a_static.graph("qdq"), workdir / f"{name}-static_affine_bn.onnx", lower=False)
    if args.build_only:
        return {}
    graphs = {"fp32": a_ours.graph("fp32"), "static_qdq": a_static.graph("qdq"), "float_split_conv_int": no_split,
              "no_affine_bn_int": no_affine, "static_qdq_affine_bn": static_affine,
              "qlinearmatmul_int": a_qmm.graph("int"), "no_time_table_int": a_nott.graph("int"),
              "ours_int": a_ours.graph("int"), "ours_qdq": a_ours.graph("qdq"),
              "plain_int": a_plain.graph("int"), "first_last_int8_int": a_fl.graph("int"),
              "time_quantized_int": a_tq.graph("int"), "per_group_conv_int": a_pgc.graph("int")}
    graphs["fp32_ort_default"] = graphs["fp32"]
    sessions = {k: UNetSession(p, threads=args.threads, optimization=level_of(k)) for k, p in graphs.items()}
    model = load_model(model_id)
    torch.set_num_threads(args.threads)
    unet = model.unet
    ops = unet_ops(unet, model.sample_shape)
    rows, peak = [], {}
    probes = gemm_probes(args.threads)
    for batch in (1, 8):
        x = np.random.default_rng(0).standard_normal((batch, *model.sample_shape)).astype(np.float32)
        xt = torch.from_numpy(x)
        fns = {k: (lambda s=s: s(x, 500)) for k, s in sessions.items()}

        def eager():
            with torch.no_grad():
                unet(xt, torch.tensor([500]))

        fns["torch_eager"] = eager
        for k, (f, _) in probes.items():   # the GEMM peak, timed in the same rounds as the graphs
            fns[f"gemm_{k}"] = f
        times = interleaved(fns, args.reps if batch == 1 else max(5, args.reps // 2))
        peak[str(batch)] = peak_of(probes, {k: times.pop(f"gemm_{k}") for k in probes})
        med = {k: float(np.median(v)) for k, v in times.items()}
        best_fp32 = min(med["fp32"], med["fp32_ort_default"])
        for k, v in times.items():
            path = graphs.get(k)
            row = dict(model=name, batch=batch, graph=k, step_ms_median=med[k] * 1e3,
                       step_ms_p90=float(np.percentile(v, 90)) * 1e3,
                       speedup_vs_fp32=med["fp32"] / med[k], speedup_vs_best_fp32=best_fp32 / med[k],
                       ratio_vs_static_qdq=med["static_qdq"] / med[k],
                       bytes=path.stat().st_size if path else None,
                       gops=ops * batch / med[k] / 1e9)
            if path is not None:
                row.update(peak_rss(path, x.shape, args.threads,
                                    optimization=level_of(k)))
            rows.append(row)
    # the whole sampling process (the runtime's Sampler with its self-check, 20 DDIM steps), fresh per figure
    sampling = {f"{label}_b{b}": sampling_rss(art.path, role, b, args.threads)["peak_rss_mb"]
                for label, art, role in (("ours_int", a_ours, "int"), ("static_qdq", a_static, "qdq"),
                                         ("fp32", a_ours, "fp32"))
                for b in (1, 8)}
    threads = {}
    for n_threads in args.threads_sweep:   # scaling per graph, interleaved per thread count
        ts = {k: UNetSession(graphs[k], threads=n_threads, optimization=level_of(k))
              for k in ("fp32", "fp32_ort_default", "static_qdq", "ours_int")}
        for batch in (1, 8):
            x = np.random.default_rng(0).standard_normal((batch, *model.sample_shape)).astype(np.float32)
            t = interleaved({k: (lambda s=s: s(x, 500)) for k, s in ts.items()}, max(5, args.reps // 2))
            for k, v in t.items():
                threads.setdefault(k, {}).setdefault(str(batch), {})[str(n_threads)] = float(np.median(v)) * 1e3
    profile = {f"{k}_b{b}": op_breakdown(graphs[k], (b, *model.sample_shape), args.threads,
                                         optimization=level_of(k))
               for k in ("fp32", "fp32_ort_default", "ours_int", "static_qdq") for b in (1, 8)}
    return dict(ops_per_sample=ops, rows=rows, gemm_peak=peak, threads=threads, profile=profile, sampling_rss=sampling,
                bytes=dict(fp32=graphs["fp32"].stat().st_size,
                                                          int=graphs["ours_int"].stat().st_size,
                                                          qdq=graphs["ours_qdq"].stat().st_size))


def relowered(qdq: Path, out: Path, lower: bool = True, split_convs: bool = True, affine: bool = True) -> Path:
    """`qdq` through the integer lowering's passes with one of them off (`lower=False`: GroupNormAffine alone)."""
    if out.exists():
        return out
    import onnx

    from qexport.export.passes import GroupNormAffine
    from qexport.export.passes.lower_integer import LowerToInteger

    m = onnx.load(str(qdq))
    if lower:
        LowerToInteger(split_convs=split_convs)(m)
    if affine:
        GroupNormAffine()(m)
    onnx.save(m, str(out))
    return out


def op_breakdown(path: Path, shape: tuple, threads: int, runs: int = 20, optimization: str = "extended") -> dict[str, float]:
    """Share of kernel time per operator type (onnxruntime profiling, the runtime's session options)."""
    import collections
    import os

    from qexport_runtime.session import disabled_optimizers, open_session, session_options

    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(threads, optimization=optimization)
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "p")
        s = open_session(path, so, disabled=disabled_optimizers(optimization))
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        for _ in range(runs):
            s.run(None, {"sample": x, "timestep": np.array([500], np.int64)})
        events = json.loads(Path(s.end_profiling()).read_text())
    tot = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            tot[e["args"]["op_name"]] += e["dur"]
    total = sum(tot.values())
    return {k: v / total for k, v in tot.most_common()}


def plot_profile(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    fig, axes = plt.subplots(len(models), 1, figsize=(11, 3.2 * len(models)), squeeze=False)
    for ax, name in zip(axes[:, 0], models):
        prof = result["models"][name]["profile"]
        ops = sorted({o for p in prof.values() for o, v in p.items() if v >= 0.02},
                     key=lambda o: -max(p.get(o, 0) for p in prof.values()))
        keys = list(prof)
        w = 0.8 / len(keys)
        for i, k in enumerate(keys):
            ax.bar(np.arange(len(ops)) + i * w, [100 * prof[k].get(o, 0) for o in ops], w, label=k)
        ax.set_xticks(np.arange(len(ops)) + 0.4 - w / 2, ops, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("% of kernel time")
        ax.set_title(f"{name}: operator time (onnxruntime profiling, {result['machine']['isa']}, "
                     f"{result['threads']} threads)", fontsize=9)
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    peak = result["gemm_peak"]
    m = result["machine"]
    lines = [f"# Exporter benchmark ({m['cpu']}, int8 path {m['isa']}, {result['threads']} threads "
             f"(waiting {m.get('wait_policy', 'passive')}), onnxruntime {m['onnxruntime']})", "",
             "Graphs: `ours_int` the default integer graph (saturation-safe weights, conv_in/conv_out float, "
             "conv inputs at one range over t (constant int32 biases), "
             "time branch float and batched, time embedding looked up by t, Linear/attention products and "
             "split-concat convs as MatMulIntegerToFloat); "
             "`plain_int` the integer graph before that change (plain int8, first/last quantized: wrong on "
             "x86 without VNNI); `first_last_int8_int` saturation-safe with conv_in/conv_out quantized; "
             "`time_quantized_int` the default with the time MLP and time_emb_proj quantized (before the "
             "time-branch change); `qlinearmatmul_int` the default before MatMulIntegerToFloat and the time-embedding "
             "table (Linear and attention products requantized, QLinearMatMul; time MLP computed per step); "
             "`per_group_conv_int` the default with every conv input looked up by t (before fixed conv-input ranges: "
             "runtime int32 biases, so ORT runs im2col + GEMM + requantize instead of its fused symmetric conv); "
             "`no_time_table_int` the default without the time-embedding table; `float_split_conv_int` the default "
             "with the 1×1 convs over split-quantized skip concatenations left in float (before lowering rule 5); "
             "`no_affine_bn_int` the default with each GroupNorm's γ/β as Mul → Add (before GroupNormAffine: one "
             "BatchNormalization); `static_qdq_affine_bn` the static graph with that same rewrite (not a baseline: "
             "the part of its gain any graph gets); `static_qdq` ORT-style static QDQ (K=1 min/max, first/last quantized, fused by ORT). "
             "Operations are 2 × MAC (torch.utils.flop_counter's count). `fp32` runs at the runtime's EXTENDED level, "
             "`fp32_ort_default` the same graph at onnxruntime's default level ALL (NCHWc float convolutions on x86); "
             "× FP32 ORT is against `fp32`, × best FP32 against the faster of the two.", "",
             f"Peak through onnxruntime (the faster of a 1024³ matmul and a 3×3 256→256 convolution at 32×32, "
             f"best of the rounds, measured alone at the start): int8 {peak['int8_gops']:.0f} GOP/s, fp32 "
             f"{peak['fp32_gops']:.0f} GFLOP/s. \"% of peak\" uses the same probes timed in the same interleaved "
             "rounds as the graphs of its batch size (given per model; graphs at their median round).",
             ""]
    for name, m in result["models"].items():
        lines += [f"## {name} ({m['ops_per_sample'] / 1e9:.3f} GOP per sample per step)", "",
                  "| B | graph | ms/step (median) | p90 | × FP32 ORT | × best FP32 | × static QDQ | achieved GOP/s | % of peak | peak RSS MB | bytes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            is_int = r["graph"] not in ("fp32", "fp32_ort_default", "torch_eager")
            p = m.get("gemm_peak", {}).get(str(r["batch"]), peak)
            frac = r["gops"] / (p["int8_gops"] if is_int else p["fp32_gops"]) * 100
            rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "–"
            size = f"{r['bytes']:,}" if r["bytes"] else "–"
            lines.append(f"| {r['batch']} | {r['graph']} | {r['step_ms_median']:.2f} | {r['step_ms_p90']:.2f} | "
                         f"{r['speedup_vs_fp32']:.2f} | {r['speedup_vs_best_fp32']:.2f} | {r['ratio_vs_static_qdq']:.2f} | {r['gops']:.1f} | "
                         f"{frac:.0f}% | {rss} | {size} |")
        b = m["bytes"]
        if m.get("gemm_peak"):
            lines += ["", "Peak in the same rounds: " + "; ".join(
                f"B={bb}: int8 {v['int8_gops']:.0f} GOP/s, fp32 {v['fp32_gops']:.0f} GFLOP/s" + (
                    f" (int8 matmul {v['int8_matmul_gops']:.0f} / conv {v['int8_conv_gops']:.0f}, fp32 matmul "
                    f"{v['fp32_matmul_gops']:.0f} / conv {v['fp32_conv_gops']:.0f})" if "int8_conv_gops" in v else "")
                for bb, v in m["gemm_peak"].items()) + "."]
        lines += ["", f"Bytes: int graph {b['int'] / b['fp32']:.3f}× FP32, QDQ graph {b['qdq'] / b['fp32']:.3f}× FP32.", ""]
        if m.get("sampling_rss"):
            sr = m["sampling_rss"]
            lines += ["Peak RSS of the sampling process (fresh process each: the runtime's `Sampler` as "
                      "`python -m qexport_runtime sample` runs it, artifact verified, self-check of the quantized "
                      "graphs, 20 DDIM steps), MB:", "",
                      "| B | ours_int | static_qdq | fp32 | int / fp32 |", "|---|---|---|---|---|"]
            for bb in (1, 8):
                lines.append(f"| {bb} | {sr[f'ours_int_b{bb}']:.1f} | {sr[f'static_qdq_b{bb}']:.1f} | "
                             f"{sr[f'fp32_b{bb}']:.1f} | {sr[f'ours_int_b{bb}'] / sr[f'fp32_b{bb}']:.3f}× |")
            lines.append("")
        if m.get("threads"):
            counts = sorted({int(n) for g in m["threads"].values() for bb in g.values() for n in bb})
            lines += ["Threads (ms/step, median; × = speed-up over 1 thread):", "",
                      "| graph | B | " + " | ".join(f"{n} thr" for n in counts) + " |",
                      "|---|---|" + "---|" * len(counts)]
            for g, per_b in m["threads"].items():
                for bb, per_n in per_b.items():
                    one = per_n.get("1")
                    cells = [f"{per_n[str(n)]:.2f}" + (f" (×{one / per_n[str(n)]:.2f})" if one and n != 1 else "")
                             for n in counts]
                    lines.append(f"| {g} | {bb} | " + " | ".join(cells) + " |")
            lines.append("")
        if m.get("profile"):
            lines += [f"Operator time shares (onnxruntime profiling; `export_profile{result.get('tag', '')}.png`):", "",
                      "| graph, batch | top operators |", "|---|---|"]
            for k, prof in m["profile"].items():
                top = ", ".join(f"{o} {100 * v:.0f}%" for o, v in list(prof.items())[:8])
                lines.append(f"| {k} | {top} |")
            lines.append("")
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
    p.add_argument("--threads-sweep", type=int, nargs="*", default=[1, 2, 4],
                   help="intra-op thread counts for the scaling table (4 as on a Pi; more threads than cores "
                        "oversubscribe)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "qexport-bench")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="suffix of the result files (export_bench<TAG>.json/.md), e.g. _avx2")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the converted artifacts here and reuse them on the next run (default: a temp dir)")
    p.add_argument("--build-only", action="store_true",
                   help="only convert the artifacts into --workdir (e.g. while the machine is busy), time nothing")
    args = p.parse_args()
    if args.build_only and not args.workdir:
        p.error("--build-only needs --workdir DIR to keep the artifacts in")
    result = dict(tag=args.tag, machine=machine_info(), threads=args.threads, models={})
    if not args.build_only:
        result["gemm_peak"] = gemm_peak(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.workdir:
            args.workdir.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            model_id = "digits16-ddpm" if name == "shipped" else str(build_cifar_config_unet(args.cache / "ddpm-cifar10-config"))
            result["models"][name] = bench_model(name, model_id, args.workdir or Path(tmp), args)
            print(f"{'built' if args.build_only else 'done'} {name}", flush=True)
    if args.build_only:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"export_bench{args.tag}.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    (args.out / f"export_bench{args.tag}.md").write_text(md)
    plot_profile(result, args.out / f"export_profile{args.tag}.png")
    print(md)


if __name__ == "__main__":
    main()
