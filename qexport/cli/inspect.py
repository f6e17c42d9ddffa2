"""`qexport inspect MODEL_ID -o DIR`: pictures of how activation ranges move with t, and bimodal sites
(for a text-to-image model also how the CFG halves' ranges differ, `cfg_halves.json`)."""

from __future__ import annotations

import argparse
import json
import sys

from .base import Command
from .calibrate import add_calibration_arguments, calibration_config, print_variation


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_id", metavar="MODEL_ID", help="shipped model name, local folder or Hub id")
    p.add_argument("-o", "--output", required=True, help="folder for the PNGs and JSON summaries")
    p.add_argument("--tables", help="reuse the stats.npz of a `qexport calibrate` output instead of recalibrating")
    add_calibration_arguments(p)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..calibrate.api import calibrate, load_stats, variation
    from ..calibrate.report import write_report
    from ..errors import QexportError
    from ..zoo.loading import load_model

    if args.tables:
        if not (Path(args.tables) / "stats.npz").exists():
            raise QexportError(f"{args.tables} has no stats.npz; pass a folder written by `qexport calibrate`")
        stats = load_stats(Path(args.tables))
    else:
        model = load_model(args.model_id, allow_pickle=args.allow_pickle)
        if model.conditioned:   # text-to-image: the CFG halves recorded apart, along the same trajectories
            from ..eval.text_conditioning import cfg_half_statistics, range_difference

            halves = cfg_half_statistics(model, calibration_config(args), progress=sys.stderr.isatty())
            stats, diff = halves["both"], range_difference(halves["uncond"], halves["cond"], top=0)
            print("cond/uncond range width ratio per site (CFG halves of the same guided trajectories), most "
                  "different first:")
            for d in diff[:15]:
                print(f"  {d['site']:<70} median {d['ratio_median']:5.2f}  extreme {d['ratio_extreme']:5.2f} "
                      f"at t={d['t_at_extreme']}")
            Path(args.output).mkdir(parents=True, exist_ok=True)
            (Path(args.output) / "cfg_halves.json").write_text(json.dumps(diff, indent=2))
            print()
        else:
            _, stats = calibrate(model, calibration_config(args), progress=sys.stderr.isatty())
    var = variation(stats)
    info = write_report(stats, var, Path(args.output))
    print_variation(var)
    print(f"\nbimodal sites (BC > 5/9 and a valley): {', '.join(info['bimodal']) or 'none'}")
    print(json.dumps({k: v for k, v in info.items() if k != "bimodal"}, indent=2))
    return 0


COMMAND = Command("inspect", "plot activation ranges over time steps and find bimodal tensors", _add, _run)
