"""`qexport inspect MODEL_ID -o DIR`: pictures of how activation ranges move with t, and bimodal sites."""

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
        _, stats = calibrate(load_model(args.model_id, allow_pickle=args.allow_pickle), calibration_config(args),
                             progress=sys.stderr.isatty())
    var = variation(stats)
    info = write_report(stats, var, Path(args.output))
    print_variation(var)
    print(f"\nbimodal sites (BC > 5/9 and a valley): {', '.join(info['bimodal']) or 'none'}")
    print(json.dumps({k: v for k, v in info.items() if k != "bimodal"}, indent=2))
    return 0


COMMAND = Command("inspect", "plot activation ranges over time steps and find bimodal tensors", _add, _run)
