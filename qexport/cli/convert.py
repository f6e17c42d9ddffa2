"""`qexport convert MODEL_ID --bits 8 -o DIR`: the main job — calibrate, quantize, export the artifact."""

from __future__ import annotations

import argparse
import sys

from .base import Command
from .calibrate import add_calibration_arguments, calibration_config


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_id", metavar="MODEL_ID", help="shipped model name, local folder or Hub id")
    p.add_argument("-o", "--output", help="artifact folder (default: ./<model name>-w<bits>a8)")
    p.add_argument("--bits", type=int, choices=[4, 8], default=8, help="weight bits (activations are 8-bit)")
    p.add_argument("--tables", help="reuse tables written by `qexport calibrate` instead of calibrating")
    p.add_argument("--static-groups", action="store_true",
                   help="also write one constant-scale QDQ graph per time-step group (for NPU providers)")
    p.add_argument("--pipeline-graph", action="store_true",
                   help="also write the one-call sampling graph (noise, steps → image; PNG too with "
                        "onnxruntime-extensions)")
    p.add_argument("--mobile", choices=["arm", "amd64"], default=None,
                   help="also write .ort copies of the integer graphs and the operator config of a reduced "
                        "ONNX Runtime build, for this target")
    p.add_argument("--correction", choices=["auto", "on", "off"], default="auto",
                   help="per-step ε correction fitted on the integer graph: auto = enabled when it lowers the "
                        "held-out ε error (default), on, off")
    p.add_argument("--rounding", choices=["nearest", "learned"], default=None,
                   help="integer weight rounding (default: learned at --bits 4, nearest at 8)")
    p.add_argument("--optimum-layout", metavar="DIR", default=None,
                   help="text-to-image: also write a Hugging Face optimum-onnx view of the artifact (the folder "
                        "ORTStableDiffusionPipeline.from_pretrained loads, integer U-Net) to DIR")
    p.add_argument("--vae-bits", type=int, choices=[8, 32], default=8,
                   help="text-to-image pipelines: VAE decoder as static int8 (8, default; the FP32 one is kept "
                        "as the reference) or FP32 (32)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads for the correction fit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_calibration_arguments(p)
    for a in p._actions:  # --method gains the ORT-static baseline here
        if a.dest == "method":
            a.choices = ["minmax", "percentile", "mse", "static"]
            a.help = "activation range method, or 'static': the quantize_static baseline (K=1, min/max)"


def _run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..export.pipeline import ConvertConfig, convert
    from qexport_runtime.artifact import load_artifact

    method = args.method or "mse"
    cfg = calibration_config(args, method="minmax") if method == "static" else calibration_config(args)
    out = Path(args.output or f"{Path(args.model_id).name}-w{args.bits}a8")
    conf = ConvertConfig(bits=args.bits, groups=args.groups, method=method, calibration=cfg, tables=args.tables,
                         static_groups=args.static_groups, correction=args.correction, rounding=args.rounding,
                         threads=args.threads, pipeline_graph=args.pipeline_graph, mobile=args.mobile,
                         vae_bits=args.vae_bits)
    if args.optimum_layout and Path(args.optimum_layout).exists() and any(Path(args.optimum_layout).iterdir()):
        from ..errors import QexportError

        raise QexportError(f"--optimum-layout folder {args.optimum_layout} is not empty; choose a new folder")
    convert(args.model_id, out, conf, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
            progress=sys.stderr.isatty())
    art = load_artifact(out)
    if args.optimum_layout:
        from ..export.optimum_layout import write_optimum_view
        from ..zoo.loading import resolve_model_folder

        folder, _ = resolve_model_folder(args.model_id)
        write_optimum_view(out, args.optimum_layout, folder / "tokenizer")
        print(f"wrote the optimum-onnx view {args.optimum_layout} (ORTStableDiffusionPipeline.from_pretrained)")
    m = art.manifest
    fp32 = next(e.bytes for e in m.files.values() if e.role == "fp32")
    print(f"\nwrote {out}: W{m.bits['weights']}A{m.bits['activations']}, {m.groups} time-step groups, method {m.method}, "
          f"{m.extra['tables']['weight_rounding']} weight rounding")
    if "text" in m.extra:
        t = m.extra["text"]
        print(f"text-to-image: tokenizer + text encoder (FP32) + VAE decoder ({'int8' if t['vae_bits'] == 8 else 'FP32'}), "
              f"{t['max_length']} tokens, default guidance {t['guidance']}; ε correction: "
              f"{m.extra['correction']['reason']}")
    elif "correction" in m.extra:
        c = m.extra["correction"]
        print(f"ε correction: held-out final-image RMS vs FP32 {c['heldout_image_rmse']:.4f} → "
              f"{c['heldout_image_rmse_corrected']:.4f} ({-100 * c['heldout_gain']:+.1f}%), "
              f"{'enabled' if c['enabled'] else 'stored but off by default (it does not help here)'}")
    for name, e in m.files.items():
        ratio = f"{e.bytes / fp32:5.2f}x fp32" if e.role in ("qdq", "int", "static-group", "ort", "pipeline") else ""
        print(f"  {name:<28} {e.role:<13} {e.bytes:>11,} B  {ratio}")
    print(json.dumps({"artifact": str(out), "groups": m.groups, "bits": m.bits}))
    return 0


COMMAND = Command("convert", "calibrate, quantize and export an integer ONNX artifact (the main job)", _add, _run)
