"""Fidelity ablation on the shipped model: which part of qexport buys how much image fidelity.

    python benchmarks/bench_fidelity.py [--samples 512] [--steps 50] [--rows ...] [--fresh]

At W8A8 and W4A8 on digits16-ddpm, each row adds one thing to the previous one:
  ORT quantize_static (Conv/MatMul/Gemm, MinMax, QDQ — the deployment baseline)
  → K=1 static (ours: one min/max range per tensor, per-channel weights, attention matmuls, one
    range for each skip concatenation) → per-time-step tables (K=8) → + split shortcuts →
  + MSE clipping → + per-group zero points → + ε correction → + learned rounding (these rows keep
  the encoding qexport had before the CPU-correctness work: plain int8 weights and quantized
  conv_in / conv_out, which is wrong on x86 without VNNI) → + saturation-safe weights (from here on
  the rounding is the default for the bit width: nearest at 8, learned at 4) → + conv_in/conv_out
  float; then what `qexport convert --bits N` gives by default (shared zero points, correction when
  it helps on held-out seeds, learned rounding at 4 bits), and weights-only references.
Each table names the int8 kernel path it ran on (runtime.cpu); run it under
`qemu-x86_64-static -cpu Haswell` with `--tag avx2 --rows ...` for the AVX2 path.
Every row is a real artifact (`convert`) judged by `qexport eval`'s metrics on its integer graph
against the FP32 graph, same seeds (DDIM-50, 512 samples by default), the FP32 side computed once.
All rows share one calibration run (statistics), so they differ only in what the row changes.
Writes benchmarks/results/fidelity_ablation.{json,md}, a bar chart fidelity_ablation.png and the
error-accumulation plot error_accumulation.png (static K=1 vs per-step tables vs + correction).
Rows are saved as they finish; a rerun skips rows already in the JSON (--rows ID... redoes those,
--fresh redoes all).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MAIN = "digits16-ddpm"

# id, label, weight bits, TableConfig fields, convert() keywords; each row adds one change.
BASE = dict(groups=1, method="minmax", split_concat=False, zero_point="shared", saturation_safe=False,
            quantize_first_last=True, quantize_time_branch=True)
NEW = dict(groups=8, split_concat=True, method="mse", zero_point="per-group")
ROWS = []
for bits in (8, 4):
    w = f"w{bits}"
    chain = [("k1", "K=1 static (ours)", dict(BASE), dict(correction="off", rounding="nearest")),
             ("k8", "per-time-step tables (K=8)", dict(BASE, groups=8), dict(correction="off", rounding="nearest")),
             ("split", "+ split shortcuts", dict(BASE, groups=8, split_concat=True),
              dict(correction="off", rounding="nearest")),
             ("mse", "+ MSE clipping", dict(BASE, groups=8, split_concat=True, method="mse"),
              dict(correction="off", rounding="nearest")),
             ("zp", "+ per-group zero points", dict(BASE, groups=8, split_concat=True, method="mse",
                                                    zero_point="per-group"), dict(correction="off", rounding="nearest")),
             ("corr", "+ ε correction", dict(BASE, groups=8, split_concat=True, method="mse", zero_point="per-group"),
              dict(correction="on", rounding="nearest"))]
    # learned rounding: the W4 fix, measured at W8 too
    chain.append(("round", "+ learned rounding", dict(BASE, groups=8, split_concat=True, method="mse",
                                                      zero_point="per-group"),
                  dict(correction="on", rounding="learned")))
    chain.append(("safe", "+ saturation-safe weights", dict(BASE, **NEW, saturation_safe=True),
                  dict(correction="on", rounding=None)))
    chain.append(("float-fl", "+ conv_in/conv_out float", dict(NEW, saturation_safe=True, quantize_first_last=False,
                                                               quantize_time_branch=True),
                  dict(correction="on", rounding=None)))
    chain.append(("float-t", "+ time branch float", dict(NEW, saturation_safe=True, quantize_first_last=False),
                  dict(correction="on", rounding=None)))
    ROWS.append((f"{w}-ort", "ORT quantize_static", bits, None, None))
    ROWS += [(f"{w}-{i}", label, bits, t, c) for i, label, t, c in chain]
    ROWS.append((f"{w}-default", "`qexport convert` defaults", bits,
                 dict(groups=8, method="mse", split_concat=True, zero_point="shared"),
                 dict(correction="auto", rounding=None)))


def table_for(stats, model, calib: dict, bits: int, fields: dict):
    from qexport.calibrate.api import first_last_layers, unet_weights
    from qexport.tables.build import TableConfig, build_table
    from qexport.tables.ranges import RangeConfig

    f = dict(fields)
    cfg = TableConfig(range=RangeConfig(method=f.pop("method")), weight_bits=bits, **f)
    return build_table(stats, model.num_train_timesteps, unet_weights(model.unet), cfg, calib,
                       first_last=first_last_layers(model.unet))


def ort_static_artifact(model, source_cfg, out: Path, bits: int) -> Path:
    """ORT's own quantize_static on our FP32 graph, fed the same calibration (t, x_t) pairs."""
    import onnx
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from qexport.calibrate.sources import CalibrationSource
    from qexport.export.artifact import ArtifactWriter
    from qexport.export.pipeline import FP32_FILE, QDQ_FILE, fp32_graph, manifest_fields, marked_graph

    pairs = []
    src = CalibrationSource(model.scheduler_config, model.sample_shape, source_cfg)
    with torch.no_grad():
        for t, x in src.run(lambda x, t, keep: model.unet(x, torch.tensor([t])).sample):
            pairs.append({"sample": np.ascontiguousarray(x, np.float32), "timestep": np.array([t], np.int64)})

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(pairs)

        def get_next(self):
            return next(self.it, None)

    with ArtifactWriter(out, overwrite=True) as w:
        fp32 = fp32_graph(marked_graph(model, w.dir))
        (w.dir / "marked.onnx").unlink()
        onnx.save(fp32, str(w.add(FP32_FILE, "fp32")))
        quantize_static(str(w.dir / FP32_FILE), str(w.dir / QDQ_FILE), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"], activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt4 if bits == 4 else QuantType.QInt8, per_channel=False)
        w.add(QDQ_FILE, "qdq")
        w.finish(**manifest_fields(model, bits=dict(weights=bits, activations=8), groups=1, method="ort-static"))
    return out


def weights_only_images(model, table, cfg) -> np.ndarray:
    """Weights quantized, activations FP32 (torch simulation): how much of the loss is weights' alone."""
    from qexport.eval.simulate import simulated
    from qexport.zoo.model_card import sample_torch

    out = []
    with simulated(model.unet, table, weights=True, activations=False):
        for i, start in enumerate(range(0, cfg.samples, cfg.batch)):
            n = min(cfg.batch, cfg.samples - start)
            out.append(sample_torch(model.unet, model.scheduler_config, n, cfg.steps, seed=cfg.seed + i))
    return np.concatenate(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", nargs="*", help="row ids to (re)compute (default: all rows not yet in the JSON)")
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "qexport-bench" / "ablation"))
    p.add_argument("--fresh", action="store_true", help="recompute rows already in the JSON")
    p.add_argument("--tag", default="", help="suffix of the result files (e.g. avx2 for a run on that path)")
    args = p.parse_args(argv)

    import torch
    from tqdm import tqdm

    from qexport.calibrate.api import CalibrationConfig, calibrate
    from qexport.eval.accumulation import error_curves, plot_curves
    from qexport.eval.features import load_extractor
    from qexport.eval.fidelity import FidelityConfig, compare, evaluate
    from qexport.export.pipeline import convert
    from qexport.tables.schema import QuantTable
    from qexport.zoo.loading import load_model
    from qexport_runtime.artifact import load_artifact

    torch.set_num_threads(args.threads)
    RESULTS.mkdir(exist_ok=True)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    stem = "fidelity_ablation" + (f"_{args.tag}" if args.tag else "")
    out_json = RESULTS / f"{stem}.json"
    report = json.loads(out_json.read_text()) if out_json.exists() and not args.fresh else {}
    settings = dict(model=MAIN, samples=args.samples, steps=args.steps, scheduler="ddim", seed=0)
    machine = machine_info()
    if report.get("settings") != settings or report.get("machine", {}).get("isa") != machine["isa"]:
        report = dict(settings=settings, rows={})   # rows measured on another int8 path are not reused
    report["machine"] = machine

    def save():
        out_json.write_text(json.dumps(report, indent=2))

    model = load_model(MAIN)
    t0 = time.perf_counter()
    cal = CalibrationConfig()
    table0, stats = calibrate(model, cal, progress=True)
    report["calibration_seconds"] = round(time.perf_counter() - t0, 1)
    ext = load_extractor()
    cfg = FidelityConfig(samples=args.samples, steps=args.steps, batch=128, threads=args.threads)
    ref = None
    rows = [r for r in ROWS if not args.rows or r[0] in args.rows]
    for rid, label, bits, fields, kw in tqdm(rows, desc="ablation"):
        if rid in report["rows"] and not (args.fresh or args.rows):   # rows named in --rows are redone
            continue
        t1 = time.perf_counter()
        out = work / rid
        if fields is None:
            ort_static_artifact(model, cal.source, out, bits)
            extra = {}
        else:
            table = table_for(stats, model, table0.calibration, bits, fields)
            tdir = work / f"{rid}-tables"
            table.save(tdir)
            convert(MAIN, out, bits=bits, tables=tdir, overwrite=True, progress=False, threads=args.threads, **kw)
            extra = dict(table=fields, **kw)
            corr = load_artifact(out).manifest.extra.get("correction")
            if corr:
                extra["correction_auto_decision"] = dict(enabled=corr["enabled"], heldout_gain=corr["heldout_gain"])
        rep, ref = evaluate(out, cfg, ext, reference=ref, progress=False)
        rep.pop("_images")
        report.setdefault("seed_floor", rep["seed_floor"])
        report["rows"][rid] = dict(label=label, bits=bits, **extra, **{k: rep[k] for k in (
            "fd_to_fp32", "fd_to_fp32_bootstrap_std", "fd_to_fp32_pct_floor", "label_agreement", "psnr_db", "ssim", "fd_to_real",
            "correction_applied", "graph")}, seconds=round(time.perf_counter() - t1, 1))
        save()
        print(f"{rid:<10} {label:<28} FD {rep['fd_to_fp32']:.4f} ({rep['fd_to_fp32_pct_floor']:.2f}% floor) "
              f"labels {rep['label_agreement']:.2%} PSNR {rep['psnr_db']:.2f}", flush=True)

    # reference rows: weights alone (activations FP32), torch simulation, the same seeds
    for bits, rid in ((8, "w8-weights-only"), (4, "w4-weights-only")):
        if (rid in report["rows"] and not args.fresh) or (args.rows and rid not in args.rows):
            continue
        if ref is None:
            ref = evaluate(work / "w8-k1", cfg, ext, progress=False)[1]
        src = work / ("w4-round" if bits == 4 else "w8-mse")
        if not (src / "tables.json").exists():
            print(f"skipping {rid}: its tables come from row {src.name}, which was not run")
            continue
        table = QuantTable.load(src)
        images = weights_only_images(model, table, cfg)
        m = compare(images, ref, ext)
        report["rows"][rid] = dict(label=f"weights only ({'learned' if bits == 4 else 'nearest'}; acts FP32, torch)",
                                   bits=bits, **{k: m[k] for k in ("fd_to_fp32", "fd_to_fp32_bootstrap_std",
                                                                   "fd_to_fp32_pct_floor",
                                                                   "label_agreement", "psnr_db", "ssim", "fd_to_real")})
        save()

    curves = {}
    for rid, lab in (("w8-k1", "W8A8 static K=1"), ("w8-zp", "W8A8 per-step K=8"), ("w8-corr", "W8A8 + correction"),
                     ("w4-k1", "W4A8 static K=1"), ("w4-corr", "W4A8 per-step K=8 + corr"),
                     ("w4-round", "W4A8 + learned rounding"), ("w8-default", "W8A8 defaults (safe, first/last float)"),
                     ("w4-default", "W4A8 defaults (safe, first/last float)")):
        if (work / rid / "manifest.json").exists():
            curves[lab] = error_curves(work / rid, samples=64, steps=args.steps, threads=args.threads)
    if curves and not args.tag:
        plot_curves(curves, RESULTS / "error_accumulation.png", title=f"{MAIN}, DDIM-{args.steps}, 64 samples")
        report["error_curves"] = {k: dict(final_rmse=v["final_rmse"], eps_rmse_mean=float(np.mean(v["eps_rmse"])),
                                          trajectory_rmse_max=float(np.max(v["trajectory_rmse"])))
                                  for k, v in curves.items()}
    save()
    write_markdown(report, stem)
    plot_bars(report, stem)
    print(f"wrote {out_json}, {stem}.md, {stem}.png" + ("" if args.tag else ", error_accumulation.png"))
    return 0


def ordered(report: dict) -> list[tuple[str, dict]]:
    """Rows in ablation order (W8 first, weights-only references last in each bit-width)."""
    ids = [r[0] for r in ROWS]
    key = {rid: (int(rid[1]) != 8, ids.index(rid) if rid in ids else len(ids)) for rid in report["rows"]}
    return sorted(report["rows"].items(), key=lambda kv: key[kv[0]])


def write_markdown(report: dict, stem: str = "fidelity_ablation") -> None:
    s, m = report["settings"], report["machine"]
    isa = m["isa"]
    lines = [f"# Fidelity ablation: {s['model']}, DDIM-{s['steps']}, {s['samples']} samples vs the FP32 graph",
             "", f"Integer graphs ran on **{isa}** ({m['int8_kernel_path']}), {m['cpu']}, onnxruntime "
             f"{m['onnxruntime']}. Rows before \"+ saturation-safe weights\" use plain int8 weights.",
             "", f"Seed floor (FD between two FP32 sets, different seeds): **{report.get('seed_floor', float('nan')):.3f}**",
             "", "FD ± is the bootstrap std of the paired FD (resampling the 512 pairs): smaller differences "
             "between rows are noise.", "",
             "| row | W | int8 path | FD to FP32 | ± | % of floor | label agreement | PSNR dB | SSIM | FD to real |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rid, r in ordered(report):
        path = "torch (any)" if "weights only" in r["label"] else isa
        lines.append(f"| {r['label']} | {r['bits']} | {path} | {r['fd_to_fp32']:.4f} | {r.get('fd_to_fp32_bootstrap_std', float('nan')):.4f} | "
                     f"{r['fd_to_fp32_pct_floor']:.2f}% | "
                     f"{r['label_agreement']:.2%} | {r['psnr_db']:.2f} | {r['ssim']:.4f} | {r['fd_to_real']:.2f} |")
    if "error_curves" in report:
        lines += ["", "Error accumulation (64 samples; error_accumulation.png):", "",
                  "| run | final x_0 RMS vs FP32 | max x_t RMS along the loop | mean single-step ε RMS |",
                  "|---|---|---|---|"]
        for k, v in report["error_curves"].items():
            lines.append(f"| {k} | {v['final_rmse']:.4f} | {v['trajectory_rmse_max']:.4f} | {v['eps_rmse_mean']:.4f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


def plot_bars(report: dict, stem: str = "fidelity_ablation") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 7))
    for col, bits in enumerate((8, 4)):
        rows = [(r["label"], r) for _, r in ordered(report) if r["bits"] == bits]
        names = [n for n, _ in rows]
        y = np.arange(len(rows))
        axes[0, col].barh(y, [r["fd_to_fp32_pct_floor"] for _, r in rows], color="tab:blue")
        axes[0, col].axvline(2 if bits == 8 else 10, color="red", ls="--", label="target")
        axes[0, col].set(title=f"W{bits}A8: FD to FP32, % of seed floor (lower is better)", xscale="log")
        axes[1, col].barh(y, [100 * r["label_agreement"] for _, r in rows], color="tab:green")
        axes[1, col].axvline(96 if bits == 8 else 90, color="red", ls="--", label="target")
        axes[1, col].set(title=f"W{bits}A8: label agreement with FP32, %", xlim=(0, 100))
        for ax in axes[:, col]:
            ax.set_yticks(y, names, fontsize=8)
            ax.invert_yaxis()
            ax.legend(fontsize=8)
            ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.suptitle(f"int8 kernels: {report['machine']['isa']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
