"""Fidelity per int8 kernel path: the same artifacts judged natively and on x86 AVX2 (emulated).

    python benchmarks/bench_isa.py [--samples 512] [--steps 50] [--artifacts DIR ...]

Converts the shipped model three ways — the `qexport convert` defaults at W8 and W4, and the plain
int8 encoding qexport wrote before (no saturation-safe weights, conv_in/conv_out quantized) — then
runs `qexport eval`'s metrics on each artifact's integer graph natively and under
`qemu-x86_64-static -cpu Haswell` (ONNX Runtime then takes its AVX2 kernels, bit for bit as on an
AVX2-only CPU). The FP32 reference (its samples, the seed floor) is computed once, natively, and
reused by every run: only the integer graph's samples differ between paths. Writes
benchmarks/results/isa_fidelity.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MAIN = "digits16-ddpm"
KEYS = ("fd_to_fp32", "fd_to_fp32_bootstrap_std", "fd_to_fp32_pct_floor", "label_agreement", "psnr_db", "ssim",
        "fd_to_real", "isa", "correction_applied")


def save_reference(ref, path: Path) -> None:
    np.savez(path, images=ref.images, floor_images=ref.floor_images, features=ref.features,
             floor_features=ref.floor_features, labels=ref.labels, seed_floor=ref.seed_floor,
             fp32_sha256=ref.fp32_sha256, config=json.dumps(asdict(ref.config)))


def load_reference(path: Path):
    from qexport.eval.fidelity import FidelityConfig, Reference

    z = np.load(path, allow_pickle=False)
    return Reference(z["images"], z["floor_images"], z["features"], z["floor_features"], z["labels"],
                     float(z["seed_floor"]), str(z["fp32_sha256"]), FidelityConfig(**json.loads(str(z["config"]))))


def child(art: str, ref_path: str, out: str) -> None:
    """One evaluation in this process (run natively or under qemu by the parent)."""
    from qexport.eval.features import load_extractor
    from qexport.eval.fidelity import evaluate

    ref = load_reference(Path(ref_path))
    rep, _ = evaluate(art, ref.config, load_extractor(), reference=ref, progress=False)
    rep.pop("_images")
    Path(out).write_text(json.dumps({k: rep[k] for k in (*KEYS, "check")}, indent=2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "qexport-bench" / "isa")
    p.add_argument("--child", nargs=3, metavar=("ARTIFACT", "REFERENCE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    from qexport.calibrate.api import CalibrationConfig
    from qexport.eval.features import load_extractor
    from qexport.eval.fidelity import FidelityConfig, fp32_reference
    from qexport.export.pipeline import convert
    from qexport.tables.build import TableConfig
    from qexport_runtime.artifact import load_artifact

    qemu = shutil.which("qemu-x86_64-static")
    if qemu is None:
        sys.exit("bench_isa: qemu-x86_64-static is missing; apt-get install qemu-user-static")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    variants = {"W8A8 defaults": dict(bits=8), "W4A8 defaults": dict(bits=4),
                "W8A8 plain int8 (before)": dict(bits=8, calibration=CalibrationConfig(
                    table=TableConfig(saturation_safe=False, quantize_first_last=True, quantize_time_branch=True)))}
    arts = {}
    for name, kw in variants.items():
        out = work / name.split()[0].lower() / ("plain" if "plain" in name else "default")
        if not (out / "manifest.json").exists():
            convert(MAIN, out, overwrite=True, progress=False, **kw)
        arts[name] = out
    cfg = FidelityConfig(samples=args.samples, steps=args.steps)
    ref_path = work / f"reference-{args.samples}-{args.steps}.npz"
    if not ref_path.exists():
        save_reference(fp32_reference(load_artifact(next(iter(arts.values()))), cfg, load_extractor(),
                                      progress=False), ref_path)
    report = dict(machine=machine_info(), samples=args.samples, steps=args.steps, rows=[])
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, art in arts.items():
            for path, prefix in (("native", []), ("qemu -cpu Haswell", [qemu, "-cpu", "Haswell"])):
                out = Path(tmp) / "r.json"
                cmd = [*prefix, sys.executable, __file__, "--child", str(art), str(ref_path), str(out)]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    sys.exit(f"bench_isa: {name} on {path} failed: {r.stderr[-2000:]}")
                row = dict(variant=name, run=path, **json.loads(out.read_text()))
                report["rows"].append(row)
                write_results(report, args)                     # after every row: a partial run still reports
                print(f"{name:<26} {row['isa']:<22} FD {row['fd_to_fp32']:.4f} ({row['fd_to_fp32_pct_floor']:.2f}% "
                      f"floor) labels {row['label_agreement']:.2%} PSNR {row['psnr_db']:.2f} "
                      f"check {'ok' if row['check']['ok'] else 'DEVIATES'}", flush=True)
    print(write_results(report, args))
    return 0


def write_results(report: dict, args) -> str:
    (RESULTS / "isa_fidelity.json").write_text(json.dumps(report, indent=2))
    lines = [f"# Fidelity per int8 kernel path ({MAIN}, DDIM-{args.steps}, {args.samples} samples)", "",
             f"Host: {report['machine']['cpu']}, onnxruntime {report['machine']['onnxruntime']}. The FP32 reference "
             f"is computed once natively; AVX2 runs are this host under `qemu-x86_64-static -cpu Haswell`.", "",
             "| artifact | int8 path | FD to FP32 | ± | % of floor | label agreement | PSNR dB | SSIM | self-check |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['variant']} | {r['isa']} | {r['fd_to_fp32']:.4f} | {r['fd_to_fp32_bootstrap_std']:.4f} | "
                     f"{r['fd_to_fp32_pct_floor']:.2f}% | {r['label_agreement']:.2%} | {r['psnr_db']:.2f} | "
                     f"{r['ssim']:.4f} | {'ok' if r['check']['ok'] else 'DEVIATES'} |")
    (RESULTS / "isa_fidelity.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
