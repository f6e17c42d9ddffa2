"""One-call pipeline graph vs the Python sampling loop: latency and peak RSS, and `.ort` vs `.onnx` sizes.

    python benchmarks/bench_pipeline.py [--artifact DIR] [--steps 20 50] [--batch 1 4] [--threads 2] [--reps 7]

Converts the shipped digits16-ddpm with `--pipeline-graph --mobile arm` (unless --artifact is given),
then, interleaved in one process per (steps, batch): the pipeline graph (`PipelineSession`), and the
Python loop (`Sampler` over the same integer graph). Peak RSS comes from a fresh process per
variant (VmHWM after one generation). Checks both give the same pixels. Writes
benchmarks/results/pipeline_bench.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

_RSS = r"""
import json, sys
sys.path[:0] = {paths!r}
from qexport_runtime.artifact import load_artifact
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
base = hwm()
art = load_artifact({art!r})
if {variant!r} == "pipeline":
    from qexport_runtime.pipeline import PipelineSession
    PipelineSession(art, threads={threads}).generate({steps}, batch={batch})
else:
    from qexport_runtime.sampler import Sampler
    Sampler(art, threads={threads}, check=False).sample({steps}, batch={batch})
print(json.dumps(dict(peak_rss_mb=hwm(), baseline_mb=base)))
"""


def rss(art: Path, variant: str, steps: int, batch: int, threads: int) -> float:
    code = _RSS.format(paths=sys.path, art=str(art), variant=variant, steps=steps, batch=batch, threads=threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", help="an artifact converted with --pipeline-graph (default: convert the shipped model)")
    p.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    from qexport_runtime.artifact import load_artifact
    from qexport_runtime.images import to_uint8
    from qexport_runtime.pipeline import PipelineSession
    from qexport_runtime.sampler import Sampler

    tmp = tempfile.TemporaryDirectory()
    if args.artifact:
        path = Path(args.artifact)
    else:
        from qexport.export.pipeline import convert

        path = convert("digits16-ddpm", Path(tmp.name) / "art", pipeline_graph=True, mobile="arm", progress=False)
    art = load_artifact(path)
    pipe = PipelineSession(art, threads=args.threads)
    loop = Sampler(art, threads=args.threads, check=False)
    rows = []
    for steps in args.steps:
        for batch in args.batch:
            same = bool(np.array_equal(pipe.generate(steps, batch=batch).images,
                                       to_uint8(loop.sample(steps, batch=batch).images)))
            times = interleaved({"pipeline graph": lambda: pipe.generate(steps, batch=batch),
                                 "python loop": lambda: loop.sample(steps, batch=batch)}, args.reps, warmup=1)
            for name, v in times.items():
                variant = "pipeline" if name == "pipeline graph" else "loop"
                rows.append(dict(steps=steps, batch=batch, variant=name, ms_median=float(np.median(v) * 1e3),
                                 ms_p90=float(np.percentile(v, 90) * 1e3), same_pixels=same,
                                 peak_rss_mb=rss(path, variant, steps, batch, args.threads)))
    sizes = {name: e.bytes for name, e in art.manifest.files.items() if e.role in ("int", "ort", "pipeline", "pipeline-png")}
    config = art.manifest.files_with_role("ort-config")
    report = dict(machine=machine_info(), threads=args.threads, reps=args.reps, rows=rows, sizes=sizes,
                  ort_config=(path / config[0]).read_text() if config else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline_bench.json").write_text(json.dumps(report, indent=2))
    m = report["machine"]
    lines = [f"# One-call pipeline graph vs Python loop ({m['cpu']}, {m['isa']}, int8 path {m['int8_kernel_path']}, "
             f"{args.threads} threads, onnxruntime {m['onnxruntime']})", "",
             "| steps | batch | variant | ms (median) | p90 | × loop | peak RSS MB | same pixels |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(x for x in rows if x["steps"] == r["steps"] and x["batch"] == r["batch"]
                    and x["variant"] == "python loop")
        lines.append(f"| {r['steps']} | {r['batch']} | {r['variant']} | {r['ms_median']:.1f} | {r['ms_p90']:.1f} | "
                     f"{base['ms_median'] / r['ms_median']:.2f} | {r['peak_rss_mb']:.0f} | {r['same_pixels']} |")
    lines += ["", "| file | bytes |", "|---|---|"] + [f"| {k} | {v:,} |" for k, v in sizes.items()]
    if report["ort_config"]:
        lines += ["", "Reduced-build operator config:", "", "```", report["ort_config"].strip(), "```"]
    (out / "pipeline_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
