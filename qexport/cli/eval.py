"""`qexport eval ARTIFACT`: image fidelity of the quantized graph against the artifact's FP32 graph."""

from __future__ import annotations

import argparse
import sys

from .base import Command


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", metavar="ARTIFACT", help="artifact folder written by `qexport convert`")
    p.add_argument("--samples", type=int, default=512, help="images per set (default 512)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 50; 25 for text-to-image)")
    p.add_argument("--guidance", type=float, default=None,
                   help="text-to-image: classifier-free guidance scale (default: the artifact's)")
    p.add_argument("--scheduler", choices=["ddim", "ddpm", "dpmsolver++"], default="ddim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=128, help="images per sampler call")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    p.add_argument("--graph", default=None, help="quantized graph role to judge (int, qdq; default: fastest)")
    p.add_argument("--correction", choices=["auto", "on", "off"], default="auto",
                   help="apply the artifact's ε correction: auto = as the artifact says (default)")
    p.add_argument("--features", default="digits16-classifier",
                   help="feature extractor: a shipped classifier name, an .onnx feature network "
                        "(first output features, optional second logits), or package.module:factory")
    p.add_argument("--real-stats", help=".npz with the real data's feature mu and sigma (for fd_to_real)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--curves", help="also write per-step error-accumulation curves (PNG; 64 samples) here")
    p.add_argument("--png", help="write a side-by-side grid (FP32 | quantized) of the first 64 samples here")


def _run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from qexport_runtime.artifact import load_artifact
    from qexport_runtime.images import grid, write_png

    from ..errors import QexportError
    from ..eval.features import load_extractor
    from ..eval.fidelity import FidelityConfig, evaluate, format_report

    if args.samples < 2:
        raise QexportError(f"--samples must be at least 2 (got {args.samples}); Fréchet distances need a covariance")
    art = load_artifact(args.artifact)  # a broken artifact fails here, before any sampling
    text = "text" in art.manifest.extra
    if text and args.curves:
        raise QexportError("--curves is not available for text-to-image artifacts yet; drop it")
    steps = args.steps if args.steps is not None else (25 if text else 50)
    cfg = FidelityConfig(samples=args.samples, steps=steps, scheduler=args.scheduler, seed=args.seed,
                         batch=args.batch, threads=args.threads, role=args.graph,
                         correction={"auto": None, "on": True, "off": False}[args.correction], guidance=args.guidance)
    report, ref = evaluate(args.artifact, cfg, load_extractor(args.features, args.real_stats),
                           progress=sys.stderr.isatty())
    images = report.pop("_images")
    print(format_report(report))
    if args.curves:
        from ..eval.accumulation import error_curves, plot_curves

        curves = error_curves(args.artifact, role=args.graph, samples=min(64, args.samples), steps=steps,
                              scheduler=args.scheduler, seed=args.seed, correction=cfg.correction,
                              threads=args.threads)
        plot_curves({f"{report['graph']} (K={report['groups']})": curves}, args.curves,
                    title=f"{args.artifact}: quantized vs FP32, {args.scheduler}-{steps}")
        report["error_curves"] = curves
        print(f"wrote {args.curves} (final x_0 RMS vs FP32 {curves['final_rmse']:.4f})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    if args.png:
        n = min(64, len(images))
        pair = np.concatenate([ref.images[:n], images[:n]], axis=-1)   # FP32 left, quantized right
        write_png(args.png, grid(pair, scale=3))
        print(f"wrote {args.png}")
    return 0


COMMAND = Command("eval", "fidelity of the quantized graph vs the FP32 graph: FD to FP32, seed floor, labels, PSNR",
                  _add, _run)
