"""`qexport calibrate MODEL_ID -o DIR`: per-time-step activation tables from FP32 trajectories."""

from __future__ import annotations

import argparse
import json
import resource
import sys

from .base import Command


def add_calibration_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by calibrate, inspect and convert (defaults live in the config dataclasses)."""
    g = p.add_argument_group("calibration")
    g.add_argument("--config", help="JSON file with a CalibrationConfig ({source: {...}, table: {...}}); "
                                    "command-line options below override it")
    g.add_argument("--strategy", choices=["uniform", "ndtc", "all"])
    g.add_argument("--samples", type=int, help="(t, image) pairs in the calibration set")
    g.add_argument("--trajectories", type=int, help="trajectories sampled in one batch")
    g.add_argument("--steps", type=int, help="sampling steps of the calibration trajectories")
    g.add_argument("--scheduler", choices=["ddim", "ddpm", "dpmsolver++"], help="calibration sampler")
    g.add_argument("--seed", type=int)
    g.add_argument("--method", choices=["minmax", "percentile", "mse"], help="activation range method")
    g.add_argument("--groups", type=int, help="time-step groups K (1 = one static range)")
    g.add_argument("--zero-point", choices=["shared", "per-group"],
                   help="one zero point per tensor (integer kernels' fast path) or one per time-step group")
    g.add_argument("--no-split", action="store_true",
                   help="quantize skip concatenations as one tensor (default: each part with its own range)")
    g.add_argument("--quantize-first-last", action="store_true",
                   help="quantize conv_in / conv_out too (default: they stay float, see README)")
    g.add_argument("--quantize-time-branch", action="store_true",
                   help="quantize the time MLP and time_emb_proj layers too (default: float, batched into one "
                        "product per step; see README)")
    g.add_argument("--no-time-table", action="store_true",
                   help="compute the time MLP and the time projections in the graph at every step (default: "
                        "looked up by t from tables; see README)")
    g.add_argument("--quantize-matmul-outputs", action="store_true",
                   help="requantize Linear and attention products (QLinearMatMul, standard ONNX only; default: "
                        "float products through onnxruntime's MatMulIntegerToFloat, bias added in the kernel)")
    g.add_argument("--fixed-range-below", type=float, metavar="RATIO",
                   help="a conv input whose range width varies over t by at most RATIO keeps one range: "
                        "constant bias, onnxruntime's fused conv kernel (default 3; 1 = every conv input "
                        "looked up by t, see README)")
    g.add_argument("--no-saturation-safe", action="store_true",
                   help="plain int8 weights: correct only on VNNI / ARM CPUs, wrong on x86 AVX2 (see README)")
    g.add_argument("--allow-pickle", action="store_true", help="allow loading .bin (pickle) weights")


def calibration_config(args: argparse.Namespace, **forced):
    from ..calibrate.api import CalibrationConfig

    d = json.loads(open(args.config).read()) if getattr(args, "config", None) else {}
    src, table = dict(d.get("source", {})), dict(d.get("table", {}))
    rng = dict(table.pop("range", {}))
    for k in ("strategy", "samples", "trajectories", "steps", "scheduler", "seed"):
        if getattr(args, k, None) is not None:
            src[k] = getattr(args, k)
    if getattr(args, "groups", None) is not None:
        table["groups"] = args.groups
    if getattr(args, "zero_point", None) is not None:
        table["zero_point"] = args.zero_point
    if getattr(args, "no_split", False):
        table["split_concat"] = False
    if getattr(args, "quantize_first_last", False):
        table["quantize_first_last"] = True
    if getattr(args, "quantize_time_branch", False):
        table["quantize_time_branch"] = True
    if getattr(args, "no_time_table", False):
        table["tabulate_time_embedding"] = table["tabulate_time_projections"] = False
    if getattr(args, "quantize_matmul_outputs", False):
        table["matmul_outputs"] = "quantized"
    if getattr(args, "fixed_range_below", None) is not None:
        table["fixed_range_below"] = args.fixed_range_below
    if getattr(args, "no_saturation_safe", False):
        table["saturation_safe"] = False
    if getattr(args, "method", None) is not None:
        rng["method"] = args.method
    for k, v in forced.items():
        (rng if k == "method" else table)[k] = v
    return CalibrationConfig.from_dict({**d, "source": src, "table": {**table, "range": rng}})


def print_variation(rows: list[dict], n: int = 10) -> None:
    print(f"{'site (most time-varying first)':<48} {'width min':>10} {'width max':>10} {'max/min':>8}")
    for r in rows[:n]:
        print(f"{r['site']:<48} {r['width_min']:>10.4g} {r['width_max']:>10.4g} {r['ratio_max_over_min']:>8.2f}")


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_id", metavar="MODEL_ID", help="shipped model name, local folder or Hub id")
    p.add_argument("-o", "--output", required=True, help="folder for tables.json, tables.safetensors, stats.npz")
    p.add_argument("--weight-bits", type=int, choices=[4, 8], default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_calibration_arguments(p)


def _run(args: argparse.Namespace) -> int:
    import shutil
    import tempfile
    from pathlib import Path

    from ..calibrate.api import calibrate, save_stats, variation
    from ..errors import QexportError
    from ..zoo.loading import load_model

    forced = {"weight_bits": args.weight_bits} if args.weight_bits else {}
    cfg = calibration_config(args, **forced)
    model = load_model(args.model_id, allow_pickle=args.allow_pickle)
    table, stats = calibrate(model, cfg, progress=sys.stderr.isatty())
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise QexportError(f"output folder {out} already exists; pass --overwrite or choose another -o")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent if out.parent.exists() else None))
    try:
        var = variation(stats)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        table.save(tmp, summary=dict(range_variation_top=var[:10], seconds=round(stats.seconds, 2),
                                     peak_rss_mb=round(peak_mb, 1)))
        save_stats(stats, tmp)
        (tmp / "range_variation.json").write_text(json.dumps(var, indent=2))
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(tmp), str(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_variation(var)
    print(f"\n{len(table.sites)} sites, {table.groups} groups, method {table.method}, "
          f"{table.calibration['samples']} samples, {stats.seconds:.1f} s, peak RSS {peak_mb:.0f} MB → {out}")
    return 0


COMMAND = Command("calibrate", "collect per-time-step activation statistics and write quantization tables", _add, _run)
