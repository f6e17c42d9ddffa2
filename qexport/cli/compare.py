"""`qexport compare [BIG SMALL] [--distilled D] -o DIR`: quantize or scale down, measured in one run."""

from __future__ import annotations

import argparse
import sys

from .base import Command


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("big", nargs="?", default="digits16-ddpm", metavar="BIG",
                   help="the big model (MODEL_ID as for convert; default: the shipped digits16-ddpm)")
    p.add_argument("small", nargs="?", default="digits16-ddpm-small", metavar="SMALL",
                   help="its scaled-down sibling trained from data (default: digits16-ddpm-small)")
    p.add_argument("--distilled", default=None,
                   help="a student of SMALL's size distilled from BIG (default: the shipped digits16-ddpm-distilled "
                        "for the shipped pair, none otherwise; 'none' to leave it out)")
    p.add_argument("-o", "--output", required=True, help="folder for compare.json, compare.md, pareto.png, artifacts/")
    p.add_argument("--samples", type=int, default=None, help="images per quality set (default 512; 64 with --quick)")
    p.add_argument("--steps", type=int, default=None,
                   help="DDIM steps of the quality sets and the benchmark loop (default 50; 10 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: onnxruntime's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-quality", action="store_true",
                   help="efficiency only (random-weight models, whose images mean nothing)")
    p.add_argument("--features", default="digits16-classifier",
                   help="feature extractor for the quality figures (as for `qexport eval`)")
    p.add_argument("--real-stats", help=".npz with the real data's feature mu and sigma (for FD to real)")
    p.add_argument("--quick", action="store_true",
                   help="a reduced run: 64 samples, 10 steps, small calibration, no ε correction")


def _run(args: argparse.Namespace) -> int:
    from ..eval.compare import CompareConfig, markdown, run_compare

    samples, steps = (64, 10) if args.quick else (512, 50)
    shipped_pair = (args.big, args.small) == (CompareConfig.big, CompareConfig.small)
    distilled = args.distilled or (CompareConfig.distilled if shipped_pair else "none")
    cfg = CompareConfig(big=args.big, small=args.small, distilled=None if distilled.lower() == "none" else distilled,
                        samples=args.samples or samples, steps=args.steps or steps,
                        threads=args.threads, seed=args.seed, quality=not args.no_quality, features=args.features,
                        real_stats=args.real_stats, quick=args.quick)
    report = run_compare(cfg, args.output, progress=sys.stderr.isatty())
    print(markdown(report))
    print(f"wrote {args.output}/compare.json, compare.md, pareto.png ({report['seconds']:.0f} s)")
    return 0


COMMAND = Command("compare", "quantize or scale down: efficiency and quality of big, small, distilled, W8/W4 variants",
                  _add, _run)
